"""SIFT keypoints: a VLAD vector per image finds candidates, RANSAC-verified matches rank them.

The pipeline (OpenCV for SIFT, matching and RANSAC; FAISS k-means for the vocabulary):

1. ``prepare``: the greyscale image, shrunk to at most ``max_side`` pixels, gives up to
   ``max_keypoints`` SIFT keypoints (the strongest). Descriptors are kept as OpenCV makes them,
   integers 0..255 (stored as uint8, losslessly); RootSIFT (L1-normalise, square root) is applied
   when they are compared.
2. ``fit``: a vocabulary of ``words`` visual words is learned by k-means from RootSIFT descriptors
   of (a sample of) the gallery, before the gallery is embedded. The gallery calls it once per
   index; later builds of the same index reuse the vocabulary, so unchanged images are not
   embedded again.
3. ``embed``: each image becomes a VLAD vector (``words * 128`` floats): per word, the sum of the
   residuals of the descriptors assigned to it, intra-normalised, signed square root, L2-normalised.
   These are searched by cosine in the method's vector index (the gallery's default index).
4. ``rerank``: the top ``candidates`` (default 50) are matched to the query (2-NN ratio test on
   RootSIFT, ``ratio`` 0.8) and the matches verified with a RANSAC homography (MAGSAC++,
   ``ransac_threshold`` pixels). The score is the number of inliers, not a similarity in [0, 1].
   Re-ranking every gallery image (``rerank="all"``) is brute-force matching: the reference, and
   fine for small galleries.

What an index build keeps for re-ranking, next to the vectors (a few files in the build folder,
loaded memory-mapped): the vocabulary, and every image's keypoint positions (float32 x, y) and
descriptors (uint8), about 136 bytes per keypoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from lens.errors import CorruptIndexError, LensError
from lens.images import load_image
from lens.methods import register_method
from lens.types import BaseMethod, MethodInfo, fingerprint_arrays

log = logging.getLogger("lens")

VOCABULARY, OFFSETS, KEYPOINTS, DESCRIPTORS = (
    "sift-vocabulary.npy", "sift-offsets.npy", "sift-keypoints.npy", "sift-descriptors.npy",
)
MIN_MATCHES = 5  #: fewer ratio-test matches than this score 0 inliers (a homography needs 4)
_RERANK_BATCH = 64  #: gallery images whose keypoints are read and matched together
_MATCH_BLOCK = 8_000_000  #: similarity-matrix entries per matrix product in ratio_matches (32 MB)


@dataclass(frozen=True)
class SiftConfig:
    """The ``sift`` method's settings (spec options ``sift:words=128,...``; units in each field's comment).
    The ratio test is Lowe's (IJCV 2004), RootSIFT Arandjelović & Zisserman's (CVPR 2012), VLAD Jégou et
    al.'s (CVPR 2010).
    """

    max_side: int = 640  #: images are shrunk to at most this many pixels on their longer side
    max_keypoints: int = 1000  #: the strongest keypoints kept per image
    words: int = 64  #: VLAD vocabulary size; vectors have words * 128 dimensions
    candidates: int = 50  #: how many index results ``rerank`` verifies by default
    ratio: float = 0.8  #: Lowe's ratio test on RootSIFT distances
    ransac_threshold: float = 5.0  #: RANSAC reprojection error, pixels of the resized image
    fit_images: int = 100  #: the vocabulary is learned from at most this many gallery images
    fit_descriptors: int = 100_000  #: ... and at most this many descriptors in all


@dataclass(frozen=True)
class Features:
    """An image's keypoints: positions (n x 2 float32, resized pixels) and descriptors (n x 128 uint8)."""

    xy: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)


