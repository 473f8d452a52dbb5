"""The ground floor: what a box, a method and a result are. Imports nothing of lens.

- :class:`Box`: a region of a picture, ``x1, y1, x2, y2`` in pixels (+ a label and a score).
- :class:`Method` (+ the optional :class:`LearnsFromGallery`, :class:`Reranks` and
  :class:`MatchesLocally`, whose :class:`Match` es are exact matches): the small protocol
  every similarity method family implements; :class:`MethodInfo` is what an index records about it.
- :class:`SearchResult`: one gallery image found for a query.
- :class:`EmbedsText` (optional): a method that embeds words into its image space (CLIP, SigLIP).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Union, runtime_checkable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Box:
    """A region of a picture: corners in pixels of the (EXIF-oriented) image, a label and a score.

    A detector's boxes carry its class label and confidence in [0, 1]; a region the user drew is
    ``Box.of((x1, y1, x2, y2))`` (label ``region``, score 1).
    """

    x1: float
    y1: float
    x2: float
    y2: float
    label: str = "object"
    score: float = 1.0

    @classmethod
    def of(cls, value: Box | Sequence[float], label: str = "region", score: float = 1.0) -> Box:
        """``value`` itself when it is a Box, else a Box from a 4-sequence ``(x1, y1, x2, y2)`` in pixels.

        Raises ``ValueError`` when ``value`` is not 4 numbers.
        """
        if isinstance(value, Box):
            return value
        try:
            x1, y1, x2, y2 = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a box is 4 numbers x1, y1, x2, y2 in pixels, got {value!r}") from exc
        return cls(x1, y1, x2, y2, label, score)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` in pixels."""
        return self.x1, self.y1, self.x2, self.y2

    @property
    def area(self) -> float:
        """Square pixels; 0 for a box with no extent."""
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def contains(self, x: float, y: float) -> bool:
        """Whether the point (x, y), in pixels, lies inside the box or on its edge."""
        return self.x1 <= x <= self.x2 and self.y1 <= y <= self.y2

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"box": [x1, y1, x2, y2] (pixels, 0.1 px), "label", "score"}``."""
        return {
            "box": [round(v, 1) for v in self.xyxy],
            "label": self.label,
            "score": round(self.score, 4),
        }


#: A region to search: a :class:`Box` or ``(x1, y1, x2, y2)`` in pixels; ``None`` is the whole image.
Region = Union[Box, Sequence[float], None]
#: Candidates to re-rank: a number, ``"all"``, or None (the method's or index's default).
Rerank = Union[int, Literal["all"], None]


@dataclass(frozen=True)
class SearchResult:
    """One gallery image found for a query."""

    rank: int  #: 1 = best
    path: str  #: the image's path relative to the gallery root (its id)
    score: float  #: similarity in [0, 1], 1 = identical; or a count, see ``kind``
    file: Path  #: where the image is on disk
    #: what ``score`` is: ``cosine`` or ``hamming`` similarity in [0, 1], ``inliers`` (a count of
    #: RANSAC-verified keypoint matches), ``votes`` (unverified inverted-file votes), or ``text
    #: cosine`` / ``image+text cosine`` for a query with words (another scale); see SCORE_LABELS
    kind: str = "cosine"
    #: ``exact``: the same item, verified geometrically (a RANSAC homography with enough inliers);
    #: ``similar``: anything else
    match: str = "similar"
    inliers: int = 0  #: verified keypoint matches (exact matches only, else 0)
    #: exact matches: the query's outline in this image, 4 (x, y) corners in its pixels (see
    #: :func:`lens.methods.local.matched_region`); None otherwise
    region: tuple[tuple[float, float], ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"rank", "path" (absolute file), "score", "score_kind", "match"}``, and for an
        exact match ``"inliers"`` and ``"region"`` (4 [x, y] corners, result-image pixels, 0.1 px)."""
        data: dict[str, Any] = {"rank": self.rank, "path": str(self.file), "score": round(self.score, 6),
                                "score_kind": self.kind, "match": self.match}
        if self.match == "exact":
            data["inliers"] = self.inliers
            data["region"] = [[round(x, 1), round(y, 1)] for x, y in self.region or ()]
        return data

    @property
    def score_text(self) -> str:
        """The score for people: ``0.923`` for a similarity, ``41 inliers`` for a count."""
        return f"{self.score:.0f} inliers" if self.kind == "inliers" else f"{self.score:.3f}"


