"""Classic methods on the INRIA Holidays subset in ../shared: mAP and time per query.

Every query of ``groundtruth.json`` is searched in the gallery of all other images (the query's own
result is dropped); AP is computed over the results returned (``k`` = the gallery for the hashes
and for SIFT without re-ranking; SIFT with re-ranking returns its re-ranked candidates only, so its
AP is a lower bound).

    .venv/bin/python benchmarks/holidays_classic.py [--runs phash,dhash,ahash,sift@0,sift@20,sift@50]

``sift@N`` = SIFT with the top N VLAD candidates re-ranked by RANSAC inliers (0: VLAD order).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from near_duplicates import average_precision  # noqa: E402

from lens import Gallery  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "holidays-subset"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="phash,dhash,ahash,sift@0,sift@20,sift@50")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not (args.data / "groundtruth.json").is_file():
        raise SystemExit(f"needs {args.data} (the holidays subset of ../shared)")
    queries = json.loads((args.data / "groundtruth.json").read_text())["queries"]
    runs = [r.strip().partition("@") for r in args.runs.split(",") if r.strip()]
    methods = list(dict.fromkeys(method for method, _, _ in runs))
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(args.data / "images", Path(tmp))
        print(f"{len(queries)} queries, {len(gallery.scan())} images\n")
        print("| method | re-ranked | mAP | index s | ms / query |")
        print("|---|---:|---:|---:|---:|")
        indexed = {r.method: r.seconds for r in gallery.index(methods, progress=False)}
        for method, _, rerank in runs:
            depth = int(rerank) if rerank else 0
            k = depth + 1 if depth else len(gallery.open(method).items)
            started = time.perf_counter()
            results = gallery.search_many([args.data / "images" / q for q in queries], method, k=k,
                                          rerank=depth)
            per_query = (time.perf_counter() - started) / len(queries) * 1000
            mean_ap = np.mean([average_precision([r.path for r in found if r.path != query], set(relevant))
                               for (query, relevant), found in zip(queries.items(), results)])
            print(f"| {method} | {depth or '-'} | {mean_ap:.3f} | {indexed[method]:.0f} | {per_query:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
