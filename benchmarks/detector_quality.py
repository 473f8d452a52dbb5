"""Detector quality on a COCO-format set: box mAP (pycocotools) and main-subject agreement.

    .venv/bin/python benchmarks/detector_quality.py [--detector yolo] [--weights PATH] [--data DIR]

Defaults: the int8 TFLite YOLOv8n and ../shared/data/coco-mini. Detections are made once at a low
threshold (conf 0.001, up to 300 boxes) for mAP; the main-subject rules see what a user sees
(conf 0.25, 20 boxes). See lens/evaluation/detect_eval.py for the agreement criterion.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lens.detect import create_detector  # noqa: E402
from lens.evaluation.detect_eval import RULES, coco_map, detect_coco, main_subject_agreement  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="yolo")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n_int8.tflite"))
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "coco-mini",
                        help="folder with images/ and instances_val2017.json")
    args = parser.parse_args()

    detector = create_detector(args.detector, args.weights, conf=0.001, max_boxes=300)
    started = time.perf_counter()
    found = detect_coco(detector, args.data / "images", args.data / "instances_val2017.json")
    seconds = time.perf_counter() - started
    scores = coco_map(found)
    print(f"{args.detector} {args.weights} on {args.data}: {len(found.boxes)} images in {seconds:.1f} s")
    print(f"mAP@0.5:0.95 {scores['map']:.3f}   mAP@0.5 {scores['map50']:.3f}")
    print("share of images whose chosen box matches (IoU >= 0.5, same class)")
    print(f"  {'rule':<14} {'a top-3 object':>14} {'any object':>11}")
    for name, rule in RULES.items():
        top3, anything = (main_subject_agreement(found, rule, top) for top in (3, sys.maxsize))
        print(f"  {name:<14} {top3:14.3f} {anything:11.3f}")


if __name__ == "__main__":
    main()
