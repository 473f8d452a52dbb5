"""The single query path: decode once, crop once, embed, search the index, re-rank, results.

A method with its own index (:class:`~lens.types.MatchesLocally`, e.g. ``local``) is searched with
the whole photo (:func:`match_picture`; the box only focuses). The combined search (method
``auto``, :func:`auto_methods` + :func:`combine`) puts such a method's verified **exact** matches
above a global embedding's **visually similar** images, as Google Lens answers a photo.

    >>> picture = query_picture("query.jpg", box, margin=0.05)    # decoded once, cropped once
    >>> results = search_pictures(stored, method, [picture], root, k=10)[0]
    >>> results = search_text(stored, clip, "in red", picture, root, k=10)  # words (+ a picture)

:class:`lens.Gallery` opens the index and the method and calls these; the app's service calls
:func:`query_picture` once per search so that the picture shown is the picture searched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lens.errors import IndexNotFoundError, LensError
from lens.images import ImageSource, crop, display_path, load_image
from lens.index import rerank_exact
from lens.store import StoredIndex
from lens.types import Box, EmbedsText, MatchesLocally, Method, Rerank, Reranks, SearchResult, l2_normalise

AUTO = "auto"  #: the combined search's method name
EXACT_METHOD = "local"  #: the method whose verified results are exact matches
#: methods never used for "visually similar" when another is indexed (keypoints and hashes)
_NOT_SIMILAR = ("local", "sift", "phash", "dhash", "ahash", "whash")

log = logging.getLogger("lens")


def query_picture(image: ImageSource, box: Box | Sequence[float] | None = None, margin: float = 0.0
                  ) -> Image.Image:
    """The picture to search for: ``image`` decoded once (:func:`lens.images.load_image`; an RGB PIL
    image passes through) and cropped once to ``box`` (:func:`lens.images.crop`, with its margin rule).

    Raises :class:`~lens.images.ImageError` for an unreadable image or a box with no area in it.
    """
    return crop(load_image(image), box, margin)


def search_pictures(
    stored: StoredIndex,
    searcher: Method,
    pictures: Sequence[Image.Image],
    root: Path,
    k: int = 10,
    rerank: Rerank = None,
    *,
    files: Mapping[str, Path] | None = None,
) -> list[list[SearchResult]]:
    """The ``k`` best gallery images for each picture (one list per picture, best first).

    ``stored``: the opened index; ``searcher``: the method it was built with (fitted to it when it
    learns from the gallery); ``root``: the gallery folder (results' ``file`` = root / path, or
    ``files[path]`` for an explicit gallery's images).
    The pictures are embedded in one batch, ``(n, dim)``. ``rerank``: how many index candidates (at
    least ``k``) to re-rank, by the method's own check when it has one (SIFT: RANSAC-verified
    matches; scores are then inlier counts), else exactly with the stored vectors; ``"all"`` compares
    every gallery image (brute force, the exact reference); ``0`` keeps the index's order; ``None``:
    the method's default (SIFT: 50), else the index spec's ``rerank`` option (e.g.
    ``faiss:PQ32:rerank=100``), else 0. Raises :class:`LensError` for a bad ``rerank``.
    Results whose file was deleted since the index was built are left out (:func:`on_disk`).
    """
    files = files or {}

    def file(path: str) -> Path:
        return files.get(path) or root / path

    _vector_index(stored, searcher)
    prepared = [searcher.prepare(picture) for picture in pictures]
    vectors = searcher.embed_prepared(prepared)
    count, kind = rerank_count(rerank, stored, searcher), stored.index.metric
    if count >= len(stored.items):  # every image is a candidate: no index needed
        ids = np.tile(np.arange(len(stored.items), dtype=np.int64), (len(pictures), 1))
        scores = np.zeros(ids.shape, np.float32)
    else:
        ids, scores = stored.index.search(vectors, max(k, count))
    if count and isinstance(searcher, Reranks):
        # only the top `count` candidates are re-ranked; any results beyond them (k > count, e.g. a
        # full ranking for evaluation) keep the index's order and scores, and say so in their kind
        reranked = [searcher.rerank(item, row[:count], min(k, count)) for item, row in zip(prepared, ids)]
        tails = [(row_ids[count:k], row_scores[count:k]) for row_ids, row_scores in zip(ids, scores)]
        return on_disk([
            [SearchResult(rank + 1, stored.items[i].path, float(score), file(stored.items[i].path),
                          searcher.score_kind if rank < len(top_ids) else stored.index.metric)
             for rank, (i, score) in enumerate(zip([*top_ids, *tail_ids], [*top_scores, *tail_scores]))
             if i >= 0]
            for (top_ids, top_scores), (tail_ids, tail_scores) in zip(reranked, tails)
        ], root)
    return _ranked(stored, vectors, ids, scores, root, k, count, kind, file)


def _ranked(stored: StoredIndex, vectors: np.ndarray, ids: np.ndarray, scores: np.ndarray, root: Path, k: int,
            count: int, kind: str, file: Callable[[str], Path]) -> list[list[SearchResult]]:
    """Index candidates as results (files still on disk; ``file(path)``: where an image is): re-ranked
    exactly with the stored vectors when ``count``."""
    if count:
        index = stored.index
        ranked = list(zip(*rerank_exact(vectors, ids, stored.vectors, index.metric, index.dim, k)))
    else:
        ranked = [(row_ids[:k], row_scores[:k]) for row_ids, row_scores in zip(ids, scores)]
    return on_disk([
        [
            SearchResult(rank + 1, stored.items[i].path, float(score), file(stored.items[i].path),
                         kind)
            for rank, (i, score) in enumerate(zip(row_ids, row_scores))
            if i >= 0
        ]
        for row_ids, row_scores in ranked
    ], root)


def on_disk(groups: list[list[SearchResult]], root: Path) -> list[list[SearchResult]]:
    """``groups`` without the results whose file was deleted since the index was built (ranks
    renumbered), with a warning suggesting ``lens index``: a stale hit is never shown as an answer."""
    gone = {r.path for group in groups for r in group if not os.path.isfile(r.file)}
    if not gone:
        return groups
    log.warning("%d result file(s) were deleted since the index was built (e.g. %s) and are left out; "
                "refresh the index with `lens index %s`", len(gone), display_path(sorted(gone)[0]),
                display_path(root))
    return [[replace(r, rank=rank) for rank, r in enumerate((r for r in group if r.path not in gone), 1)]
            for group in groups]


#: The words' share of an image + text query by default: 0.5 is the plain sum of the two unit vectors.
TEXT_WEIGHT = 0.5


def compose_query(image_vector: np.ndarray | None, text_vector: np.ndarray, text_weight: float = TEXT_WEIGHT
                  ) -> np.ndarray:
    """One query vector from a picture's and words' embeddings (both ``(n, dim)`` float32, L2-normalised):
    ``q = normalise((1 - w) * image + w * text)``; the text alone when there is no picture.

    This is the training-free "weighted modality fusion" of Wu, Lin and Yang, "Training-free Zero-shot
    Composed Image Retrieval via Weighted Modality Fusion and Similarity" (arXiv:2409.04918, 2024); at
    ``w = 0.5`` it is the element-wise sum of CLIP features, the starting point of Baldrati et al.,
    "Composed Image Retrieval using Contrastive Learning and Task-oriented CLIP-based Features" (ACM TOMM
    2023, arXiv:2308.11485). ``w = 0``: the picture alone, ``w = 1``: the words alone.
    Raises :class:`LensError` for a weight outside [0, 1].
    """
    _check_weight(text_weight)
    if image_vector is None:
        return l2_normalise(text_vector)
    return l2_normalise((1.0 - text_weight) * l2_normalise(image_vector) + text_weight * l2_normalise(text_vector))


def _check_weight(text_weight: float) -> None:
    if not 0.0 <= float(text_weight) <= 1.0:
        raise LensError(f"the text weight must be between 0 (the picture only) and 1 (the words only), "
                        f"got {text_weight}")


def search_text(
    stored: StoredIndex,
    searcher: Method,
    text: str,
    picture: Image.Image | None,
    root: Path,
    k: int = 10,
    text_weight: float = TEXT_WEIGHT,
    rerank: Rerank = None,
    *,
    files: Mapping[str, Path] | None = None,
) -> list[SearchResult]:
    """The ``k`` best gallery images for words, or for a picture refined by words (best first).

    ``searcher`` must embed text (:class:`~lens.types.EmbedsText`: ``clip``, ``siglip``); the query
    vector is :func:`compose_query` of the picture's and the words' embeddings. Scores are cosines of
    kind ``text cosine`` (words only) or ``image+text cosine``: on another scale than image-to-image
    cosines (see :data:`lens.types.SCORE_LABELS`). ``rerank``, ``files``: as in :func:`search_pictures`.
    Raises :class:`LensError` for a method that cannot read words, empty words or a bad weight.
    """
    if not isinstance(searcher, EmbedsText):
        raise LensError(f"method '{searcher.info.name}' cannot read words: search with text using a "
                        "method that embeds text and images together (clip, siglip)")
    if not str(text).strip():
        raise LensError("the words to search for are empty")
    _check_weight(text_weight)
    words = searcher.embed_text([text])
    image = searcher.embed([picture]) if picture is not None and text_weight < 1 else None
    vectors = compose_query(image, words, text_weight)
    kind = "text cosine" if image is None else "cosine" if text_weight == 0 else "image+text cosine"
    _vector_index(stored, searcher)
    count = rerank_count(rerank, stored, searcher)
    if count >= len(stored.items):
        ids = np.arange(len(stored.items), dtype=np.int64)[None]
        scores = np.zeros(ids.shape, np.float32)
    else:
        ids, scores = stored.index.search(vectors, max(k, count))
    return _ranked(stored, vectors, ids, scores, root, k, count, kind,
                   lambda path: (files or {}).get(path) or root / path)[0]


def _vector_index(stored: StoredIndex, searcher: Method) -> None:
    """Refuse a build without a vector index (a ``MatchesLocally`` method's): it is searched with
    :func:`match_picture`."""
    if stored.index is None:
        raise LensError(f"method '{searcher.info.name}' has no vector index: it matches with its own "
                        "(search it with match_picture, or Gallery.search)")


def rerank_count(rerank: Rerank, stored: StoredIndex, method: Method) -> int:
    """How many candidates to re-rank (>= the gallery's size: all of them)."""
    if rerank is None:
        rerank = method.candidates if isinstance(method, Reranks) else getattr(stored.index, "rerank", 0)
    if rerank == "all":
        return len(stored.items)
    if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
        raise LensError(f"rerank must be a number of candidates (0 or more) or 'all', got {rerank!r}")
    return int(rerank)


def match_picture(stored: StoredIndex, searcher: MatchesLocally, picture: Image.Image, box: Box | None,
                  root: Path, k: int = 10, *, files: Mapping[str, Path] | None = None
                  ) -> list[SearchResult]:
    """The ``k`` best gallery images for the whole ``picture`` by a method with its own index.

    ``box`` (or None) only focuses the search (e.g. ``local`` weights keypoints outside it less);
    nothing is cropped, so a detector's tight box cannot cut the item's keypoints off. Verified
    results are ``match="exact"`` (score and ``inliers`` = RANSAC inliers, ``region`` = the query's
    outline in the result image); the others ``similar`` with their ``votes``. ``root`` and
    ``files``: where results' files are, as for :func:`search_pictures`.
    """
    files = files or {}
    found = searcher.match(searcher.prepare(picture), k, box.xyxy if box is not None else None)  # type: ignore[attr-defined]
    results = []
    for rank, m in enumerate(found):
        item = stored.items[m.row]
        exact = m.inliers > 0
        region = tuple((float(x), float(y)) for x, y in m.region) if m.region is not None else None
        results.append(SearchResult(rank + 1, item.path, float(m.inliers if exact else m.votes),
                                    files.get(item.path) or root / item.path,
                                    "inliers" if exact else "votes", "exact" if exact else "similar",
                                    m.inliers, region))
    return on_disk([results], root)[0]


def auto_methods(indexed: Sequence[str]) -> tuple[str | None, str | None]:
    """(exact method, similar method) of the combined search among the ``indexed`` method names:
    ``local`` when indexed, and the first other method that is not a keypoint or hash method (else
    any other); None where there is none. Raises :class:`IndexNotFoundError` when neither exists."""
    exact = EXACT_METHOD if EXACT_METHOD in indexed else None
    others = [m for m in indexed if m != EXACT_METHOD]
    preferred = [m for m in others if m not in _NOT_SIMILAR]
    similar = (preferred or others or [None])[0]
    if exact is None and similar is None:
        raise IndexNotFoundError(
            "no index for the combined search (method 'auto'): build them with `lens index GALLERY` "
            "(by default `--methods resnet50,local`: visually similar images and exact matches)")
    return exact, similar


def combine(exact: Sequence[SearchResult], similar: Sequence[SearchResult], k: int) -> list[SearchResult]:
    """The combined answer: the verified results of ``exact`` (in their order), then the ``similar``
    ones not among them (marked ``similar``); ranks renumbered from 1, at most ``k``."""
    verified = [r for r in exact if r.match == "exact"]
    shown = {r.path for r in verified}
    rest = [replace(r, match="similar", inliers=0, region=None) for r in similar if r.path not in shown]
    return [replace(r, rank=i + 1) for i, r in enumerate([*verified, *rest][:k])]
