"""Milvus collections as a lens index: an embedded Milvus Lite file or a Milvus server / cluster.

Spec: ``milvus:URI``, ``milvus:URI:TYPE`` or ``milvus:URI:TYPE:OPTIONS``::

    milvus:./lens.db                                 Milvus Lite, embedded: one file, one process at a time
    milvus:http://127.0.0.1:19530                    a Milvus standalone server or cluster (HNSW, M=32, ef=64)
    milvus:http://127.0.0.1:19530:HNSW:M=32,ef=64    HNSW graph: M links per node, ef = search breadth
    milvus:./lens.db:IVF_FLAT:nlist=1024,nprobe=16   inverted file over nlist cells, nprobe cells visited
    milvus:http://db:19530:FLAT                      exact search

URI: ``http(s)://host:port`` (or ``tcp://``, ``unix:``) for a server, else a local Milvus Lite file whose
name ends in ``.db`` (pymilvus's rule), resolved against the working directory when the index is built.
TYPE: ``HNSW`` (default), ``IVF_FLAT``, ``IVF_SQ8``, ``IVF_PQ`` or ``FLAT``. OPTIONS (``key=value,...``):
build parameters (``M``, ``efConstruction``, ``nlist``, ``m``, ``nbits``), search parameters (``ef``,
``nprobe``), and ``rerank=N`` (exact re-ranking of N candidates from the build's stored vectors, as
for FAISS), ``timeout=S`` (seconds to wait for the server and for a search, default 10; writes, flushes and
loads may take ``max(S, 300)``), ``consistency=`` ``Bounded``
(default) / ``Strong`` / ``Session`` / ``Eventually`` (`Milvus consistency levels
<https://milvus.io/docs/consistency.md>`_) and ``settle=S`` (default 5).

Consistency: a Bounded search sees every write older than the server's ``common.gracefulTime`` (5 s
by default), so a re-index on a server waits ``settle`` seconds after its last write before it is
published: every reader that opens the new build finds all of its rows. A Strong search needs no
wait but costs a server time tick per query (about 200 ms on Milvus 2.3: measured in
docs/scaling-out.md); Milvus Lite answers every search with what was written.

One collection per gallery and method (:func:`collection_name`), fields ``id`` (INT64 primary key:
the first 8 bytes of the SHA-256 of the image id), ``path`` (the image id, the path relative to the
gallery, for people reading the collection) and ``vector`` (FLOAT_VECTOR, L2-normalised; metric IP,
so the score is the cosine similarity). The collection's property ``lens.facts`` records the model,
weights, dim, metric and index parameters of the build that wrote it; a reader refuses a collection
written by another model, and a writer with other weights or parameters empties and refills it.
Re-indexing upserts the new or changed images and deletes the removed ones (no full rebuild). The
build folder keeps ``milvus.json`` (URI and collection name) beside the store's manifest, items and
vectors. Only float vectors (metric ``cosine``) are supported.

pymilvus is imported when a Milvus index is first used: the default install does not need it
(``pip install lens[scale]`` adds ``pymilvus`` and ``milvus-lite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lens.errors import CorruptIndexError, IndexMismatchError, LensError
from lens.index import register_backend
from lens.types import l2_normalise

FILE = "milvus.json"
FACTS = "lens.facts"
INDEX_TYPES = ("HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "FLAT")
DEFAULT_TYPE = "HNSW"
#: build parameters per index type, with their defaults; search parameters likewise
BUILD_PARAMETERS = {"HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024},
                    "IVF_SQ8": {"nlist": 1024}, "IVF_PQ": {"nlist": 1024, "m": 16, "nbits": 8}, "FLAT": {}}
SEARCH_PARAMETERS = {"HNSW": {"ef": 64}, "IVF_FLAT": {"nprobe": 16}, "IVF_SQ8": {"nprobe": 16},
                     "IVF_PQ": {"nprobe": 16}, "FLAT": {}}
CONSISTENCY = ("Strong", "Bounded", "Session", "Eventually")
MAX_PATH = 4096  #: the ``path`` field's VARCHAR length (bytes); longer ids are cut there (display only)
#: seconds a write, flush, load or index build may take (a 2,000-row insert into Milvus Lite took
#: over 10 s here on a loaded 2-core machine)
WRITE_TIMEOUT = 300.0
BATCH = 2_000  #: rows per insert / upsert call (a gRPC message stays well under its 64 MiB limit)
_SPEC = re.compile(r"^milvus:(?P<uri>.+?)(?::(?P<type>" + "|".join(INDEX_TYPES) + r")(?::(?P<options>[^:]*))?)?$")


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``milvus:http://h:19530:HNSW:M=16,ef=32`` -> ``("http://h:19530", "HNSW", {"M": "16", "ef": "32"})``.

    The URI itself may hold ``:``; the index type is recognised by its name. Raises :class:`LensError`.
    """
    match = _SPEC.match(spec.strip())
    if not match or not match.group("uri").strip():
        raise LensError(f"a Milvus index spec needs a URI: milvus:./lens.db or milvus:http://HOST:19530 "
                        f"(optionally :HNSW:M=32,ef=64 or :IVF_FLAT:nlist=1024,nprobe=16), not '{spec}'")
    uri, kind = match.group("uri").strip(), match.group("type") or DEFAULT_TYPE
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (match.group("options") or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise LensError(f"index option '{part}' in '{spec}' should look like key=value")
        options[key.strip()] = value.strip()
    return uri, kind, options


def is_server(uri: str) -> bool:
    """True for a server address (``http://``, ``https://``, ``tcp://``, ``unix:``), False for a Lite file."""
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def collection_name(gallery: str, method: str) -> str:
    """The collection of ``method``'s index of the gallery at ``gallery`` (its resolved path):
    ``lens_<folder name>_<8 hex digits of a SHA-256 of the path>_<method>``, with every character
    Milvus does not allow in a name (letters, digits, ``_``) replaced by ``_``, at most 255 long."""
    digest = hashlib.sha256(os.fsencode(gallery)).hexdigest()[:8]
    folder = re.sub(r"[^A-Za-z0-9_]", "_", Path(gallery).name)[:80]
    return re.sub(r"[^A-Za-z0-9_]", "_", f"lens_{folder}_{digest}_{method}")[:255]


def key_id(key: str) -> int:
    """The INT64 primary key of an image id: its SHA-256's first 8 bytes, signed (PEP 383 ids too)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big", signed=True)


def _display_path(key: str) -> str:
    text = key.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.encode("utf-8")[:MAX_PATH].decode("utf-8", "ignore")


_clients: dict[tuple[str, float], Any] = {}
_clients_lock = threading.Lock()


def _client(uri: str, timeout: float) -> Any:
    """One pymilvus ``MilvusClient`` per URI and process (a Lite file admits one process at a time)."""
    with _clients_lock:
        client = _clients.get((uri, timeout))
        if client is not None:
            return client
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise LensError("the milvus index backend needs pymilvus (and milvus-lite for a .db file): "
                            "pip install 'lens[scale]'") from None
        if not is_server(uri) and not uri.endswith(".db"):
            raise LensError(f"a Milvus Lite file must end in .db, and a server URI start with http://, "
                            f"https://, tcp:// or unix: ('{uri}')")
        try:
            client = MilvusClient(uri, timeout=timeout)
        except Exception as exc:  # pymilvus raises MilvusException, gRPC errors or the Lite data dir's lock
            if is_server(uri):
                raise LensError(f"cannot connect to the Milvus server '{uri}' within {timeout:g} s (is it "
                                f"running and reachable from here?): {_message(exc)}") from None
            raise LensError(f"cannot open the Milvus Lite file '{uri}' (Milvus Lite admits one process at a "
                            f"time: is another lens using it? Serve several processes from a Milvus server): "
                            f"{_message(exc)}") from None
        _clients[(uri, timeout)] = client
        return client


def close_clients() -> None:
    """Close this process's Milvus connections (the next use opens new ones)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except Exception:  # closing a connection to a server that is gone: nothing left to do
            pass


def _message(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "message", "") or exc).split())
    return text[:300] or type(exc).__name__


