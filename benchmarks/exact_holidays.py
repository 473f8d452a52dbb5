"""Holidays-subset mAP of the combined search (``auto``) against its two parts alone.

    flock /tmp/lens-heavy.lock .venv/bin/python benchmarks/exact_holidays.py \\
        --vocabulary /tmp/exact-bench/vocabulary-65536

Every query is ranked against the whole gallery (all images but itself), as ``lens eval`` does:
``local`` alone (verified matches, then the rest of its short list), the global embedding alone
(``--similar``, EfficientNet-Lite0 by default: 0.787 in docs/eval/holidays-subset), and ``auto``
(exact matches first, then the embedding's ranking). ``--vocabulary``: a saved vocabulary (e.g.
the one exact_matches.py learned); without it one is learned from the Holidays images themselves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from lens import Gallery
from lens.evaluation.datasets import load_dataset
from lens.images import load_image
from lens.evaluation.metrics import average_precision

DATA = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "data" / "holidays-subset")
    parser.add_argument("--similar", default=f"hf:{DATA / 'weights' / 'efficientnet_lite0.in1k'}")
    parser.add_argument("--vocabulary", default="", help="folder of a saved vocabulary for 'local'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exact-holidays"))
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    models = {"local": args.vocabulary} if args.vocabulary else {}
    gallery = Gallery(dataset.gallery_root, args.work, models=models)
    gallery.index(["local", args.similar], progress=False)
    in_gallery = set(dataset.gallery)
    depth = len(in_gallery)
    pictures = {path: load_image(path) for path in dataset.queries}
    report = {}
    for method in ("local", args.similar, "auto"):
        aps, times, exact_right, exact_all = [], [], 0, 0
        for path, picture in pictures.items():
            own = dataset.exclude.get(path)
            started = time.perf_counter()
            results = gallery.search(picture, method, k=depth + 1)
            times.append((time.perf_counter() - started) * 1000)
            kept = [r for r in results if r.path != own and r.path in in_gallery][:depth]
            relevant = dataset.relevant[path]
            flags = [r.path in relevant for r in kept]
            exact = [f for r, f in zip(kept, flags) if r.match == "exact"]
            exact_all, exact_right = exact_all + len(exact), exact_right + sum(exact)
            scores = None if method == "auto" else [r.score for r in kept]  # mixed kinds: no ties
            ap = average_precision(flags, scores, len(relevant))
            if ap is not None:
                aps.append(ap)
        report[method] = {"mAP": float(np.mean(aps)), "queries": len(aps), "p50_ms": statistics.median(times),
                          "exact_results": exact_all, "exact_precision": exact_right / max(1, exact_all)}
        print(method, json.dumps(report[method]), flush=True)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
