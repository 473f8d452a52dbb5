"""Reduced precision for the CNN backbone: speed and mAP on ../shared/data/holidays-subset.

EfficientNet-Lite0 (real ImageNet weights) in four forms, all fed the model's own preprocessing:

- eager PyTorch, float32 (the reference);
- ONNX Runtime, float32 (what lens runs on CPU);
- ONNX Runtime, int8 weights with dynamic activation quantisation (``quantize_dynamic``);
- ONNX Runtime, int8 static QDQ quantisation calibrated on 64 gallery images (``quantize_static``).

For each: images/s at batch 8 on pre-processed tensors, and mAP over the 805-image Holidays subset
(each query against every other image, exact cosine ranking, lens's tie-aware AP). The acceptance
line for a reduced-precision variant is mAP within 0.5 points of float32.

    python -m benchmarks.precision          # about 4 minutes on 2 cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.build_throughput import EFFNET, SHARED
from benchmarks.levers import throughput
from lens.evaluation.metrics import average_precision

HOLIDAYS = SHARED / "data" / "holidays-subset"


def holidays_map(vectors: np.ndarray, names: list[str], groundtruth: dict[str, list[str]],
                 gallery: np.ndarray | None = None) -> float:
    """mAP over the Holidays queries: each query's vector from ``vectors``, the images it is ranked
    against from ``gallery`` (default: ``vectors`` too), exact cosine, the query left out."""
    gallery = vectors if gallery is None else gallery
    row = {name: i for i, name in enumerate(names)}
    scores = []
    for query, relevant in groundtruth.items():
        q = row[query]
        similarities = gallery @ vectors[q]
        order = [i for i in np.argsort(-similarities, kind="stable") if i != q]
        wanted = {row[r] for r in relevant}
        scores.append(average_precision([i in wanted for i in order], similarities[order], len(wanted)))
    return float(np.mean([s for s in scores if s is not None]))


def main() -> None:
    import json

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    from lens.images import load_image
    from lens.methods.deep import HFBackbone

    truth = json.loads((HOLIDAYS / "groundtruth.json").read_text())["queries"]
    files = sorted((HOLIDAYS / "images").glob("*.jpg"))
    names = [f.name for f in files]  # ground truth names images by file name
    method = HFBackbone("effnet", str(EFFNET), runtime="onnx")
    eager = HFBackbone("effnet", str(EFFNET), runtime="torch")
    pixels = torch.stack([method.prepare(load_image(f)) for f in files])
    print(f"Holidays subset: {len(files)} images, {len(truth)} queries; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {torch.get_num_threads()} threads")

    work = Path(tempfile.mkdtemp(prefix="lens-precision-"))
    fp32 = method._onnx.path
    dynamic, static = work / "int8-dynamic.onnx", work / "int8-static.onnx"
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8)

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": pixels[i : i + 8].numpy()} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(static), Calibration(), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

    def session(path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        run = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda batch: torch.from_numpy(run.run(None, {"pixels": batch.numpy()})[0])

    variants = {
        "PyTorch eager, float32": lambda batch: eager.features(batch),
        "ONNX Runtime, float32": session(fp32),
        "ONNX Runtime, int8 dynamic": session(dynamic),  # ConvInteger kernels: slow on CPU
        "ONNX Runtime, int8 static (QDQ)": session(static),
    }
    rows = []
    for label, run in variants.items():
        features = torch.cat([run(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]).numpy()
        vectors = features / np.linalg.norm(features, axis=1, keepdims=True)
        rows.append((label, throughput(run, pixels[:256], 8, 8.0), holidays_map(vectors, names, truth)))
        print(f"{label:34s} {rows[-1][1]:7.1f} img/s  mAP {rows[-1][2]:.4f}", flush=True)
    base = rows[1][2]
    print("\n| EfficientNet-Lite0 | img/s (batch 8) | Holidays mAP | vs ONNX float32 |")
    print("|---|---:|---:|---:|")
    for label, rate, score in rows:
        print(f"| {label} | {rate:.1f} | {score:.4f} | {100 * (score - base):+.2f} points |")


if __name__ == "__main__":
    main()
