"""FAISS indexes chosen by a factory string: exact Flat, HNSW graphs, IVF-PQ codes, ...

Spec: ``faiss:FACTORY`` or ``faiss:FACTORY:OPTIONS``, where FACTORY is any
`faiss index_factory <https://github.com/facebookresearch/faiss/wiki/The-index-factory>`_ string
and OPTIONS is ``key=value,...``::

    faiss:Flat                          exact search (the reference; 4*d bytes per vector)
    faiss:HNSW32:efSearch=64            HNSW graph, 32 links per node; efSearch = search breadth
    faiss:IVF256,PQ16:nprobe=16         inverted lists over 256 cells, 16-byte PQ codes; nprobe = cells visited
    faiss:PQ32:rerank=100               32-byte product-quantisation codes, exhaustive scan, and
                                        the top 100 re-ranked exactly from the stored float vectors

Options: any search-time parameter faiss's ``ParameterSpace`` knows (``efSearch``, ``nprobe``,
``k_factor``, ``ht``, ...), and ``rerank=N``: the gallery fetches N candidates and re-ranks them
exactly with the float vectors it stores next to the index (``vectors.npy``).

Cosine similarity is the inner product of L2-normalised vectors (``METRIC_INNER_PRODUCT``).
Bit codes (metric ``hamming``, packed uint8 rows) use FAISS's binary indexes; FACTORY is then a
binary factory string (``BFlat``, ``BHNSW32``, ``BIVF256``; the leading ``B`` may be left out).
Indexes that need training (IVF, PQ) learn from the vectors they are built with, so they need
enough of them: at least as many as their number of centroids (256 per PQ sub-quantiser).
Unlike ``faiss.index_factory``, PQ codes skip FAISS's slow polysemous training (it only serves
searches with a Hamming threshold) unless the ``ht`` option asks for such searches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lens.errors import CorruptIndexError, LensError
from lens.index import register_backend, similarity_from_distance
from lens.types import l2_normalise

FILE = "index.faiss"
_METRICS = ("cosine", "hamming")


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``faiss:IVF256,PQ16:nprobe=8,rerank=50`` -> ``("IVF256,PQ16", {"nprobe": "8", "rerank": "50"})``."""
    _, _, rest = spec.partition(":")
    factory, _, text = rest.partition(":")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise LensError(f"index option '{part}' in '{spec}' should look like key=value")
        options[key.strip()] = value.strip()
    return factory.strip(), options


def faiss_message(exc: BaseException) -> str:
    """The readable part of a FAISS C++ exception, on one line (no C++ signature, file or assertion)."""
    text = " ".join(str(exc).split())
    located = re.search(r" at \S+:\d+: (.*)$", text)  # "Error in <signature> at <file>:<line>: <message>"
    text = located.group(1) if located else text
    return re.sub(r"^Error: '.*?' failed: ", "", text)


def _int_option(options: dict[str, str], key: str, spec: str, default: int) -> int:
    try:
        value = int(options.pop(key, default))
    except ValueError:
        raise LensError(f"index option '{key}' in '{spec}' must be a whole number") from None
    if value < 0:
        raise LensError(f"index option '{key}' in '{spec}' must not be negative")
    return value