#: What each kind of score means, for people.
SCORE_LABELS = {
    "cosine": "cosine similarity, 1 = identical",
    "hamming": "1 - Hamming distance / bits, 1 = identical",
    "inliers": "RANSAC-verified keypoint matches (inliers), more = more alike",
    "votes": "inverted-file votes of shared visual words (unverified), more = more alike",
    # words and pictures sit apart in a CLIP space (the "modality gap", Liang et al., NeurIPS 2022):
    # a good text match scores far below a near-duplicate picture, so only ranks compare across kinds
    "text cosine": "cosine between the words' and the image's embeddings, on a far lower scale than "
                   "image-to-image cosines (the modality gap): compare ranks, not values",
    "image+text cosine": "cosine between the image + words query (weighted sum of both unit vectors) and the "
                         "image; lower than image-to-image cosines: compare ranks, not values",
}


@dataclass(frozen=True)
class MethodInfo:
    """What an index must record to be sure it is searched with the same method it was built with."""

    name: str  #: the method spec, e.g. ``resnet50`` or ``hf:facebook/dinov2-base``
    metric: str  #: ``cosine`` (float vectors) or ``hamming`` (packed bit codes)
    dim: int  #: vector length (bits for ``hamming``)
    model: str = ""  #: hub id or local path of the weights, "" for model-free methods
    weights: str = ""  #: fingerprint of the weights' values (see :func:`fingerprint_arrays`)
    extra: dict[str, Any] = field(default_factory=dict)  #: preprocessing, pooling, ...

    def as_dict(self) -> dict[str, Any]:
        """What a manifest records (``method``, ``metric``, ``dim``, ``model``, ``weights``, ``extra``)."""
        return {
            "method": self.name,
            "metric": self.metric,
            "dim": self.dim,
            "model": self.model,
            "weights": self.weights,
            "extra": self.extra,
        }


