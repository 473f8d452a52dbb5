"""EfficientNet-Lite0's preprocessing: its timm processor (PIL) against the same steps in torchvision.

The model's own processor (``TimmWrapperImageProcessor``: PIL bicubic resize of the shorter side to
224 / 0.875, centre crop 224, normalise) is the CPU cost that keeps its index build below the model's
raw throughput (docs/performance.md, section 1). This measures the alternative lens did not adopt:
the same steps on uint8 tensors with torchvision (antialiased bicubic, as transformers' own
processors do):

- milliseconds per decoded clothing photo (one thread), both ways;
- pixel differences, the cosine between each image's two embeddings, and Holidays mAP both ways.

    python -m benchmarks.preprocessing            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from benchmarks.build_throughput import CLOTHING, EFFNET
from benchmarks.precision import HOLIDAYS, holidays_map


def main() -> None:
    from lens.images import iter_image_files, load_image
    from lens.methods.deep import HFBackbone

    method = HFBackbone("effnet", str(EFFNET))
    config = method.processor.data_config
    shorter = int(config["input_size"][-1] / config["crop_pct"])
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)

    def torchvision_prepare(image):
        pixels = F.resize(F.pil_to_tensor(image), shorter, interpolation=F.InterpolationMode.BICUBIC,
                          antialias=True)
        pixels = F.center_crop(pixels, list(config["input_size"][-2:]))
        return (pixels.float() / 255 - mean) / std

    photos = [load_image(p) for p in list(iter_image_files(CLOTHING))[:200]]
    for label, prepare in (("timm processor (PIL)", method.prepare), ("torchvision, uint8", torchvision_prepare)):
        prepare(photos[0])
        started = time.perf_counter()
        for photo in photos:
            prepare(photo)
        print(f"{label:22s} {1000 * (time.perf_counter() - started) / len(photos):.2f} ms per photo")

    files = sorted((HOLIDAYS / "images").glob("*.jpg"))
    images = [load_image(f) for f in files]
    a = torch.stack([method.prepare(i) for i in images[:50]])
    b = torch.stack([torchvision_prepare(i) for i in images[:50]])
    scale = float(std.mean()) * 255  # back to 0-255 intensity levels
    print(f"pixel difference (0-255 levels): max {float((a - b).abs().max()) * scale:.2f}, "
          f"mean {float((a - b).abs().mean()) * scale:.4f}")

    def embed(prepare) -> np.ndarray:
        return np.concatenate([method.embed_prepared([prepare(i) for i in images[s : s + 32]])
                               for s in range(0, len(images), 32)])

    own, fast = embed(method.prepare), embed(torchvision_prepare)
    cosines = np.sum(own * fast, axis=1)
    truth = json.loads((HOLIDAYS / "groundtruth.json").read_text())["queries"]
    names = [f.name for f in files]
    print(f"embedding cosine: min {cosines.min():.5f}, median {np.median(cosines):.6f}")
    print(f"Holidays mAP: timm processor {holidays_map(own, names, truth):.4f}, "
          f"torchvision {holidays_map(fast, names, truth):.4f}")


if __name__ == "__main__":
    main()