@register_backend("faiss")
class FaissIndex:
    """Any FAISS index behind lens's index protocol; search parameters re-applied after loading."""

    default_factory = "Flat"

    def __init__(self, spec: str, dim: int, metric: str):
        if metric not in _METRICS:
            raise LensError(f"{type(self).__name__} does not support metric '{metric}'")
        self.spec, self.dim, self.metric = spec, dim, metric
        factory, options = split_spec(spec)
        self.factory = factory or self.default_factory
        self.rerank = _int_option(options, "rerank", spec, 0)  #: candidates re-ranked exactly (0 = none)
        self.parameters = self._parse_parameters(options, spec)
        self._index: Any = None

    # -- what subclasses may change --------------------------------------------------------------
    def _parse_parameters(self, options: dict[str, str], spec: str) -> dict[str, float]:
        parameters = {}
        for key, value in options.items():
            try:
                parameters[key] = float(value)
            except ValueError:
                raise LensError(f"index option '{key}={value}' in '{spec}' must be a number") from None
        return parameters

    def _new_index(self) -> Any:
        try:
            if self.metric == "hamming":
                factory = self.factory if self.factory.startswith("B") else "B" + self.factory
                return faiss.index_binary_factory(self.dim, factory)
            index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise LensError(f"faiss cannot make an index from '{self.factory}' ({self.spec}): "
                            f"{faiss_message(exc)}") from None
        if "ht" not in self.parameters:
            ivf = faiss.try_extract_index_ivf(index)
            for part in (faiss.downcast_index(index), ivf and faiss.downcast_index(ivf)):
                if hasattr(part, "do_polysemous_training"):
                    part.do_polysemous_training = False
        return index

    def _similarities(self, distances: np.ndarray) -> np.ndarray:
        if self.metric == "hamming":
            return similarity_from_distance(distances, "hamming", self.dim)
        return np.clip(distances, 0.0, 1.0).astype(np.float32)  # inner products of unit vectors

    # -- the protocol ------------------------------------------------------------------------------
    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors))
        if self.metric == "hamming":
            vectors = np.ascontiguousarray(vectors, dtype=np.uint8)
            expected = (self.dim + 7) // 8
        else:
            vectors = l2_normalise(vectors)
            expected = self.dim
        if vectors.shape[1] != expected:
            raise LensError(f"vectors have {vectors.shape[1]} columns, the index expects {expected}")
        return vectors

    def build(self, vectors: np.ndarray) -> None:
        """Index ``vectors``: ``(n, dim)`` float32 (cosine; L2-normalised here) or ``(n, dim / 8)`` uint8
        packed bits (hamming); row i gets id i. Indexes that need training (IVF, PQ) learn from these
        vectors. Raises :class:`LensError` for vectors of another width, or too few for the factory."""
        vectors = self._prepare(vectors)
        index = self._new_index()
        try:
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors)
        except RuntimeError as exc:
            raise LensError(
                f"cannot build '{self.spec}' from {len(vectors)} vectors: {faiss_message(exc)}. "
                "Small galleries need a simpler index, e.g. faiss:Flat or faiss:HNSW32"
            ) from None
        self._index = index
        self._apply_parameters()

    def _apply_parameters(self) -> None:
        if self.metric == "hamming":  # binary indexes have no ParameterSpace; set the two usual knobs
            for key, value in self.parameters.items():
                target = self._index.hnsw if key == "efSearch" and hasattr(self._index, "hnsw") else self._index
                if not hasattr(target, key):
                    raise LensError(f"index option '{key}' does not apply to '{self.spec}'")
                setattr(target, key, int(value))
            return
        space = faiss.ParameterSpace()
        for key, value in self.parameters.items():
            try:
                space.set_index_parameter(self._index, key, value)
            except RuntimeError:
                raise LensError(f"index option '{key}' does not apply to '{self.spec}' "
                                "(e.g. efSearch is for HNSW, nprobe for IVF)") from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(q, k)`` int64 ids (-1 where fewer) and ``(q, k)`` float32 similarities in [0, 1], best first,
        for queries shaped like :meth:`build`'s vectors; ``k`` is capped at the number indexed."""
        queries = self._prepare(queries)
        count = len(self)
        k = max(1, min(k, count)) if count else 0
        if k == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        distances, ids = self._index.search(queries, k)
        similarities = self._similarities(distances)
        similarities[ids < 0] = 0.0
        return ids.astype(np.int64), similarities

    def save(self, folder: Path) -> list[str]:
        """Write ``index.faiss`` into ``folder``; returns ``["index.faiss"]``."""
        path = str(Path(folder) / FILE)
        (faiss.write_index_binary if self.metric == "hamming" else faiss.write_index)(self._index, path)
        return [FILE]

    @classmethod
    def load(cls, folder: Path, spec: str, dim: int, metric: str) -> FaissIndex:
        """Read ``folder/index.faiss`` and re-apply the spec's search parameters. Raises
        :class:`~lens.errors.CorruptIndexError` for a file FAISS cannot read or one of another dimension."""
        self = cls(spec, dim, metric)
        path = Path(folder) / FILE
        try:
            read = faiss.read_index_binary if metric == "hamming" else faiss.read_index
            self._index = read(str(path))
        except RuntimeError as exc:
            raise CorruptIndexError(f"cannot open faiss index {path}: {faiss_message(exc)}") from None
        if self._index.d != dim:
            raise CorruptIndexError(f"faiss index {path} holds {self._index.d}-d vectors, expected {dim}")
        self._apply_parameters()
        return self

    def __len__(self) -> int:
        return int(self._index.ntotal) if self._index is not None else 0
