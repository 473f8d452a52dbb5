"""mAP and Recall@1 of trained methods on the clothing data: queries = test, gallery = train.

    python -m benchmarks.clothing_training                         # after the `lens train` runs
    python -m benchmarks.clothing_training --methods siamese,hf:../shared/weights/efficientnet_lite0.in1k

Everything goes through the public API: ``Gallery(train).index(methods)`` builds (or refreshes) the
indexes, ``Gallery.search_many`` answers every test picture with the whole gallery ranked (k = gallery
size). A gallery image is relevant to a query when it has the query's class (its sub-folder). Trained
methods use the models ``lens train`` wrote for the gallery (``models/train/<method>``) unless
``--models DIR`` names another folder holding ``DIR/<method>``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from lens import Gallery  # noqa: E402
from lens.images import iter_image_files  # noqa: E402
from lens.methods import is_trained  # noqa: E402
from lens.evaluation.metrics import average_precision  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clothing"
BACKBONE = "hf:../shared/weights/efficientnet_lite0.in1k"


def evaluate(gallery: Gallery, method: str, queries: list[Path], batch: int = 32) -> dict[str, float]:
    count = len(gallery.open(method).items)
    gallery_classes = [item.path.split("/")[0] for item in gallery.open(method).items]
    per_class = {c: gallery_classes.count(c) for c in set(gallery_classes)}
    aps, top1, short = [], [], 0
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        chunk = queries[start : start + batch]
        for query, results in zip(chunk, gallery.search_many(chunk, method, k=count)):
            label = query.parent.name
            relevant = np.array([r.path.split("/")[0] == label for r in results], dtype=np.float64)
            short += len(results) < count
            aps.append(average_precision(relevant, None, per_class.get(label, 0)) or 0.0)
            top1.append(bool(relevant[:1].sum()))
    seconds = time.perf_counter() - started
    return {"mAP": float(np.mean(aps)), "R@1": float(np.mean(top1)), "query_s": seconds,
            "incomplete": short}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="clothing folder with train/ and test/")
    parser.add_argument("--methods", default=f"autoencoder,siamese,{BACKBONE}")
    parser.add_argument("--models", type=Path, help="folder holding the trained models (default: models/train)")
    parser.add_argument("--index-dir", type=Path, default=Path("indexes") / "clothing-train")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"needs {args.data}/train and test (../shared is not present)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = {m: str(args.models / m) for m in methods if args.models and is_trained(m)}
    gallery = Gallery(args.data / "train", args.index_dir, models=models)
    queries = list(iter_image_files(args.data / "test"))
    print(f"gallery: {len(gallery.scan())} images in {args.data / 'train'}; queries: {len(queries)} "
          f"from {args.data / 'test'}")
    rows = []
    for method in methods:
        [report] = gallery.index([method], progress=False)
        scores = evaluate(gallery, method, queries)
        rows.append((method, scores))
        print(f"{method}: mAP {scores['mAP']:.4f}  R@1 {scores['R@1']:.4f}  (indexed {report.count} "
              f"in {report.seconds:.0f} s, {report.embedded} embedded; {len(queries)} queries in "
              f"{scores['query_s']:.0f} s; {scores['incomplete']} incomplete rankings)", flush=True)
    print("\n| method | mAP | Recall@1 |\n|---|---|---|")
    for method, scores in rows:
        print(f"| `{method}` | {scores['mAP']:.3f} | {scores['R@1']:.3f} |")
    by_name = dict(rows)
    if "siamese" in by_name and BACKBONE in by_name:
        ratio = by_name["siamese"]["mAP"] / by_name[BACKBONE]["mAP"]
        print(f"\nsiamese / untrained backbone mAP: {ratio:.2f}x")


if __name__ == "__main__":
    main()