@register_backend("milvus")
class MilvusIndex:
    """A Milvus collection behind lens's index protocol (:class:`~lens.index.KeyedIndex`).

    Vectors: ``(n, dim)`` float32, stored L2-normalised; similarities are inner products = cosines,
    clipped to [0, 1]. Raises :class:`LensError` for a bad spec, an unreachable server (naming the URI,
    after ``timeout`` seconds) and any error Milvus reports.
    """

    def __init__(self, spec: str, dim: int, metric: str):
        if metric != "cosine":
            raise LensError(f"the milvus index backend stores float vectors (metric cosine), not '{metric}'; "
                            "index bit codes with faiss, annoy or lsh")
        uri, kind, options = parse_spec(spec)
        self.spec, self.dim, self.metric, self.index_type = spec, dim, metric, kind
        self.uri = uri if is_server(uri) else os.path.abspath(os.path.expanduser(uri))
        if self.uri != uri:  # the recorded spec names the Lite file wherever the next run starts
            self.spec = spec.replace(f"milvus:{uri}", f"milvus:{self.uri}", 1)
        self.rerank = self._number(options.pop("rerank", "0"), "rerank", int)
        self.timeout = self._number(options.pop("timeout", "10"), "timeout", float)
        self.settle = self._number(options.pop("settle", "5"), "settle", float)
        self.consistency = options.pop("consistency", "Bounded").capitalize()
        if self.consistency not in CONSISTENCY:
            raise LensError(f"consistency '{self.consistency}' in '{spec}': use one of {', '.join(CONSISTENCY)}")
        self.build_params = dict(BUILD_PARAMETERS[kind])
        self.search_params = dict(SEARCH_PARAMETERS[kind])
        for key, value in options.items():
            if key in self.build_params:
                self.build_params[key] = self._number(value, key, int)
            elif key in self.search_params:
                self.search_params[key] = self._number(value, key, int)
            else:
                known = [*self.build_params, *self.search_params, "rerank", "timeout", "consistency", "settle"]
                raise LensError(f"index option '{key}' does not apply to Milvus {kind} ('{spec}'); "
                                f"known: {', '.join(known)}")
        self.collection: str | None = None
        self._ids = np.zeros(0, np.int64)  # primary key of row i
        self._rows: dict[int, int] = {}  # primary key -> row

    def _number(self, text: str, key: str, kind: type) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise LensError(f"index option '{key}={text}' in '{self.spec}' must be a number") from None
        if value < 0:
            raise LensError(f"index option '{key}' in '{self.spec}' must not be negative")
        return value

    # -- talking to Milvus ------------------------------------------------------------------------
    def _call(self, what: str, function: Any, *args: Any, slow: bool = False, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` within ``timeout`` seconds (``slow``: writes, flushes, loads
        and index builds, within ``max(timeout, WRITE_TIMEOUT)``); Milvus's errors become LensErrors."""
        timeout = max(self.timeout, WRITE_TIMEOUT) if slow else self.timeout
        try:
            return function(*args, timeout=timeout, **kwargs)
        except LensError:
            raise
        except Exception as exc:
            raise LensError(f"Milvus at '{self.uri}' failed to {what} (collection {self.collection}): "
                            f"{_message(exc)}") from None

    @property
    def client(self) -> Any:
        """The ``pymilvus.MilvusClient`` for this index's URI, shared per (uri, timeout) in the process.

        Raises LensError when the server cannot be reached within the timeout (seconds)."""
        return _client(self.uri, self.timeout)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = l2_normalise(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if vectors.shape[1] != self.dim:
            raise LensError(f"vectors have {vectors.shape[1]} columns, the index expects {self.dim}")
        return vectors

    def _index_facts(self) -> dict[str, Any]:
        return {"index_type": self.index_type, "build_params": self.build_params}

    def _facts(self) -> dict[str, Any] | None:
        """The ``lens.facts`` recorded with the collection; None when it does not exist."""
        client = self.client
        if not self._call("look up the collection", client.has_collection, self.collection):
            return None
        described = self._call("describe the collection", client.describe_collection, self.collection)
        try:
            return json.loads(described.get("properties", {}).get(FACTS) or "{}")
        except ValueError:
            return {}

    def _create(self, facts: Mapping[str, Any]) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description="lens index: image vectors by gallery path")
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP",
                               params=self.build_params)
        self._call("create the collection", self.client.create_collection, self.collection, slow=True, schema=schema,
                   index_params=index_params, consistency_level=self.consistency,
                   properties={FACTS: json.dumps(dict(facts))})

    def _stored_ids(self) -> set[int]:
        """Every primary key in the collection (a query iterator: one query returns at most 16,384 rows)."""
        found: set[int] = set()
        try:
            iterator = self.client.query_iterator(self.collection, batch_size=10_000, filter="",
                                                  output_fields=["id"], consistency_level="Strong",
                                                  timeout=self.timeout)
            while rows := iterator.next():
                found.update(int(row["id"]) for row in rows)
            iterator.close()
        except Exception as exc:
            raise LensError(f"Milvus at '{self.uri}' failed to list the ids of collection {self.collection}: "
                            f"{_message(exc)}") from None
        return found

    def _ensure_loaded(self) -> None:
        """Load the collection into memory for search and query (Milvus Lite releases it on exit)."""
        state = self._call("check the collection is loaded", self.client.get_load_state, self.collection)
        if getattr(state.get("state"), "name", "") != "Loaded":
            self._call("load the collection", self.client.load_collection, self.collection, slow=True)

    # -- the protocol ------------------------------------------------------------------------------
    def build(self, vectors: np.ndarray) -> None:
        """Not used: a Milvus index is written by :meth:`sync`, which needs the images' ids."""
        raise LensError("a Milvus index is written with its image ids (sync), not built from vectors alone")

    def sync(self, keys: Sequence[str], vectors: np.ndarray, changed: Collection[str], *, gallery: str,
             method: str, facts: Mapping[str, Any]) -> None:
        """Make the collection of (``gallery``, ``method``) hold exactly ``keys`` with ``vectors``.

        ``keys``: gallery-relative image paths, one per row of ``vectors`` ((n, dim) float32, L2-normalised
        here); ``changed``: the keys whose vectors are new or re-embedded (upserted); rows for keys no
        longer listed are deleted. ``facts`` (model, weights, dim, metric, ...) are recorded as a collection
        property so readers can refuse a mismatched model. Raises LensError on a server failure or when
        the keys and vectors disagree."""
        vectors = self._prepare(vectors)
        if len(keys) != len(vectors):
            raise LensError(f"{len(keys)} image ids for {len(vectors)} vectors")
        self.collection = collection_name(gallery, method)
        facts = {**facts, **self._index_facts()}
        recorded = self._facts()
        same = recorded is not None and all(recorded.get(key) == facts.get(key) for key in
                                            ("weights", "dim", "metric", "index_type", "build_params"))
        if recorded is not None and not same:
            self._call("drop the outdated collection", self.client.drop_collection, self.collection, slow=True)
        if not same:
            self._create(facts)
            stored: set[int] = set()
        else:
            self._ensure_loaded()
            stored = self._stored_ids()
            if recorded.get("writer") != facts.get("writer"):  # another index folder wrote it last
                changed = set(keys)
        self._attach_ids(keys)
        changed = set(changed)
        rows = [row for row, key in enumerate(keys) if key in changed or int(self._ids[row]) not in stored]
        gone = sorted(stored - set(self._rows))
        for start in range(0, len(gone), BATCH):
            self._call("delete removed images", self.client.delete, self.collection, slow=True, ids=gone[start:start + BATCH])
        write = self.client.upsert if stored else self.client.insert
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            data = [{"id": int(self._ids[row]), "path": _display_path(keys[row]), "vector": vectors[row].tolist()}
                    for row in batch]
            self._call("write vectors", write, self.collection, data, slow=True)
        if same and recorded != facts:
            self._call("record the build's facts", self.client.alter_collection_properties, self.collection,
                       properties={FACTS: json.dumps(facts)})
        self._call("flush", self.client.flush, self.collection, slow=True)
        if (rows or gone) and is_server(self.uri) and self.consistency != "Strong":
            time.sleep(self.settle)  # until a Bounded search sees every write (see the module's docs)

    def _attach_ids(self, keys: Sequence[str]) -> None:
        self._ids = np.fromiter((key_id(key) for key in keys), dtype=np.int64, count=len(keys))
        self._rows = {int(pk): row for row, pk in enumerate(self._ids)}
        if len(self._rows) != len(keys):
            raise LensError("two image ids share a Milvus primary key (a SHA-256 prefix collision)")

    def attach(self, keys: Sequence[str], facts: Mapping[str, Any]) -> None:
        """Open the collection for a build whose rows are ``keys`` (gallery-relative paths, row order).

        Raises CorruptIndexError when the collection is gone, IndexMismatchError when another model
        (``facts``: weights, dim, metric) has rewritten it, LensError on a server failure."""
        recorded = self._facts()
        if recorded is None:
            raise CorruptIndexError(f"the Milvus collection '{self.collection}' is gone from '{self.uri}'; "
                                    f"rebuild it with `lens index GALLERY --index {self.spec}`")
        built = tuple(recorded.get(key) for key in ("model", "weights", "dim", "metric"))
        if built[1:] != tuple(facts.get(key) for key in ("weights", "dim", "metric")):
            raise IndexMismatchError(
                f"the Milvus collection '{self.collection}' at '{self.uri}' was rewritten with model "
                f"'{built[0]}' (weights {built[1]}, dim {built[2]}, {built[3]}), not '{facts.get('model')}' "
                f"(weights {facts.get('weights')}) as this index's manifest says; re-index the gallery")
        self._attach_ids(keys)
        self._ensure_loaded()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query ((q, dim) float32) by inner product (cosine).

        Returns (ids (q, k) int64 build rows, -1 where fewer were found; similarities (q, k) float32 in
        [0, 1]). Rows a newer build added are left out. Raises LensError on a server failure."""
        queries = self._prepare(queries)
        k = max(1, min(k, len(self), 16_384)) if len(self) else 0
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        similarities = np.zeros((len(queries), k), dtype=np.float32)
        if k == 0:
            return ids, similarities
        hits = self._call("search", self.client.search, self.collection, data=queries.tolist(), limit=k,
                          search_params={"metric_type": "IP", "params": self.search_params},
                          consistency_level=self.consistency)
        for row, found in enumerate(hits):
            known = [(self._rows[int(hit["id"])], float(hit["distance"])) for hit in found
                     if int(hit["id"]) in self._rows]  # ids a newer build added are not this build's
            for column, (index_row, score) in enumerate(known[:k]):
                ids[row, column], similarities[row, column] = index_row, score
        np.clip(similarities, 0.0, 1.0, out=similarities)
        return ids, similarities

    def save(self, folder: Path) -> list[str]:
        """Write ``milvus.json`` (URI, collection, row count) into the build ``folder``; returns its name."""
        text = json.dumps({"uri": self.uri, "collection": self.collection, "count": len(self)}, indent=2)
        (Path(folder) / FILE).write_text(text + "\n")
        return [FILE]

    @classmethod
    def load(cls, folder: Path, spec: str, dim: int, metric: str) -> MilvusIndex:
        """The index a build ``folder``'s ``milvus.json`` points at (not connected until used).

        Raises CorruptIndexError when that file is missing or unreadable."""
        self = cls(spec, dim, metric)
        path = Path(folder) / FILE
        try:
            where = json.loads(path.read_text())
            self.uri, self.collection = str(where["uri"]), str(where["collection"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptIndexError(f"cannot read {path}: {exc}") from exc
        return self

    def __len__(self) -> int:
        return len(self._ids)
