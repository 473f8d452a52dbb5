"""Vector index backends behind one protocol, chosen by a spec string like faiss's ``index_factory``.

A spec is ``backend`` or ``backend:options``: ``annoy``, ``annoy:trees=100,search_k=5000``, and
for backends that take a factory string ``backend:FACTORY:options``: ``faiss:HNSW32:efSearch=64``,
``faiss:IVF256,PQ16:nprobe=16``, ``lsh:256:rerank=100``, ``milvus:./lens.db``,
``milvus:http://127.0.0.1:19530:HNSW:M=32,ef=64``. Vectors are stored under their row number; the
gallery maps row numbers to image paths.

A :class:`KeyedIndex` (Milvus) keeps its vectors outside the build folder, in a database or service,
under the gallery's image ids: a re-index updates it in place (:meth:`KeyedIndex.sync`: upsert and
delete) instead of building it anew, and a reader attaches the ids of the build it opened.

Float vectors are compared by ``cosine``; bit codes (``hamming``) travel as packed uint8 rows
(``np.packbits``, ``dim`` = the number of bits). An index may have an int attribute ``rerank``: how
many candidates the gallery re-ranks exactly (:func:`rerank_exact`) from its stored vectors.

Adding a backend: write ``lens/index/<name>_index.py`` with a class decorated by
``@register_backend("name")`` and add the module to ``_BACKEND_MODULES``. Opening an index imports
only its backend's module (``<name>_index``): an Annoy index never imports faiss.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lens.errors import LensError

__all__ = [
    "DEFAULT_INDEX",
    "default_index",
    "KeyedIndex",
    "VectorIndex",
    "create_index",
    "list_backends",
    "load_index",
    "register_backend",
    "rerank_exact",
    "similarity_from_distance",
]

DEFAULT_INDEX = "annoy"
#: Above this many images a gallery's float vectors get an HNSW graph instead of Annoy by default.
#: Annoy's default search found every true neighbour at 1,000 images for all seven methods, but its
#: recall@10 fell to 0.25-0.94 at 2,000 and to 0.08-0.98 at 10,000 depending on how the method's
#: vectors spread; HNSW kept 0.97-1.0 up to 100,000 (docs/performance.md).
LARGE_GALLERY = 1_000
LARGE_INDEX = "faiss:HNSW32:efSearch=64"
_BACKEND_MODULES = ["annoy_index", "faiss_index", "lsh_index", "milvus_index"]
_BACKENDS: dict[str, type[VectorIndex]] = {}
_loaded = False


def default_index(count: int, metric: str) -> str:
    """The index spec a gallery of ``count`` vectors gets when none is asked for."""
    return LARGE_INDEX if metric == "cosine" and count > LARGE_GALLERY else DEFAULT_INDEX


@runtime_checkable
class VectorIndex(Protocol):
    """Nearest-neighbour search over vectors stored under their row numbers."""

    spec: str  #: the full spec this index was created from, e.g. ``annoy:trees=50``
    dim: int
    metric: str  #: ``cosine`` or ``hamming``

    def build(self, vectors: np.ndarray) -> None:
        """Index ``vectors``: ``(n, dim)`` float32 (cosine) or ``(n, dim / 8)`` uint8 packed bits
        (hamming); row i gets id i. Replaces anything built before."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row (``queries`` shaped like :meth:`build`'s vectors): ``(q, k)`` int64 ids
        (-1 where fewer than k) and ``(q, k)`` float32 similarities in [0, 1], best first."""

    def save(self, folder: Path) -> list[str]:
        """Write the index's files into ``folder``; returns the file names written."""

    @classmethod
    def load(cls, folder: Path, spec: str, dim: int, metric: str) -> VectorIndex:
        """Open an index saved by :meth:`save`."""

    def __len__(self) -> int: ...


@runtime_checkable
class KeyedIndex(Protocol):
    """An index whose vectors live outside the build folder (a Milvus collection), keyed by image id.

    The writer calls :meth:`sync` instead of :meth:`VectorIndex.build`; a reader calls :meth:`attach`
    after :meth:`VectorIndex.load`, so that :meth:`VectorIndex.search` returns the row numbers of the
    build it opened (ids the service holds but that build does not, e.g. added by a newer build since,
    come back as -1).
    """

    def sync(self, keys: Sequence[str], vectors: np.ndarray, changed: Collection[str], *, gallery: str,
             method: str, facts: Mapping[str, Any]) -> None:
        """Make the store of ``method``'s index of ``gallery`` (the method folder's name and the
        gallery's resolved path, which name the store) hold exactly ``keys`` (image ids) with
        ``vectors`` (row i for ``keys[i]``, shaped like :meth:`VectorIndex.build`'s): ids it lacks or
        whose image ``changed`` are upserted, ids no longer in ``keys`` deleted. ``facts`` (model,
        weights, dim, metric, ``writer``: the index folder) are recorded with it; a store recorded
        with other weights, dim, metric or index parameters is emptied and filled again."""

    def attach(self, keys: Sequence[str], facts: Mapping[str, Any]) -> None:
        """Map search results to rows of ``keys`` (the opened build's image ids); raises
        :class:`~lens.errors.IndexMismatchError` when the store's recorded model, weights, dim or
        metric differ from ``facts`` (another build rewrote it since)."""


