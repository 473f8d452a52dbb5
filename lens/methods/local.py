"""Exact-item search with local features: visual words, an inverted file, RANSAC-verified short lists.

The pipeline, in the spirit of Video Google (Sivic & Zisserman 2003), vocabulary trees (Nistér &
Stewénius 2006) and Hamming embedding (Jégou, Douze & Schmid 2008):

1. **Features** (``prepare``): up to ``max_keypoints`` SIFT keypoints (OpenCV) of the image shrunk to
   ``max_side`` pixels, as RootSIFT (Arandjelović & Zisserman 2012). Each keypoint keeps its position
   (in the original image's pixels), its **visual word** (nearest of ``words`` centroids) and a 64-bit
   **Hamming-embedding signature** (the signs of a random orthogonal projection of the descriptor,
   thresholded at per-word medians learned with the vocabulary).
2. **Vocabulary** (:class:`Vocabulary`): ``words`` centroids (65,536 by default) learned by two-level
   k-means with FAISS (a coarse k-means, then each coarse cell split in proportion to its share of
   the descriptors): a two-level vocabulary tree, a descriptor's word being the nearest leaf of its
   nearest cell. It is learned once (from the first gallery indexed, or given as a folder with the
   ``vocabulary=`` option) and saved next to the index, so later galleries and builds reuse it.
3. **Inverted file** (:class:`InvertedFile`): for every visual word, the (image, keypoint, signature)
   postings of the gallery keypoints quantised to it, in CSR form (numpy). A query keypoint votes for
   the gallery keypoints of its word whose signatures differ in at most ``hamming`` bits, weighted by
   ``exp(-h^2 / sigma^2)`` and idf^2; each query keypoint's votes per image are square-rooted (the
   burstiness normalisation of Jégou, Douze & Schmid 2009) and image scores divided by the square
   root of their keypoint count. Adding images appends postings; deleting marks rows dead; neither
   re-extracts the other images.
4. **Spatial verification**: the ``shortlist`` best-scored images are verified with a RANSAC
   homography (OpenCV, MAGSAC++) fitted to the word correspondences the inverted file found (no
   descriptor matching: the stored signatures are enough, as in Philbin et al. 2007). The score is
   the number of inliers (distinct query and gallery keypoints); ``min_inliers`` or more with a
   sane homography marks the result an **exact match**, and the query's outline mapped by the
   homography gives the matched region in the result image.

Memory per indexed keypoint: 14 bytes of postings (int32 image, uint16 keypoint, uint64 signature)
plus 20 bytes in image order (float32 x, y, uint32 word, uint64 signature), i.e. about 34 bytes; a
gallery image keeps at most ``max_keypoints`` of them (see docs/exact-matches.md for measured figures).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from lens.errors import CorruptIndexError, LensError
from lens.images import load_image
from lens.methods import register_method
from lens.types import BaseMethod, Match, MethodInfo, fingerprint_arrays
from lens.methods.sift import extract, root_sift, sample_descriptors

log = logging.getLogger("lens")

BITS = 64  #: Hamming-embedding signature length (one uint64 per keypoint)
#: the files of a saved vocabulary
VOCABULARY_FILES = ("vocabulary-coarse.npy", "vocabulary-centroids.npy", "vocabulary-cells.npy",
                    "vocabulary-projection.npy", "vocabulary-medians.npy")
_INDEX_ARRAYS = ("offsets", "xy", "words", "signatures", "sizes", "alive")  #: image order
_POSTING_ARRAYS = ("starts", "post_rows", "post_keys", "post_signatures")  #: word order


# -- features -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints, quantised.

    ``xy``: (n, 2) float32 positions in the original image's pixels; ``words``: (n,) uint32 visual
    words; ``signatures``: (n,) uint64 Hamming-embedding codes; ``size``: the image's (width, height).
    A query may also carry ``extra_words``: (n, a) further nearest words (multiple assignment).
    """

    xy: np.ndarray
    words: np.ndarray
    signatures: np.ndarray
    size: tuple[int, int]
    extra_words: np.ndarray | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.xy)


def sift_features(image: Image.Image, max_side: int, max_keypoints: int) -> tuple[np.ndarray, np.ndarray]:
    """SIFT keypoints of ``image``: (n, 2) float32 positions in original pixels, (n, 128) uint8 descriptors."""
    found = extract(image, max_side, max_keypoints)
    scale = min(1.0, max_side / max(image.size))
    return (found.xy / scale).astype(np.float32), found.descriptors