def extract(image: Image.Image, max_side: int, max_keypoints: int) -> Features:
    """SIFT keypoints of ``image`` shrunk to ``max_side``, the ``max_keypoints`` strongest."""
    gray = np.asarray(image.convert("L"))
    scale = max_side / max(gray.shape)
    if scale < 1:
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=max_keypoints).detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    keypoints, descriptors = keypoints[:max_keypoints], descriptors[:max_keypoints]
    xy = np.array([k.pt for k in keypoints], dtype=np.float32)
    return Features(xy, np.clip(np.rint(descriptors), 0, 255).astype(np.uint8))


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman 2012): L1-normalise, then square root; rows have unit L2 norm."""
    values = descriptors.astype(np.float32)
    values /= np.maximum(values.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(values)


def sample_descriptors(paths: Sequence[Path], describe: Callable[[Path], np.ndarray | None], images: int,
                       total: int, name: str) -> np.ndarray:
    """RootSIFT descriptors to learn a visual vocabulary from: ``describe(path)`` (raw SIFT, ``(n, 128)``,
    or None for an unreadable file) of an even sample of at most ``images`` of ``paths``, two files at a
    time, then at most ``total`` descriptors in all, an equal share per image (seeded). Returns
    ``(m, 128)`` float32, unit rows (``(0, 128)`` when nothing could be read)."""
    step = max(1, len(paths) // images)
    sample = list(paths)[::step][:images]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"lens-{name}-fit") as pool:
        found = [d for d in pool.map(describe, sample) if d is not None and len(d)]
    per_image = max(1, total // max(1, len(found)))
    rng = np.random.default_rng(0)
    chosen = [d if len(d) <= per_image else d[rng.choice(len(d), per_image, replace=False)] for d in found]
    return root_sift(np.concatenate(chosen)) if chosen else np.zeros((0, 128), np.float32)


def vlad(descriptors: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """The VLAD vector of RootSIFT ``descriptors``: intra-normalised, signed square root, L2-normalised."""
    words, dim = vocabulary.shape
    if len(descriptors) == 0:
        return np.zeros(words * dim, np.float32)
    nearest = np.argmin((vocabulary**2).sum(axis=1) - 2.0 * descriptors @ vocabulary.T, axis=1)
    assign = np.zeros((len(descriptors), words), np.float32)
    assign[np.arange(len(descriptors)), nearest] = 1.0
    residuals = assign.T @ descriptors - assign.sum(axis=0)[:, None] * vocabulary
    residuals /= np.maximum(np.linalg.norm(residuals, axis=1, keepdims=True), 1e-12)
    vector = residuals.reshape(-1)
    vector = np.sign(vector) * np.sqrt(np.abs(vector))
    return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)


def ratio_matches(query: np.ndarray, others: Sequence[np.ndarray], ratio: float) -> list[np.ndarray]:
    """Lowe's ratio-test matches of the ``query`` descriptors in each of ``others`` (all RootSIFT).

    For each other image, an array of (query row, other row) pairs: the pairs whose nearest
    neighbour in L2 is closer than ``ratio`` times the second nearest, exactly what
    ``cv2.BFMatcher(cv2.NORM_L2).knnMatch(query, other, k=2)`` and the test give, but batched into
    one matrix product per group of images (unit vectors: squared distance = 2 - 2 * dot).
    """
    found: list[np.ndarray] = []
    empty = np.zeros((0, 2), np.int64)
    budget = max(1, _MATCH_BLOCK // max(1, len(query)))  # other keypoints per matrix product
    start = 0
    while start < len(others):
        end, size = start, 0
        while end < len(others) and (end == start or size + len(others[end]) <= budget):
            size += len(others[end])
            end += 1
        group = others[start:end]
        dots = np.concatenate(group) @ query.T if size and len(query) else None
        bounds = np.cumsum([0] + [len(o) for o in group])
        for first, last in zip(bounds[:-1], bounds[1:]):
            if last - first < 2 or dots is None:
                found.append(empty)
                continue
            block = dots[first:last]
            columns = np.arange(block.shape[1])
            nearest = block.argmax(axis=0)
            best = block[nearest, columns]
            block[nearest, columns] = -np.inf
            second = block.max(axis=0)
            keep = np.maximum(2 - 2 * best, 0) < ratio**2 * np.maximum(2 - 2 * second, 0)
            found.append(np.stack([np.nonzero(keep)[0], nearest[keep]], axis=1))
        start = end
    return found


def verified_inliers(query_xy: np.ndarray, other_xy: np.ndarray, matches: np.ndarray,
                     threshold: float) -> int:
    """How many of the ``matches`` (query row, other row) a RANSAC homography (MAGSAC++) confirms."""
    if len(matches) < MIN_MATCHES:
        return 0
    _, mask = cv2.findHomography(query_xy[matches[:, 0]], other_xy[matches[:, 1]], cv2.USAC_MAGSAC,
                                 threshold)
    return int(mask.sum()) if mask is not None else 0


def count_inliers(query: Features, other: Features, ratio: float = 0.8, threshold: float = 5.0) -> int:
    """How many ratio-test RootSIFT matches between two images a RANSAC homography confirms."""
    matches = ratio_matches(root_sift(query.descriptors), [root_sift(other.descriptors)], ratio)[0]
    return verified_inliers(query.xy, other.xy, matches, threshold)


class FeatureStore:
    """Every indexed image's keypoints, in row order, memory-mapped from a build folder."""

    def __init__(self, offsets: np.ndarray, xy: np.ndarray, descriptors: np.ndarray):
        self.offsets, self.xy, self.descriptors = offsets, xy, descriptors

    @classmethod
    def from_features(cls, features: Sequence[Features]) -> FeatureStore:
        """A store of ``features`` in row order: ``offsets`` (n + 1,) int64 (row i's keypoints are
        ``offsets[i]:offsets[i + 1]``), ``xy`` (total, 2) float32, ``descriptors`` (total, 128) uint8."""
        offsets = np.zeros(len(features) + 1, np.int64)
        offsets[1:] = np.cumsum([len(f) for f in features])
        xy = np.concatenate([f.xy for f in features]) if features else np.zeros((0, 2), np.float32)
        descriptors = (np.concatenate([f.descriptors for f in features]) if features
                       else np.zeros((0, 128), np.uint8))
        return cls(offsets, xy.astype(np.float32), descriptors.astype(np.uint8))

    def save(self, folder: Path) -> list[str]:
        """Write the three arrays as ``.npy`` files into ``folder``; returns their names."""
        for name, array in ((OFFSETS, self.offsets), (KEYPOINTS, self.xy), (DESCRIPTORS, self.descriptors)):
            np.save(folder / name, array)
        return [OFFSETS, KEYPOINTS, DESCRIPTORS]

    @classmethod
    def load(cls, folder: Path) -> FeatureStore:
        """The store saved in ``folder`` (keypoints and descriptors memory-mapped). Raises ``OSError`` /
        ``ValueError`` for missing or damaged files (:meth:`Sift.load_state` turns them into
        :class:`~lens.errors.CorruptIndexError`)."""
        return cls(np.load(folder / OFFSETS), np.load(folder / KEYPOINTS, mmap_mode="r"),
                   np.load(folder / DESCRIPTORS, mmap_mode="r"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> Features:
        start, end = self.offsets[row], self.offsets[row + 1]
        return Features(np.asarray(self.xy[start:end]), np.asarray(self.descriptors[start:end]))


class Sift(BaseMethod):
    """SIFT + VLAD candidates + RANSAC re-ranking; needs ``fit`` (or ``load_state``) before ``embed``."""

    score_kind = "inliers"  #: what ``rerank`` scores are

    def __init__(self, name: str, config: SiftConfig, vocabulary: np.ndarray | None = None,
                 features: FeatureStore | None = None):
        self.config, self.vocabulary, self.features = config, vocabulary, features
        self.decode_size = config.max_side  # both sides at least this: the longer one is shrunk to it
        settings = np.array([config.max_side, config.max_keypoints, config.words], np.int64)
        self.info = MethodInfo(
            name=name,
            metric="cosine",
            dim=config.words * 128,
            model="",
            # what the vectors depend on: the vocabulary and the extraction settings
            weights="" if vocabulary is None else fingerprint_arrays(
                [("vocabulary", vocabulary), ("settings", settings)]),
            extra={"descriptor": "RootSIFT", "aggregation": "VLAD", "opencv": cv2.__version__,
                   **asdict(config)},
        )

    @property
    def candidates(self) -> int:
        """How many index candidates :meth:`rerank` verifies by default (``candidates``, 50)."""
        return self.config.candidates

    # -- embedding -------------------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> Features:
        """The picture's SIFT keypoints (OpenCV): up to ``max_keypoints`` of the greyscale image shrunk to
        ``max_side`` pixels: positions ``(n, 2)`` float32 in the shrunk image's pixels, descriptors
        ``(n, 128)`` uint8."""
        return extract(image, self.config.max_side, self.config.max_keypoints)

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """VLAD vectors of prepared keypoints: ``(n, words * 128)`` float32, L2-normalised (zeros for an image
        without keypoints). Raises :class:`LensError` before :meth:`fit` / :meth:`load_state`."""
        if self.vocabulary is None:
            raise LensError(f"method '{self.info.name}' needs a visual vocabulary learned from a gallery: "
                            f"index one first (`lens index GALLERY --methods {self.info.name}`) and "
                            "search through it")
        if not items:
            return np.zeros((0, self.info.dim), np.float32)
        return np.stack([vlad(root_sift(item.descriptors), self.vocabulary) for item in items])

    # -- learning from the gallery, and keeping what was learned -----------------------------------
    def fit(self, paths: Sequence[Path]) -> Sift:
        """A copy of this method with a vocabulary learned from (an even sample of) ``paths``."""
        import faiss

        def describe(path: Path) -> np.ndarray | None:
            features = self._try_prepare(path)
            return None if features is None else features.descriptors

        descriptors = sample_descriptors(paths, describe, self.config.fit_images, self.config.fit_descriptors,
                                         "sift")
        words = self.config.words
        if len(descriptors) < words:
            raise LensError(f"method '{self.info.name}' found {len(descriptors)} SIFT keypoints in "
                            f"{min(len(paths), self.config.fit_images)} gallery images, too few to learn {words} visual words; "
                            "the gallery needs more (or more textured) images")
        kmeans = faiss.Kmeans(128, words, niter=20, seed=0, min_points_per_centroid=1,
                              max_points_per_centroid=max(256, len(descriptors) // words + 1))
        kmeans.train(np.ascontiguousarray(descriptors))
        return Sift(self.info.name, self.config, np.asarray(kmeans.centroids, np.float32))

    def _try_prepare(self, path: Path) -> Features | None:
        try:
            return self.prepare(load_image(path))
        except LensError as exc:
            log.warning("skipped %s while learning the SIFT vocabulary: %s", path, exc)
            return None

    def save_state(self, folder: Path, items: Sequence[Features]) -> list[str]:
        """Write the vocabulary and the keypoints of every indexed row (``items``, in row order)."""
        if self.vocabulary is None:
            raise LensError(f"method '{self.info.name}' has no vocabulary to save")
        np.save(folder / VOCABULARY, self.vocabulary)
        return [VOCABULARY, *FeatureStore.from_features(items).save(folder)]

    def load_state(self, folder: Path) -> Sift:
        """This method with the vocabulary and stored keypoints of a build folder."""
        try:
            vocabulary = np.load(folder / VOCABULARY)
            features = FeatureStore.load(folder)
        except (OSError, ValueError) as exc:
            raise CorruptIndexError(f"cannot read the SIFT data in {folder}: {exc}; rebuild the index "
                                    f"with `lens index GALLERY --methods {self.info.name}`") from exc
        if vocabulary.shape != (self.config.words, 128):
            raise CorruptIndexError(f"the SIFT vocabulary in {folder} has shape {vocabulary.shape}, "
                                    f"expected ({self.config.words}, 128)")
        return Sift(self.info.name, self.config, vocabulary, features)

    def stored_item(self, row: int) -> Features:
        """The stored keypoints of indexed row ``row`` (what ``prepare`` gave for that image)."""
        if self.features is None:
            raise LensError(f"method '{self.info.name}' has no stored keypoints (load_state first)")
        return self.features[row]

    # -- re-ranking ------------------------------------------------------------------------------
    def rerank(self, item: Features, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of the ``candidates`` rows by RANSAC-verified matches with the query ``item``.

        Ties (e.g. no verified match) keep the candidates' order. Returns ``(rows, inlier counts)``.
        """
        rows = np.asarray([c for c in candidates if c >= 0], dtype=np.int64)
        query_root = root_sift(item.descriptors)
        inliers = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), _RERANK_BATCH):
            others = [self.stored_item(int(row)) for row in rows[start : start + _RERANK_BATCH]]
            matches = ratio_matches(query_root, [root_sift(o.descriptors) for o in others], self.config.ratio)
            for i, (other, pairs) in enumerate(zip(others, matches)):
                inliers[start + i] = verified_inliers(item.xy, other.xy, pairs, self.config.ransac_threshold)
        order = np.argsort(-inliers, kind="stable")[:k]
        return rows[order], inliers[order]


def _factory(spec: str, model: str | None = None, **options: Any) -> Sift:
    if model:
        raise LensError(f"method '{spec}' has no model weights (its vocabulary is learned from the "
                        f"gallery); drop --model {spec}=...")
    try:
        config = replace(SiftConfig(), **options)
    except TypeError:
        raise LensError(f"unknown sift option(s) in {sorted(options)}; known: "
                        f"{', '.join(SiftConfig.__dataclass_fields__)}") from None
    return Sift(spec, config)


register_method("sift")(_factory)
