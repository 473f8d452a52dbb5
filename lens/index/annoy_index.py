"""Spotify Annoy: random-projection forests, memory-mapped from disk; the default backend.

Options: ``trees`` (default 50; more trees, better recall, bigger file) and ``search_k`` (nodes
inspected per query; default -1 means Annoy's own ``trees * k``).

Metrics: ``cosine`` (Annoy's ``angular``) for float vectors, and ``hamming`` for bit codes, which
lens passes around packed 8 bits per byte (uint8 rows of ``bits / 8`` bytes, ``np.packbits`` order)
and Annoy takes as 0/1 values, one per bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from annoy import AnnoyIndex as _Annoy

from lens.errors import CorruptIndexError, LensError
from lens.index import parse_options, register_backend, similarity_from_distance

_METRICS = {"cosine": "angular", "hamming": "hamming"}
FILE = "index.ann"


@register_backend("annoy")
class AnnoyIndex:
    """Spotify Annoy (random-projection forests, memory-mapped) behind :class:`~lens.index.VectorIndex`.

    Spec ``annoy`` or ``annoy:trees=50,search_k=-1`` (see the module). Raises :class:`LensError` for a
    metric other than ``cosine`` / ``hamming`` or an unknown option.
    """

    def __init__(self, spec: str, dim: int, metric: str):
        if metric not in _METRICS:
            raise LensError(f"annoy backend does not support metric '{metric}'")
        options = parse_options(spec)
        unknown = set(options) - {"trees", "search_k"}
        if unknown:
            raise LensError(f"unknown annoy option(s) {sorted(unknown)} in '{spec}'; use trees, search_k")
        self.spec, self.dim, self.metric = spec, dim, metric
        self.trees = int(options.get("trees", 50))
        self.search_k = int(options.get("search_k", -1))
        self._index = _Annoy(dim, _METRICS[metric])
        self._count = 0

    def _rows(self, vectors: np.ndarray) -> np.ndarray:
        """Rows as Annoy takes them: floats, or one 0/1 value per bit for packed bit codes."""
        vectors = np.atleast_2d(np.asarray(vectors))
        if self.metric == "hamming":
            return np.unpackbits(np.asarray(vectors, dtype=np.uint8), axis=1)[:, : self.dim]
        return np.asarray(vectors, dtype=np.float32)

    def build(self, vectors: np.ndarray) -> None:
        """Index ``vectors``: ``(n, dim)`` float32 (cosine) or ``(n, dim / 8)`` uint8 packed bits (hamming);
        row i gets id i. ``trees`` trees, seed 0, built on every core."""
        vectors = self._rows(vectors)
        index = _Annoy(self.dim, _METRICS[self.metric])
        index.set_seed(0)
        for i, vector in enumerate(vectors):
            index.add_item(i, vector)
        index.build(self.trees, n_jobs=-1)
        self._index, self._count = index, len(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(q, k)`` int64 ids (-1 where fewer) and ``(q, k)`` float32 similarities in [0, 1], best first,
        for queries shaped like :meth:`build`'s vectors; ``k`` is capped at the number indexed."""
        queries = self._rows(queries)
        k = max(1, min(k, self._count)) if self._count else 0
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        distances = np.full((len(queries), k), np.inf, dtype=np.float64)
        for row, query in enumerate(queries):
            found, dist = self._index.get_nns_by_vector(query, k, self.search_k, include_distances=True)
            ids[row, : len(found)] = found
            distances[row, : len(dist)] = dist
        return ids, similarity_from_distance(distances, self.metric, self.dim)

    def save(self, folder: Path) -> list[str]:
        """Write ``index.ann`` into ``folder``; returns ``["index.ann"]``."""
        self._index.save(str(Path(folder) / FILE))
        return [FILE]

    @classmethod
    def load(cls, folder: Path, spec: str, dim: int, metric: str) -> AnnoyIndex:
        """Memory-map ``folder/index.ann``. Raises :class:`~lens.errors.CorruptIndexError` when it cannot be opened."""
        self = cls(spec, dim, metric)
        path = Path(folder) / FILE
        try:
            self._index.load(str(path))
        except OSError as exc:
            raise CorruptIndexError(f"cannot open annoy index {path}: {exc}") from exc
        self._count = self._index.get_n_items()
        return self

    def __len__(self) -> int:
        return self._count
