"""Raw forward throughput of the deep backbones under each CPU lever, in one run.

For EfficientNet-Lite0 (real weights) and the ResNet-50 and DINOv2-small architectures (random
weights; speed does not depend on their values), images/s on pre-processed 224x224 batches of real
photos at batch sizes 1, 8 and 32, for:

- eager PyTorch with 1 and with 2 threads;
- eager PyTorch, channels_last memory format (2 threads);
- ONNX Runtime (the exported model lens runs on CPU) with 1 and with 2 threads.

    python -m benchmarks.levers                  # about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.build_throughput import CLOTHING, architecture_folders


def throughput(run, pixels: torch.Tensor, batch_size: int, seconds: float) -> float:
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    run(batches[0])
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for batch in batches:
            run(batch)
            count += len(batch)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="effnet,resnet50,vit")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()

    from lens.images import iter_image_files, load_image
    from lens.methods.deep import PRESETS, HFBackbone
    from lens.methods.runtime import OnnxForward

    files = list(iter_image_files(CLOTHING))
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:64]]
    folders = architecture_folders(Path(tempfile.mkdtemp(prefix="lens-levers-")))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"torch {torch.__version__}; img/s on pre-processed batches of 64 clothing photos")
    table = []
    for name in args.methods.split(","):
        preset, folder = folders[name]
        pooling = PRESETS[preset].pooling if preset in PRESETS else "auto"
        method = HFBackbone(name, folder, pooling, runtime="onnx")
        pixels = torch.stack([method.prepare(load_image(f)) for f in files])
        model, pool = method.model, method.pool

        def eager(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return pool(model(pixel_values=batch))

        def channels_last(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return pool(model(pixel_values=batch.contiguous(memory_format=torch.channels_last)))

        onnx = {threads: OnnxForward(method._onnx.path, threads) for threads in (1, 2)}
        variants = {
            "PyTorch, 1 thread": (eager, 1, False),
            "PyTorch, 2 threads": (eager, 2, False),
            "PyTorch channels_last, 2 threads": (channels_last, 2, True),
            "ONNX Runtime, 1 thread": (onnx[1], 2, False),
            "ONNX Runtime, 2 threads": (onnx[2], 2, False),
        }
        for label, (run, threads, last) in variants.items():
            torch.set_num_threads(threads)
            model.to(memory_format=torch.channels_last if last else torch.contiguous_format)
            rates = [throughput(run, pixels, size, args.seconds) for size in sizes]
            table.append((name, label, rates))
            print(f"{name:8s} {label:34s} " + "  ".join(f"batch {s}: {r:6.1f}" for s, r in zip(sizes, rates)),
                  flush=True)
        model.to(memory_format=torch.contiguous_format)
        torch.set_num_threads(2)
    print("\n| model | runtime | " + " | ".join(f"batch {s}" for s in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for name, label, rates in table:
        print(f"| {name} | {label} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