# -- vocabulary -----------------------------------------------------------------------------------
class Vocabulary:
    """Visual words as a two-level vocabulary tree: ``coarse`` (cells, 128) float32 centroids, and
    ``centroids`` (words, 128) float32 leaves grouped by cell (cell c owns words
    ``cell_starts[c]:cell_starts[c + 1]``), in RootSIFT space; plus Hamming-embedding parameters
    ``projection`` (64, 128) float32 (orthogonal rows) and ``medians`` (words, 64) float32.

    A descriptor's word is the nearest leaf of its nearest coarse cell (Nistér & Stewénius 2006):
    two small matrix products instead of a search over every word (about 0.4 ms per 1,000
    descriptors per 1,000 words, against 150 ms for an HNSW graph over 16k words here).
    """

    def __init__(self, coarse: np.ndarray, centroids: np.ndarray, cell_starts: np.ndarray,
                 projection: np.ndarray, medians: np.ndarray):
        self.coarse = np.ascontiguousarray(coarse, np.float32)
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self.cell_starts = np.asarray(cell_starts, np.int64)
        self.projection = np.ascontiguousarray(projection, np.float32)
        self.medians = np.ascontiguousarray(medians, np.float32)
        self._coarse_norms = (self.coarse**2).sum(axis=1)
        self._leaf_norms = (self.centroids**2).sum(axis=1)
        self.fingerprint = fingerprint_arrays(
            [("coarse", self.coarse), ("centroids", self.centroids), ("cells", self.cell_starts),
             ("projection", self.projection), ("medians", self.medians)])

    @property
    def words(self) -> int:
        """The number of visual words (leaves of the tree)."""
        return len(self.centroids)

    @classmethod
    def learn(cls, descriptors: np.ndarray, words: int, *, seed: int = 0, iterations: int = 10) -> Vocabulary:
        """Learn ``words`` visual words from RootSIFT ``descriptors`` ((n, 128) float32, n >= words).

        Two-level k-means (FAISS): ``sqrt(words)`` coarse cells, each split into a number of words
        proportional to the descriptors it holds. Raises :class:`LensError` when n < words.
        """
        import faiss

        x = np.ascontiguousarray(descriptors, np.float32)
        if len(x) < words:
            raise LensError(f"{len(x)} SIFT descriptors are too few to learn {words} visual words; "
                            "index more (or more textured) images, or choose fewer words")
        cells = max(1, int(round(np.sqrt(words))))
        top = faiss.Kmeans(x.shape[1], cells, niter=iterations, seed=seed, max_points_per_centroid=512)
        top.train(x)
        coarse = np.asarray(top.centroids, np.float32)
        cell = _nearest(x, coarse, (coarse**2).sum(axis=1))
        share = _proportional(np.bincount(cell, minlength=cells), words)
        leaves, starts = [], [0]
        for c in range(cells):
            members = x[cell == c]
            if share[c] <= 1 or len(members) <= share[c]:
                chosen = members.mean(axis=0, keepdims=True) if share[c] == 1 else members[: share[c]]
            else:
                km = faiss.Kmeans(x.shape[1], int(share[c]), niter=iterations, seed=seed + c + 1,
                                  min_points_per_centroid=1, max_points_per_centroid=128)
                km.train(np.ascontiguousarray(members))
                chosen = km.centroids
            leaves.append(np.asarray(chosen, np.float32).reshape(-1, x.shape[1]))
            starts.append(starts[-1] + len(leaves[-1]))
        rng = np.random.default_rng(seed)
        projection = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))[0][:BITS].astype(np.float32)
        vocabulary = cls(coarse, np.concatenate(leaves), np.array(starts),
                         projection, np.zeros((starts[-1], BITS), np.float32))
        assigned = vocabulary.assign(x)[:, 0]
        vocabulary.medians[:] = _medians_per_word(x @ projection.T, assigned, vocabulary.words)
        return cls(coarse, vocabulary.centroids, vocabulary.cell_starts, projection, vocabulary.medians)

    def assign(self, descriptors: np.ndarray, nearest: int = 1) -> np.ndarray:
        """The ``nearest`` closest words of each RootSIFT descriptor within its cell: (n, nearest) int64
        (a word repeats when its cell has fewer than ``nearest`` words)."""
        x = np.ascontiguousarray(descriptors, np.float32)
        found = np.zeros((len(x), nearest), np.int64)
        if len(x) == 0:
            return found
        cell = _nearest(x, self.coarse, self._coarse_norms)
        order = np.argsort(cell, kind="stable")
        bounds = np.flatnonzero(np.r_[True, cell[order][1:] != cell[order][:-1], True])
        for first, last in zip(bounds[:-1], bounds[1:]):
            members = order[first:last]
            c = cell[members[0]]
            low, high = self.cell_starts[c], self.cell_starts[c + 1]
            distance = self._leaf_norms[low:high] - 2.0 * (x[members] @ self.centroids[low:high].T)
            if nearest == 1 or high - low == 1:
                best = distance.argmin(axis=1)[:, None].repeat(nearest, axis=1)
            else:
                width = min(nearest, high - low)
                best = np.argpartition(distance, width - 1, axis=1)[:, :width]
                best = np.take_along_axis(best, np.argsort(np.take_along_axis(distance, best, 1), 1), 1)
                best = np.pad(best, ((0, 0), (0, nearest - width)), mode="edge")
            found[members] = low + best
        return found

    def signatures(self, descriptors: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Hamming-embedding codes (n,) uint64 of RootSIFT ``descriptors`` assigned to ``words`` (n,)."""
        bits = (descriptors @ self.projection.T) > self.medians[words]
        return np.packbits(bits, axis=1, bitorder="little").view(np.uint64)[:, 0].copy()

    def quantise(self, xy: np.ndarray, descriptors: np.ndarray, size: tuple[int, int],
                 nearest: int = 1) -> LocalFeatures:
        """Features of one image from its keypoints ((n, 2) positions, (n, 128) uint8 SIFT)."""
        root = root_sift(descriptors)
        found = self.assign(root, nearest)
        words = found[:, 0]
        return LocalFeatures(
            np.asarray(xy, np.float32), words.astype(np.uint32), self.signatures(root, words), size,
            found[:, 1:] if nearest > 1 else None)

    def save(self, folder: Path) -> list[str]:
        """Write the vocabulary into ``folder`` (created if needed); returns the file names."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = (self.coarse, self.centroids, self.cell_starts, self.projection, self.medians)
        for name, array in zip(VOCABULARY_FILES, arrays):
            np.save(folder / name, array)
        return list(VOCABULARY_FILES)

    @classmethod
    def load(cls, folder: Path) -> Vocabulary:
        """The vocabulary saved in ``folder``; raises :class:`CorruptIndexError` when unreadable."""
        try:
            coarse, centroids, starts, projection, medians = (np.load(folder / n) for n in VOCABULARY_FILES)
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"cannot read the visual vocabulary in {folder}: {exc}") from exc
        if (centroids.ndim != 2 or medians.shape != (len(centroids), BITS) or projection.shape[0] != BITS
                or len(starts) != len(coarse) + 1 or int(starts[-1]) != len(centroids)):
            raise CorruptIndexError(f"the visual vocabulary in {folder} has inconsistent shapes")
        return cls(coarse, centroids, starts, projection, medians)


