"""Tuning the approximate indexes' search breadth for recall@10 >= 0.95: Annoy search_k, HNSW efSearch.

On the synthetic clustered vectors of ``benchmarks/index_backends.py`` (unit length, cosine), one
Annoy forest (lens's default 50 trees) and one HNSW32 graph are built per (n, d); then each search
setting is measured: recall@10 against exact search, and single-thread milliseconds per query. The
smallest setting reaching the target recall is marked.

    python -m benchmarks.ann_tuning                     # n = 10k and 100k, d = 384 and 1280; ~6 min
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from benchmarks.index_backends import clustered, exact_neighbours, recall
from lens.index import create_index

ANNOY_SEARCH_K = [-1, 2_000, 5_000, 10_000, 20_000, 50_000]  # -1: Annoy's own trees * k
EF_SEARCH = [16, 32, 64, 128, 256]


def timed(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Ids and milliseconds per query, one query at a time on one thread (as the app searches)."""
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    ids = np.concatenate([index.search(queries[i : i + 1], k)[0] for i in range(len(queries))])
    return ids, 1000 * (time.perf_counter() - started) / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", default="384,1280")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()
    k = 10
    print("| n | d | index | setting | recall@10 | ms/query (1 thread) |")
    print("|---:|---:|---|---|---:|---:|")
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            data, queries = clustered(n, d, args.queries)
            truth = exact_neighbours(data, queries, k)
            faiss.omp_set_num_threads(2)
            annoy = create_index("annoy", d, "cosine")
            annoy.build(data)
            hnsw = create_index("faiss:HNSW32", d, "cosine")
            faiss.omp_set_num_threads(2)
            hnsw.build(data)
            for label, index, settings, apply in [
                ("annoy (50 trees)", annoy, ANNOY_SEARCH_K, lambda v: setattr(annoy, "search_k", v)),
                ("HNSW32", hnsw, EF_SEARCH, lambda v: (hnsw.parameters.update(efSearch=v),
                                                        hnsw._apply_parameters())),
            ]:
                reached = False
                for value in settings:
                    apply(value)
                    ids, ms = timed(index, queries, k)
                    score = recall(ids, truth)
                    mark = " ← smallest ≥ target" if score >= args.target and not reached else ""
                    reached = reached or score >= args.target
                    name = "search_k" if label.startswith("annoy") else "efSearch"
                    shown = f"{name}={value}" if value != -1 else f"{name}=trees*k (default)"
                    print(f"| {n:,} | {d} | {label} | {shown} | {score:.3f}{mark} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
