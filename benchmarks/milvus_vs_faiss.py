"""Milvus (Lite and a standalone server) against FAISS HNSW: insert rate, recall@10, p50 latency, QPS.

Every engine is driven through lens's own index layer, as a gallery uses it: FAISS through
``faiss:HNSW32:efSearch=64`` (``build``), Milvus through ``milvus:URI:HNSW:M=32,efConstruction=200,ef=64``
(``sync``: batched inserts of 2,000 rows, then a flush; ``attach`` loads the collection). Data:
synthetic clustered unit vectors (``benchmarks/index_backends.py``'s generator); the truth is exact
inner-product search (``faiss.IndexFlatIP``).

Columns: ``insert/s`` vectors per second until the engine holds them all (FAISS: graph built;
Milvus: rows inserted and flushed), ``ready s`` seconds from the first insert until the search index
covers every row (Milvus builds it in the background per sealed segment; Lite indexes on flush),
recall@10 of 200 held-out queries, ``p50 ms`` of one query per call (Milvus: Bounded consistency, the
backend's default; ``Strong p50`` the same with Strong consistency, 50 queries), and ``QPS`` with the
200 queries sent in calls of 100 (one client). FAISS searches with its default threads (every core); the
server is a separate process on the same machine.

A Milvus server is started for the run (``tests/milvus_server.py``: the PyPI ``milvus`` package's
``milvus-server``, bound to 127.0.0.1, data in a temporary folder) unless ``--server URI`` is given.

    flock /tmp/lens-heavy.lock env PYTHONPATH=. .venv/bin/python benchmarks/milvus_vs_faiss.py \\
        --sizes 100000,1000000 --dims 384,1280

Cells whose float data exceed ``--max-gb`` are skipped, and so is an engine whose insert time,
projected from its rate at the previous size, exceeds ``--max-minutes`` (both said in the output).
Stopped with SIGTERM (e.g. by ``timeout``), it stops the server it started; the rows printed are complete.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from index_backends import cells, recall  # noqa: E402

from lens.index import create_index  # noqa: E402
from lens.index.milvus_index import MilvusIndex  # noqa: E402

MILVUS_OPTIONS = "HNSW:M=32,efConstruction=200,ef=64,settle=0,timeout=600"  # Bounded searches (the default)
FAISS_SPEC = "faiss:HNSW32:efSearch=64"  # lens's default for galleries above 1,000 images


def run_faiss(data: np.ndarray, queries: np.ndarray, k: int) -> dict[str, float | np.ndarray]:
    index = create_index(FAISS_SPEC, data.shape[1], "cosine")
    started = time.perf_counter()
    index.build(data)
    seconds = time.perf_counter() - started
    return {"insert": seconds, "ready": seconds, **measure(index, queries, k)}


def run_milvus(uri: str, data: np.ndarray, queries: np.ndarray, k: int, name: str) -> dict[str, float | np.ndarray]:
    index = create_index(f"milvus:{uri}:{MILVUS_OPTIONS}", data.shape[1], "cosine")
    assert isinstance(index, MilvusIndex)
    keys = [str(i) for i in range(len(data))]
    facts = {"model": "synthetic", "weights": name, "dim": data.shape[1], "metric": "cosine"}
    started = time.perf_counter()
    index.sync(keys, data, keys, gallery=f"/bench/{name}", method="bench", facts=facts)
    inserted = time.perf_counter() - started
    client = index.client
    while time.perf_counter() - started < 3600:  # until the vector index covers every row
        described = client.describe_index(index.collection, "vector")
        if int(described.get("indexed_rows", 0)) >= len(data):
            break
        time.sleep(0.5)
    index.attach(keys, facts)
    ready = time.perf_counter() - started
    time.sleep(6)  # past the server's 5 s gracefulTime: a Bounded search sees every row
    results = measure(index, queries, k)
    index.consistency = "Strong"
    results["strong"] = measure(index, queries[:50], k)["p50"]
    client.drop_collection(index.collection)
    return {"insert": inserted, "ready": ready, **results}


def measure(index, queries: np.ndarray, k: int) -> dict[str, float | np.ndarray]:
    index.search(queries[:5], k)  # warm-up
    latencies = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None], k)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    found = np.concatenate([index.search(queries[i:i + 100], k)[0] for i in range(0, len(queries), 100)])
    qps = len(queries) / (time.perf_counter() - started)
    return {"p50": statistics.median(latencies) * 1e3, "qps": qps, "ids": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dims", default="384,1280")
    parser.add_argument("--engines", default="faiss,lite,server", help="of faiss, lite, server")
    parser.add_argument("--server", help="a running Milvus server's URI (default: start one for the run)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-gb", type=float, default=2.0, help="skip cells with more float data")
    parser.add_argument("--max-minutes", type=float, default=15.0,
                        help="skip an engine whose projected insert time is longer")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM): the rows above are complete"))
    work = Path(tempfile.mkdtemp(prefix="lens-milvus-bench-"))
    server = None
    uris = {"lite": str(work / "bench.db")}
    if "server" in engines:
        if args.server:
            uris["server"] = args.server
        else:
            import milvus_server

            started = time.perf_counter()
            server, uris["server"] = milvus_server.start(work / "server")
            print(f"milvus-server started in {time.perf_counter() - started:.0f} s at {uris['server']}")
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; k={args.k}, "
          f"{args.queries} queries; Milvus index {MILVUS_OPTIONS}, FAISS {FAISS_SPEC}")
    print(f"| n | d | engine | insert/s | ready s | recall@{args.k} | p50 ms | Strong p50 ms | QPS (nq=100) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    rates: dict[tuple[str, int], float] = {}  # (engine, d) -> insert rate at the last size
    try:
        for n, d, data, queries, truth in cells(args.sizes, args.dims, args.queries, args.k, args.max_gb, 9):
            for engine in engines:
                rate = rates.get((engine, d))
                if rate and n / rate / 60 > args.max_minutes:
                    print(f"| {n:,} | {d} | {engine} (skipped: projected insert {n / rate / 60:.0f} min "
                          f"> --max-minutes {args.max_minutes:g}) | | | | | | |", flush=True)
                    continue
                if engine == "faiss":
                    row = run_faiss(data, queries, args.k)
                else:
                    row = run_milvus(uris[engine], data, queries, args.k, f"{engine}_{n}_{d}")
                rates[(engine, d)] = n / row["insert"]
                strong = f"{row['strong']:.2f}" if "strong" in row else ""
                print(f"| {n:,} | {d} | {engine} | {n / row['insert']:,.0f} | {row['ready']:.0f} | "
                      f"{recall(row['ids'], truth):.3f} | {row['p50']:.2f} | {strong} | {row['qps']:,.0f} |",
                      flush=True)
            del data, queries, truth
    finally:
        if server is not None:
            milvus_server.stop(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