def register_backend(name: str):
    """Class decorator: register a :class:`VectorIndex` class under the spec prefix ``name``."""
    def decorator(cls: type[VectorIndex]) -> type[VectorIndex]:
        _BACKENDS[name] = cls
        return cls

    return decorator


def _backend(spec: str) -> type[VectorIndex]:
    name = spec.partition(":")[0].strip()
    if name not in _BACKENDS and f"{name}_index" in _BACKEND_MODULES:
        importlib.import_module(f"lens.index.{name}_index")  # only this backend's library
    if name not in _BACKENDS:
        _load_backends()  # a module may register a backend under another name
    if name not in _BACKENDS:
        raise LensError(f"unknown index backend '{name}' in '{spec}'; known: {', '.join(list_backends())}")
    return _BACKENDS[name]


def _load_backends() -> None:
    global _loaded
    if not _loaded:
        for module in _BACKEND_MODULES:
            importlib.import_module(f"lens.index.{module}")
        _loaded = True


def list_backends() -> list[str]:
    """The registered backend names (``annoy``, ``faiss``, ``lsh``, ``milvus``), sorted."""
    _load_backends()
    return sorted(_BACKENDS)


def create_index(spec: str, dim: int, metric: str) -> VectorIndex:
    """An empty index for ``dim``-dimensional vectors compared by ``metric``."""
    return _backend(spec)(spec, dim, metric)  # type: ignore[call-arg]


def load_index(folder: Path, spec: str, dim: int, metric: str) -> VectorIndex:
    """Open the index saved in ``folder`` by the backend of ``spec``; raises :class:`LensError` for an
    unknown backend (and the backend's :class:`~lens.errors.CorruptIndexError` for damaged files)."""
    return _backend(spec).load(Path(folder), spec, dim, metric)


def parse_options(spec: str) -> dict[str, str]:
    """``name:a=1,b=2`` -> ``{"a": "1", "b": "2"}``."""
    options: dict[str, str] = {}
    text = spec.partition(":")[2].strip()
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise LensError(f"index option '{part}' in '{spec}' should look like key=value")
        options[key.strip()] = value.strip()
    return options


def similarity_from_distance(distances: np.ndarray, metric: str, dim: int) -> np.ndarray:
    """Map backend distances to similarities in [0, 1] (1 = identical).

    cosine: the cosine similarity clipped at 0 from the angular/euclidean distance between unit
    vectors, ``cos = 1 - d^2 / 2``; hamming: ``1 - d / bits``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if metric == "cosine":
        similarity = 1.0 - distances**2 / 2.0
    elif metric == "hamming":
        similarity = 1.0 - distances / float(dim)
    else:
        raise LensError(f"unknown metric '{metric}'")
    return np.clip(similarity, 0.0, 1.0).astype(np.float32)


def rerank_exact(
    queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray, metric: str, dim: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's candidate rows (-1 = none) by the exact similarity of stored ``vectors``.

    Returns ``(ids, similarities)`` of the best ``k`` per query, shaped like an index's search.
    """
    queries = np.atleast_2d(np.asarray(queries))
    width = min(k, candidates.shape[1])
    ids = np.full((len(queries), width), -1, dtype=np.int64)
    similarities = np.zeros((len(queries), width), dtype=np.float32)
    for row, (query, cand) in enumerate(zip(queries, candidates)):
        cand = np.sort(cand[cand >= 0])  # sorted: sequential reads from a memory-mapped file
        rows = np.asarray(vectors[cand], dtype=np.uint8 if metric == "hamming" else np.float32)
        if metric == "hamming":
            differing = np.unpackbits(np.bitwise_xor(rows, query.astype(np.uint8)), axis=1).sum(axis=1)
            sims = similarity_from_distance(differing, "hamming", dim)
        else:
            unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            query = query / max(float(np.linalg.norm(query)), 1e-12)
            sims = np.clip(unit @ query, 0.0, 1.0).astype(np.float32)
        order = np.argsort(-sims, kind="stable")[:width]
        ids[row, : len(order)] = cand[order]
        similarities[row, : len(order)] = sims[order]
    return ids, similarities
