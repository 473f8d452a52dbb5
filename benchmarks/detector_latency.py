"""Median latency of one `Detector.detect` call (pre- and post-processing included) on a 640-px photo.

    .venv/bin/python benchmarks/detector_latency.py [--runs 15] [--threads 2]

Detectors timed, all through ``lens.detect.create_detector``:

- ``yolo`` with the int8 TFLite YOLOv8n of ../shared (skipped when absent), 640-px letterbox;
- ``yolo`` with YOLO11n built from its yaml (random weights: speed only), 640-px letterbox;
- ``retinanet`` with random weights (speed only), longer side 640 and torchvision's default 800/1333.

torch and the TFLite interpreter are both limited to ``--threads`` threads. Prints one line per
detector and its ratio to the fastest, all measured in this one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lens.detect import Detector, create_detector  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def photo() -> Image.Image:
    """scikit-image's coffee photo (600x400) scaled to 640x427."""
    from skimage import data

    return Image.fromarray(data.coffee()).resize((640, 427), Image.Resampling.BICUBIC)


def median_ms(detector: Detector, image: Image.Image, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        detector.detect(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        detector.detect(image)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tflite", type=Path, default=SHARED / "weights" / "yolov8n_int8.tflite")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import ultralytics.nn.backends.litert as litert

    litert.NUM_THREADS = args.threads  # ultralytics uses cpu_count - 1 interpreter threads otherwise

    from ultralytics import YOLO

    scratch = Path(tempfile.mkdtemp(prefix="lens-bench-"))
    random_yolo = scratch / "yolo11n-random.pt"
    YOLO("yolo11n.yaml").save(random_yolo)

    candidates: list[tuple[str, str, str | None, dict]] = []
    if args.tflite.is_file():
        candidates.append(("yolo  yolov8n int8 TFLite, 640", "yolo", str(args.tflite), {}))
    else:
        print(f"(no {args.tflite}: the TFLite YOLO is not timed)")
    candidates += [
        ("yolo  yolo11n .pt (random weights), 640", "yolo", str(random_yolo), {}),
        ("retinanet resnet50_fpn_v2 (random), longer side 640", "retinanet", "random", {"imgsz": 640}),
        ("retinanet resnet50_fpn_v2 (random), 800/1333 default", "retinanet", "random", {}),
    ]
    image = photo()
    print(f"image {image.width}x{image.height}, {args.threads} threads, median of {args.runs} runs, "
          f"torch {torch.__version__}, device cpu")
    timings = []
    for label, name, weights, options in candidates:
        detector = create_detector(name, weights, device="cpu", **options)
        runs = args.runs if name == "yolo" else max(5, args.runs // 3)
        timings.append((label, median_ms(detector, image, runs)))
    fastest = min(ms for _, ms in timings)
    for label, ms in timings:
        print(f"{label:<55} {ms:8.1f} ms   x{ms / fastest:5.1f}")


if __name__ == "__main__":
    main()