def _nearest(x: np.ndarray, centroids: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2) of each row of ``x``, in blocks of 65,536 rows."""
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), 65536):
        block = x[start : start + 65536]
        out[start : start + len(block)] = (norms - 2.0 * (block @ centroids.T)).argmin(axis=1)
    return out


def _proportional(counts: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``counts`` summing to ``total`` (largest remainders), each <= its count."""
    exact = counts / max(1, counts.sum()) * total
    share = np.minimum(np.floor(exact).astype(np.int64), counts)
    remainder = exact - share
    while share.sum() < total:
        room = share < counts
        if not room.any():
            break
        need = total - int(share.sum())
        order = np.argsort(-np.where(room, remainder, -np.inf), kind="stable")[: min(need, int(room.sum()))]
        share[order] += 1
        remainder[order] = 0
    return share


def _medians_per_word(projected: np.ndarray, words: np.ndarray, count: int) -> np.ndarray:
    """Per word, the median of each projected component of its descriptors (global median if none)."""
    medians = np.tile(np.median(projected, axis=0), (count, 1)).astype(np.float32)
    order = np.argsort(words, kind="stable")
    sorted_words = words[order]
    starts = np.searchsorted(sorted_words, np.arange(count))
    ends = np.searchsorted(sorted_words, np.arange(count), side="right")
    present = np.nonzero(ends > starts)[0]
    for bit in range(projected.shape[1]):
        values = projected[order, bit]
        # sort each word's values: lexsort by (value, word)
        within = np.lexsort((values, sorted_words))
        ranked = values[within]
        middle = (starts[present] + ends[present] - 1) / 2.0
        medians[present, bit] = (ranked[np.floor(middle).astype(np.int64)]
                                 + ranked[np.ceil(middle).astype(np.int64)]) / 2.0
    return medians


