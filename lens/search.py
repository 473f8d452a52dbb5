"""The single query path: decode once, crop once, embed, search the index, re-rank, results.

A method with its own index (:class:`~lens.types.MatchesLocally`, e.g. ``local``) is searched with
the whole photo (:func:`match_picture`; the box only focuses). The combined search (method
``auto``, :func:`auto_methods` + :func:`combine`) puts such a method's verified **exact** matches
above a global embedding's **visually similar** images, as Google Lens answers a photo.

    >>> picture = query_picture("query.jpg", box, margin=0.05)    # decoded once, cropped once
    >>> results = search_pictures(stored, method, [picture], root, k=10)[0]

:class:`lens.Gallery` opens the index and the method and calls these; the app's service calls
:func:`query_picture` once per search so that the picture shown is the picture searched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lens.errors import IndexNotFoundError, LensError
from lens.images import ImageSource, crop, display_path, load_image
from lens.index import rerank_exact
from lens.store import StoredIndex
from lens.types import Box, MatchesLocally, Method, Rerank, Reranks, SearchResult

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
    elif count:
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
