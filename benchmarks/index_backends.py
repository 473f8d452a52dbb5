"""Index backends on synthetic clustered vectors: recall@10, single-thread QPS, build time, size.

Every backend is built through lens's own index layer (``create_index``), exactly as a gallery
builds it, on L2-normalised vectors compared by cosine. For each (n, d) the script prints one row
per backend: build seconds, bytes per vector of the saved index files (a gallery also keeps the
float vectors, 4*d bytes, in vectors.npy), queries per second with one thread, and recall@10
against exact search (the fraction of the true 10 nearest neighbours found).

Data: ``n`` vectors in ``n / 100`` clusters in a 64-d latent space, mapped to ``d`` dimensions by a
random linear map plus isotropic noise (real embeddings also have a low intrinsic dimension);
queries are drawn from the same clusters and are not in the index.

    .venv/bin/python benchmarks/index_backends.py --sizes 10000,100000 --dims 128,1280,2048

Cells whose float data would exceed ``--max-gb`` are skipped (said in the output).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from lens.index import VectorIndex, create_index, rerank_exact

LATENT = 64
RERANK = 100  #: candidates re-ranked exactly for the "+rerank" rows


def nlist(n: int) -> int:
    """IVF cells: about sqrt(n), a power of two between 64 and 1024 (each cell trains on <= 256 points)."""
    return int(min(1024, max(64, 2 ** round(math.log2(math.sqrt(n))))))


def pq_bytes(d: int) -> int:
    """PQ sub-quantisers (bytes per code): d/8 for small d, 64 for large (a divisor of d)."""
    return d // 8 if d <= 256 else 64


#: backend name -> spec for (n, d); a "+rerank" row searches the index built for the row before it
BACKENDS: dict[str, Callable[[int, int], str]] = {
    "annoy": lambda n, d: "annoy",  # lens default: 50 trees, search_k = trees * k
    "flat": lambda n, d: "faiss:Flat",
    "hnsw": lambda n, d: "faiss:HNSW32:efSearch=64",
    "ivfpq": lambda n, d: f"faiss:IVF{nlist(n)},PQ{pq_bytes(d)}:nprobe=16",
    "ivfpq+rerank": lambda n, d: f"faiss:IVF{nlist(n)},PQ{pq_bytes(d)}:nprobe=16,rerank={RERANK}",
    "lsh": lambda n, d: "lsh:256",
    "lsh+rerank": lambda n, d: f"lsh:256:rerank={RERANK}",
}


def clustered(n: int, d: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` data and ``queries`` query vectors (float32, unit length) from the same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // 100), LATENT)).astype(np.float32)
    mapping = (rng.standard_normal((LATENT, d)) / math.sqrt(LATENT)).astype(np.float32)
    total = n + queries
    out = np.empty((total, d), np.float32)
    for start in range(0, total, 50_000):
        end = min(total, start + 50_000)
        latent = centres[rng.integers(0, len(centres), end - start)]
        latent += 0.8 * rng.standard_normal(latent.shape, dtype=np.float32)
        block = latent @ mapping + 0.3 * rng.standard_normal((end - start, d), dtype=np.float32)
        out[start:end] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out[:n], out[n:]


def exact_neighbours(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    return index.search(queries, k)[1]


def cells(sizes: str, dims: str, queries: int, k: int, max_gb: float, columns: int):
    """Each cell of a ``sizes`` x ``dims`` sweep (comma-separated): ``(n, d, data, queries, truth)``
    from :func:`clustered` and :func:`exact_neighbours`. A cell whose float data exceed ``max_gb`` is
    printed as a skipped row of the ``columns``-column table instead. A cell's arrays are released
    before the next one is made (one cell in memory at a time)."""
    for n in (int(s) for s in sizes.split(",")):
        for d in (int(s) for s in dims.split(",")):
            if n * d * 4 / 1e9 > max_gb:
                print(f"| {n:,} | {d} | (skipped: {n * d * 4 / 1e9:.1f} GB of floats > --max-gb {max_gb:g}) |"
                      + " |" * (columns - 3), flush=True)
                continue
            data, held_out = clustered(n, d, queries)
            yield n, d, data, held_out, exact_neighbours(data, held_out, k)
            del data, held_out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def build(spec: str, data: np.ndarray) -> tuple[VectorIndex, float, float]:
    """The index, its build seconds, and the bytes per vector of its saved files."""
    index = create_index(spec, data.shape[1], "cosine")
    started = time.perf_counter()
    index.build(data)
    seconds = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp(prefix="lens-bench-"))
    try:
        size = sum((folder / f).stat().st_size for f in index.save(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return index, seconds, size / len(data)


def search(index: VectorIndex, rerank: int, data: np.ndarray, queries: np.ndarray,
           k: int) -> tuple[np.ndarray, float]:
    """Top-k ids with one thread (candidates re-ranked exactly when ``rerank``), and queries/second."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        started = time.perf_counter()
        ids, _ = index.search(queries, max(k, rerank))
        if rerank > k:
            ids, _ = rerank_exact(queries, ids, data, "cosine", data.shape[1], k)
        seconds = time.perf_counter() - started
    finally:
        faiss.omp_set_num_threads(threads)
    return ids[:, :k], len(queries) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", default="128,1280,2048")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"of {', '.join(BACKENDS)}")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--max-gb", type=float, default=2.0, help="skip cells with more float data")
    args = parser.parse_args()
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"| n | d | backend | spec | build s | bytes/vector | QPS (1 thread) | recall@{args.k} |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for n, d, data, queries, truth in cells(args.sizes, args.dims, args.queries, args.k, args.max_gb, 8):
        built: dict[str, tuple[VectorIndex, float, float]] = {}
        for name in names:
            spec = BACKENDS[name](n, d)
            base = name.removesuffix("+rerank")
            if base not in built:
                built[base] = build(BACKENDS[base](n, d), data)
            index, seconds, size = built[base]
            ids, qps = search(index, RERANK if name.endswith("+rerank") else 0, data, queries, args.k)
            print(f"| {n:,} | {d} | {name} | `{spec}` | {seconds:.1f} | {size:,.0f} | {qps:,.0f} | "
                  f"{recall(ids, truth):.3f} |", flush=True)
        del built, data, queries


if __name__ == "__main__":
    main()