# -- inverted file --------------------------------------------------------------------------------
class InvertedFile:
    """Gallery keypoints by visual word (CSR postings), with their positions in image order.

    Image order (per row ``r``: keypoints ``offsets[r]:offsets[r + 1]``): ``xy`` (m, 2) float32,
    ``words`` (m,) uint32, ``signatures`` (m,) uint64, ``sizes`` (rows, 2) int32 (width, height),
    ``alive`` (rows,) bool (deleted rows stay as dead rows). Word order: ``starts`` (words + 1,)
    int64 and postings ``post_rows`` int32, ``post_keys`` uint16 (keypoint within its image),
    ``post_signatures`` uint64.
    """

    def __init__(self, words: int, offsets: np.ndarray, xy: np.ndarray, word_ids: np.ndarray,
                 signatures: np.ndarray, sizes: np.ndarray, alive: np.ndarray,
                 postings: dict[str, np.ndarray] | None = None):
        self.word_count = words
        self.offsets, self.xy, self.words, self.signatures = offsets, xy, word_ids, signatures
        self.sizes, self.alive = sizes, alive
        if postings is None:
            self._index_postings()
        else:  # as saved: no re-sorting when a build is opened
            for name in _POSTING_ARRAYS:
                setattr(self, name, postings[name])
            self._weigh()

    @classmethod
    def build(cls, words: int, features: Sequence[LocalFeatures]) -> InvertedFile:
        """An inverted file over ``features`` (row i = features[i])."""
        offsets = np.zeros(len(features) + 1, np.int64)
        offsets[1:] = np.cumsum([len(f) for f in features])

        def joined(name: str, dtype: type, width: int | None = None) -> np.ndarray:
            parts = [np.asarray(getattr(f, name), dtype) for f in features]
            empty = np.zeros((0, width) if width else 0, dtype)
            return np.concatenate(parts) if parts else empty

        sizes = np.array([f.size for f in features], np.int32).reshape(-1, 2)
        return cls(words, offsets, joined("xy", np.float32, 2), joined("words", np.uint32),
                   joined("signatures", np.uint64), sizes, np.ones(len(features), bool))

    def _index_postings(self) -> None:
        rows = np.repeat(np.arange(len(self.sizes), dtype=np.int32), np.diff(self.offsets))
        keys = (np.arange(len(rows), dtype=np.int64) - np.repeat(self.offsets[:-1], np.diff(self.offsets)))
        order = np.argsort(self.words, kind="stable")  # stable: rows stay sorted within a word
        self.post_rows = rows[order]
        self.post_keys = keys[order].astype(np.uint16)
        self.post_signatures = np.asarray(self.signatures)[order]
        self.starts = np.zeros(self.word_count + 1, np.int64)
        self.starts[1:] = np.cumsum(np.bincount(np.asarray(self.words), minlength=self.word_count))
        self._weigh()

    def _weigh(self) -> None:
        """idf per word (over alive rows) and each row's normaliser, sqrt of its keypoint count."""
        live = self.alive[self.post_rows]
        sorted_words = np.repeat(np.arange(self.word_count), np.diff(self.starts))
        first = np.ones(len(self.post_rows), bool)  # first posting of each (word, row) pair
        first[1:] = (sorted_words[1:] != sorted_words[:-1]) | (self.post_rows[1:] != self.post_rows[:-1])
        df = np.bincount(sorted_words[first & live], minlength=self.word_count)
        alive_rows = max(1, int(self.alive.sum()))
        self.idf = np.where(df > 0, np.log(alive_rows / np.maximum(df, 1)), 0.0).astype(np.float32)
        counts = np.diff(self.offsets).astype(np.float32)
        self.norms = np.where(self.alive, np.sqrt(np.maximum(counts, 1.0)), np.inf).astype(np.float32)

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, features: Sequence[LocalFeatures]) -> np.ndarray:
        """Append images (nothing already indexed is touched); returns their new rows."""
        first = len(self)
        extra = InvertedFile.build(self.word_count, features)
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + extra.offsets[1:]])
        self.xy = np.concatenate([self.xy, extra.xy])
        self.words = np.concatenate([self.words, extra.words])
        self.signatures = np.concatenate([self.signatures, extra.signatures])
        self.sizes = np.concatenate([self.sizes, extra.sizes])
        self.alive = np.concatenate([self.alive, extra.alive])
        self._index_postings()
        return np.arange(first, len(self), dtype=np.int64)

    def delete(self, rows: Sequence[int]) -> None:
        """Mark ``rows`` deleted: they are never returned again (their postings stay until a rebuild)."""
        self.alive = np.array(self.alive, copy=True)
        self.alive[np.asarray(rows, np.int64)] = False
        self._weigh()

    def features(self, row: int) -> LocalFeatures:
        """The stored features of ``row`` (positions, words, signatures, size)."""
        start, end = self.offsets[row], self.offsets[row + 1]
        width, height = (int(v) for v in self.sizes[row])
        return LocalFeatures(np.asarray(self.xy[start:end]), np.asarray(self.words[start:end]),
                             np.asarray(self.signatures[start:end]), (width, height))

    def vote(self, query: LocalFeatures, hamming: int, sigma: float,
             weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Score every row for ``query``; returns (scores (rows,) float32, correspondences (c, 3) int64
        of (query keypoint, row, keypoint within row)) of the Hamming-filtered word matches.

        ``weights`` ((n,) float32, default 1) scale each query keypoint's votes.
        """
        qwords = np.asarray(query.words, np.int64)
        qkeys = np.arange(len(qwords), dtype=np.int64)
        qsigs = np.asarray(query.signatures)
        if query.extra_words is not None and query.extra_words.size:
            extra = query.extra_words
            qwords = np.concatenate([qwords, extra.reshape(-1)])
            qkeys = np.concatenate([qkeys, np.repeat(np.arange(len(extra)), extra.shape[1])])
            qsigs = np.concatenate([qsigs, np.repeat(qsigs, extra.shape[1])])
        begin, end = self.starts[qwords], self.starts[qwords + 1]
        lengths = end - begin
        total = int(lengths.sum())
        scores = np.zeros(len(self), np.float32)
        if total == 0:
            return scores, np.zeros((0, 3), np.int64)
        shift = np.repeat(begin - (np.cumsum(lengths) - lengths), lengths)
        positions = np.arange(total, dtype=np.int64) + shift
        distance = np.bitwise_count(self.post_signatures[positions] ^ np.repeat(qsigs, lengths))
        keep = distance <= hamming
        positions, distance = positions[keep], distance[keep]
        entry_query = np.repeat(qkeys, lengths)[keep]
        entry_word = np.repeat(qwords, lengths)[keep]
        rows = self.post_rows[positions].astype(np.int64)
        table = np.exp(-(np.arange(BITS + 1, dtype=np.float32) ** 2) / sigma**2)
        value = table[distance] * self.idf[entry_word] ** 2
        if weights is not None:
            value = value * weights[entry_query]
        # burstiness: one query keypoint's votes for one image are summed, then square-rooted
        pair = entry_query * len(self) + rows
        order = np.argsort(pair, kind="stable")
        pair_sorted = pair[order]
        bounds = np.flatnonzero(np.r_[True, pair_sorted[1:] != pair_sorted[:-1]])
        sums = np.add.reduceat(value[order], bounds) if len(bounds) else np.zeros(0, np.float32)
        np.add.at(scores, rows[order][bounds], np.sqrt(sums))
        scores /= self.norms
        found = np.stack([entry_query, rows, self.post_keys[positions].astype(np.int64)], axis=1)
        return scores, found

    def save(self, folder: Path) -> list[str]:
        """Write the image-order arrays and the postings into ``folder``; returns the file names."""
        names = []
        for name in (*_INDEX_ARRAYS, *_POSTING_ARRAYS):
            np.save(folder / f"local-{name}.npy", np.asarray(getattr(self, name)))
            names.append(f"local-{name}.npy")
        return names

    @classmethod
    def load(cls, folder: Path, words: int) -> InvertedFile:
        """The inverted file saved in ``folder`` (image-order arrays memory-mapped: only verified rows'
        positions are read); raises :class:`CorruptIndexError` when unreadable or inconsistent."""
        try:
            arrays = {name: np.load(folder / f"local-{name}.npy",
                                    mmap_mode="r" if name in ("xy", "words", "signatures") else None)
                      for name in (*_INDEX_ARRAYS, *_POSTING_ARRAYS)}
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"cannot read the inverted file in {folder}: {exc}") from exc
        keypoints = int(arrays["offsets"][-1]) if len(arrays["offsets"]) else -1
        if (len(arrays["offsets"]) != len(arrays["sizes"]) + 1 or keypoints != len(arrays["xy"])
                or len(arrays["starts"]) != words + 1 or len(arrays["post_rows"]) != keypoints):
            raise CorruptIndexError(f"the inverted file in {folder} does not fit its vocabulary of {words} "
                                    "words or has inconsistent arrays")
        return cls(words, *(arrays[name] for name in _INDEX_ARRAYS),
                   postings={name: arrays[name] for name in _POSTING_ARRAYS})


# -- spatial verification -------------------------------------------------------------------------
def verify(query_xy: np.ndarray, other_xy: np.ndarray, pairs: np.ndarray, threshold: float
           ) -> tuple[int, np.ndarray | None]:
    """RANSAC homography (MAGSAC++) over correspondences ``pairs`` ((c, 2): query keypoint, other keypoint).

    Returns (inliers = distinct keypoints on the side with fewer, homography query -> other (3, 3)
    float64 or None); (0, None) with fewer than 6 correspondences or no model found.
    """
    if len(pairs) < 6:
        return 0, None
    src = query_xy[pairs[:, 0]].astype(np.float32)
    dst = other_xy[pairs[:, 1]].astype(np.float32)
    homography, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, threshold, maxIters=2000,
                                          confidence=0.999)
    if homography is None or mask is None:
        return 0, None
    kept = pairs[mask.ravel().astype(bool)]
    return min(len(np.unique(kept[:, 0])), len(np.unique(kept[:, 1]))), homography


def _project(points: np.ndarray, homography: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``points`` (n, 2) mapped by ``homography``: (n, 2) positions and (n,) homogeneous w."""
    mapped = np.c_[points, np.ones(len(points))] @ homography.T
    w = mapped[:, 2]
    return mapped[:, :2] / np.where(np.abs(w) < 1e-12, 1e-12, w)[:, None], w


def _corners(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    return np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)


def plausible(homography: np.ndarray | None, other_size: tuple[int, int]) -> bool:
    """Whether a query -> other homography looks like a real view of a plane: the other image's
    outline seen in the query is in front of the camera, convex, and not collapsed or exploded
    (area change within 1/1000..1000)."""
    if homography is None or not np.all(np.isfinite(homography)):
        return False
    try:
        inverse = np.linalg.inv(homography)
    except np.linalg.LinAlgError:
        return False
    outline, w = _project(_corners(other_size), inverse)
    if not (np.all(w > 0) or np.all(w < 0)) or not np.all(np.isfinite(outline)):
        return False
    area = abs(cv2.contourArea(outline.astype(np.float32)))
    other_area = float(other_size[0] * other_size[1])
    if not (other_area / 1000 < area < other_area * 1000):
        return False
    return bool(cv2.isContourConvex(outline.astype(np.float32).reshape(-1, 1, 2)))


def matched_region(homography: np.ndarray, query_size: tuple[int, int], query_xy: np.ndarray) -> np.ndarray:
    """The query's outline in the result image: (4, 2) float32 result-image pixels, corners in the
    order top-left, top-right, bottom-right, bottom-left of the query.

    When a query corner maps behind the camera (a wide photo whose plane recedes past the horizon),
    the outline of the query's matched keypoints (their bounding box) is mapped instead.
    """
    outline, w = _project(_corners(query_size), homography)
    if not (np.all(w > 0) or np.all(w < 0)):
        (x1, y1), (x2, y2) = query_xy.min(axis=0), query_xy.max(axis=0)
        outline, _ = _project(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64), homography)
    return outline.astype(np.float32)