@runtime_checkable
class Method(Protocol):
    """A way to turn pictures into vectors that are close when the pictures are similar.

    ``prepare`` is the per-image CPU work (resize, normalise, ...). It must be thread-safe: the
    gallery runs it on worker threads, overlapped with ``embed_prepared`` on the previous batch.
    ``embed(images)`` is the same as ``embed_prepared([prepare(i) for i in images])``.

    ``decode_size`` (optional, default None) is the fewest pixels on the shorter side that ``prepare``
    needs: gallery JPEGs are then decoded at a reduced scale that keeps at least that many. Methods
    whose output must not move at all between a full and a scaled decode (the perceptual hashes:
    a gallery file searched by itself must match bit for bit) leave it None.

    ``streams`` (optional, default 1) is how many batches bulk embedding (:func:`lens.embedding.
    embed_files`) should run side by side, each thread reading, decoding, preparing and then calling
    ``embed_stream(items)``: the same vectors as ``embed_prepared``, single-threaded and safe to call
    from several threads at once. With 1, worker threads decode while the calling thread runs
    ``embed_prepared`` on the previous batch. After the last batch, bulk embedding calls
    ``release_streams()`` (optional) so that what the streams held is freed.
    """

    info: MethodInfo

    def prepare(self, image: Image.Image) -> Any:
        """Per-image CPU work on one RGB picture (thread-safe); what ``embed_prepared`` takes."""

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """Vectors of prepared items: ``(n, info.dim)`` float32, L2-normalised, for ``cosine``;
        ``(n, info.dim / 8)`` uint8 packed bits for ``hamming``."""

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors of RGB pictures, as :meth:`embed_prepared` gives them."""


@runtime_checkable
class LearnsFromGallery(Protocol):
    """Optional: a method that learns from the gallery it indexes (SIFT: a visual vocabulary) and
    keeps per-image data in the index build for re-ranking (SIFT: keypoints).

    The gallery calls ``fit`` before embedding a gallery that has no index yet (later builds reuse
    the live build's state through ``load_state``, so unchanged images keep their vectors), writes
    ``save_state(folder, items)`` into every build (``items[i]`` = what ``prepare`` gave for row i;
    the files are checksummed with the rest), and searches with ``load_state(build folder)``.
    """

    def fit(self, paths: Sequence[Path]) -> Method:
        """A new, fitted method learned from these gallery images (this instance is left unchanged)."""

    def save_state(self, folder: Path, items: Sequence[Any]) -> list[str]:
        """Write what was learned and the per-row ``items`` into ``folder``; returns the file names."""

    def load_state(self, folder: Path) -> Method:
        """The fitted method restored from a build folder written by ``save_state``."""

    def stored_item(self, row: int) -> Any:
        """(On a restored method) the stored ``prepare`` output of indexed row ``row``."""


@runtime_checkable
class Reranks(Protocol):
    """Optional: a method that re-orders index candidates with its own check (SIFT: RANSAC inliers)."""

    score_kind: str  #: what its scores are, e.g. ``inliers`` (not similarities in [0, 1])
    candidates: int  #: how many index results it re-ranks by default

    def rerank(self, item: Any, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` candidate rows for the query's prepared ``item``, and their scores."""


@dataclass
class Match:
    """A gallery row found by a method that retrieves from its own index (:class:`MatchesLocally`)."""

    row: int
    votes: float  #: the retrieval score that short-listed it (e.g. inverted-file tf-idf votes)
    inliers: int = 0  #: RANSAC homography inliers; > 0 only for a verified (exact) match
    homography: np.ndarray | None = None  #: (3, 3) float64, query pixels -> result-image pixels
    region: np.ndarray | None = None  #: (4, 2) float32: the query's outline in result-image pixels


@runtime_checkable
class MatchesLocally(Protocol):
    """Optional: a method that finds gallery rows with its own index (local features: an inverted
    file) and verifies them geometrically, instead of searching the gallery's vector index.

    The gallery calls ``match(prepare(whole photo), k, box)``: the subject ``box`` (query pixels,
    x1, y1, x2, y2, or None) focuses the search but the whole photo is kept for verification.
    """

    def match(self, item: Any, k: int, box: Sequence[float] | None = None) -> list[Match]:
        """The best ``k`` rows: verified ones (``inliers`` > 0) first, best first."""


@runtime_checkable
class EmbedsText(Protocol):
    """Optional: a method that also embeds words into its image space (CLIP, SigLIP): its image
    vectors can be searched with text, or with a picture refined by text (:func:`lens.search.search_text`)."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of the texts: ``(n, info.dim)`` float32, L2-normalised, comparable by cosine with
        the method's image vectors."""


class BaseMethod:
    """Convenience base: ``embed`` composed from ``prepare`` and ``embed_prepared``."""

    info: MethodInfo
    decode_size: int | None = None  #: see :class:`Method`; None decodes files at full size
    streams: int = 1  #: see :class:`Method`; 1: one batch at a time, decoding on worker threads

    def prepare(self, image: Image.Image) -> Any:
        """Per-image CPU work on one RGB picture (thread-safe); here the picture itself, unchanged."""
        return image

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:  # pragma: no cover - abstract
        """Vectors of prepared items, as :meth:`Method.embed_prepared`: ``(n, info.dim)`` float32,
        L2-normalised (cosine) or ``(n, info.dim / 8)`` uint8 packed bits (hamming). Subclasses implement it."""
        raise NotImplementedError

    def embed_stream(self, items: Sequence[Any]) -> np.ndarray:
        """The same vectors as :meth:`embed_prepared`, safe to call from several bulk-embedding streams
        at once (see :class:`Method`); here simply :meth:`embed_prepared`."""
        return self.embed_prepared(items)

    def release_streams(self) -> None:
        """Free what the streams of :meth:`embed_stream` held, after the last batch; here nothing."""
        pass

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Vectors of RGB pictures: ``embed_prepared([prepare(i) for i in images])``, shaped as there."""
        return self.embed_prepared([self.prepare(image) for image in images])


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def fingerprint_arrays(named: Sequence[tuple[str, np.ndarray]]) -> str:
    """A short hash of named arrays' values: equal weights give equal fingerprints, wherever loaded."""
    digest = hashlib.sha256()
    for name, array in sorted(named, key=lambda item: item[0]):
        array = np.ascontiguousarray(array)
        digest.update(name.encode())
        digest.update(str(array.dtype).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()[:16]