# -- the method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalConfig:
    """The ``local`` method's settings (spec options ``local:words=16384,...``; units in each field's comment).

    The defaults (65,536 words, 1,000 keypoints per image shrunk to 640 pixels, a Hamming threshold of 24
    of 64 bits, 50 images verified, 10 RANSAC inliers for an exact match) are compared with their
    alternatives on INRIA Holidays in docs/exact-matches.md.
    """

    max_side: int = 640  #: images are shrunk to at most this many pixels on their longer side
    max_keypoints: int = 1000  #: the strongest SIFT keypoints kept per image (gallery and query)
    words: int = 65536  #: visual words learned when no ``vocabulary`` is given
    vocabulary: str = ""  #: folder of a saved vocabulary to use ("" = learn one from the gallery)
    hamming: int = 24  #: largest Hamming distance (of 64 bits) between matching signatures
    sigma: float = 16.0  #: Hamming-distance weighting exp(-h^2 / sigma^2)
    assign: int = 1  #: visual words per query keypoint (multiple assignment)
    shortlist: int = 50  #: best-voted images verified with RANSAC
    ransac_threshold: float = 6.0  #: RANSAC reprojection error, pixels of the gallery image
    min_inliers: int = 10  #: verified inliers that make a result an exact match
    outside_box: float = 0.5  #: weight of query keypoints outside the subject box (given one)
    fit_images: int = 2000  #: the vocabulary is learned from at most this many gallery images
    fit_descriptors: int = 1_000_000  #: ... and at most this many descriptors in all


class LocalMatcher(BaseMethod):
    """Exact-item search: visual words + Hamming embedding + inverted file + RANSAC (see the module).

    As a :class:`~lens.types.Method` it gives a 1-d placeholder vector per image (its
    retrieval is its own inverted file, :meth:`match`: a :class:`~lens.types.MatchesLocally` method, so
    its builds hold no vector index); it learns from the gallery
    (:class:`~lens.types.LearnsFromGallery`: the vocabulary, unless ``vocabulary=`` names a
    saved one) and keeps every indexed image's quantised keypoints in the build.
    """

    score_kind = "inliers"

    def __init__(self, name: str, config: LocalConfig, vocabulary: Vocabulary | None = None,
                 inverted: InvertedFile | None = None):
        self.config, self.vocabulary, self.inverted = config, vocabulary, inverted
        self.decode_size = config.max_side
        self.info = MethodInfo(
            name=name, metric="cosine", dim=1, model=config.vocabulary,
            # what the stored features depend on: the vocabulary and the extraction settings
            weights="" if vocabulary is None else (
                f"{vocabulary.fingerprint}/{config.max_side}px/{config.max_keypoints}kp/{config.assign}w"),
            extra={"descriptor": "RootSIFT", "retrieval": "inverted file + Hamming embedding + RANSAC",
                   "opencv": cv2.__version__, **asdict(config)},
        )

    # -- features ----------------------------------------------------------------------------------
    def _vocabulary(self) -> Vocabulary:
        if self.vocabulary is None:
            if self.config.vocabulary:
                self.vocabulary = Vocabulary.load(Path(self.config.vocabulary).expanduser())
            else:
                raise LensError(f"method '{self.info.name}' needs a visual vocabulary: index a gallery "
                                f"first (`lens index GALLERY --methods {self.info.name}`), or give a saved "
                                "one with the vocabulary= option")
        return self.vocabulary

    def prepare(self, image: Image.Image) -> LocalFeatures:
        """The picture's quantised keypoints (:class:`LocalFeatures`): up to ``max_keypoints`` RootSIFT keypoints
        of the image shrunk to ``max_side`` pixels, positions in the original image's pixels, each with its
        visual word(s) and 64-bit signature. Raises :class:`LensError` when there is no vocabulary yet."""
        xy, descriptors = sift_features(image, self.config.max_side, self.config.max_keypoints)
        return self._vocabulary().quantise(xy, descriptors, image.size, self.config.assign)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """A ``(n, 1)`` float32 placeholder of ones: the method retrieves with its own inverted file
        (:meth:`match`), so no vector index is built over these (:func:`lens.indexing.build_index`)."""
        return np.ones((len(items), 1), np.float32)

    # -- learning from the gallery -------------------------------------------------------------------
    def fit(self, paths: Sequence[Path]) -> LocalMatcher:
        """This method with a vocabulary: the saved one named by ``vocabulary=``, else one learned
        from (an even sample of) ``paths``."""
        if self.config.vocabulary:
            return LocalMatcher(self.info.name, self.config, self._vocabulary())
        descriptors = sample_descriptors(paths, self._descriptors, self.config.fit_images,
                                         self.config.fit_descriptors, "local")
        words = min(self.config.words, max(1, len(descriptors) // 8))
        if words < self.config.words:
            log.warning("%s: %d descriptors from the gallery's images; learning %d visual words instead of %d",
                        self.info.name, len(descriptors), words, self.config.words)
        return LocalMatcher(self.info.name, self.config, Vocabulary.learn(descriptors, words))

    def _descriptors(self, path: Path) -> np.ndarray | None:
        try:
            return sift_features(load_image(path), self.config.max_side, self.config.max_keypoints)[1]
        except LensError as exc:
            log.warning("skipped %s while learning the visual vocabulary: %s", path, exc)
            return None

    def save_state(self, folder: Path, items: Sequence[LocalFeatures]) -> list[str]:
        """Write the vocabulary and the inverted file over ``items`` (row order) into ``folder``."""
        vocabulary = self._vocabulary()
        return [*vocabulary.save(folder), *InvertedFile.build(vocabulary.words, items).save(folder)]

    def load_state(self, folder: Path) -> LocalMatcher:
        """This method with the vocabulary and inverted file of a build folder."""
        vocabulary = Vocabulary.load(folder)
        return LocalMatcher(self.info.name, self.config, vocabulary, InvertedFile.load(folder, vocabulary.words))

    def stored_item(self, row: int) -> LocalFeatures:
        """The quantised keypoints of indexed row ``row`` (from the inverted file). Raises :class:`LensError`
        before :meth:`load_state`."""
        if self.inverted is None:
            raise LensError(f"method '{self.info.name}' has no stored keypoints (load_state first)")
        return self.inverted.features(row)

    # -- searching -----------------------------------------------------------------------------------
    def match(self, query: LocalFeatures, k: int, box: Sequence[float] | None = None) -> list[Match]:
        """The ``k`` best gallery rows for ``query``: verified ones (by inliers) first, then the others
        by votes. The ``shortlist`` best-voted rows are verified. ``box`` = (x1, y1, x2, y2) query pixels: keypoints outside it vote
        with weight ``outside_box`` (the whole photo is still used for verification).
        """
        if self.inverted is None:
            raise LensError(f"method '{self.info.name}' has no inverted file (load_state first)")
        config, inverted = self.config, self.inverted
        weights = None
        if box is not None and len(query):
            x1, y1, x2, y2 = box
            inside = ((query.xy[:, 0] >= x1) & (query.xy[:, 0] <= x2)
                      & (query.xy[:, 1] >= y1) & (query.xy[:, 1] <= y2))
            weights = np.where(inside, 1.0, config.outside_box).astype(np.float32)
        scores, found = inverted.vote(query, config.hamming, config.sigma, weights)
        scores[~inverted.alive] = 0
        count = min(max(k, config.shortlist), int((scores > 0).sum()))
        if count == 0:
            return []
        short = np.argpartition(-scores, count - 1)[:count]
        short = short[np.argsort(-scores[short], kind="stable")]
        matches = {int(row): Match(int(row), float(scores[row])) for row in short}
        found = found[np.isin(found[:, 1], short[: config.shortlist])]  # only the short list is verified
        found = found[np.argsort(found[:, 1], kind="stable")]
        bounds = np.flatnonzero(np.r_[True, found[1:, 1] != found[:-1, 1], True]) if len(found) else []
        for first, last in zip(bounds[:-1], bounds[1:]):
            match = matches[int(found[first, 1])]
            other = inverted.features(match.row)
            pairs = found[first:last][:, [0, 2]]
            inliers, homography = verify(query.xy, other.xy, pairs, config.ransac_threshold)
            if inliers >= config.min_inliers and plausible(homography, other.size):
                match.inliers, match.homography = inliers, homography
                match.region = matched_region(homography, query.size, query.xy[pairs[:, 0]])
        ranked = sorted(matches.values(), key=lambda m: (-m.inliers, -m.votes))
        return ranked[:k]


def _factory(spec: str, model: str | None = None, **options: Any) -> LocalMatcher:
    try:
        config = replace(LocalConfig(), **options)
    except TypeError:
        raise LensError(f"unknown local option(s) in {sorted(options)}; known: "
                        f"{', '.join(LocalConfig.__dataclass_fields__)}") from None
    if model:  # --model local=FOLDER: a saved vocabulary
        config = replace(config, vocabulary=model)
    return LocalMatcher(spec, config)


register_method("local")(_factory)
