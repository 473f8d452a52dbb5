"""Index-build throughput of the deep methods against the model's raw forward throughput.

For each deep method and runtime (eager PyTorch, ONNX Runtime) and batch size, in one run:

- **raw forward**: images/s of the model alone on batches of pre-decoded, pre-processed tensors (no
  file reads, no decoding, no resizing), the best of two ways: one batch at a time through
  ``embed_prepared`` (an ONNX Runtime session using every thread), and ``streams`` batches side by
  side through ``embed_stream`` (one-thread sessions, as bulk embedding runs them). This is the
  model's own limit at that batch size;
- **index build**: images/s of ``Gallery.index`` on a fresh index of the same image files, end to
  end (file reads, decoding and preprocessing overlapped with the model on worker threads, the
  index built and the build published);
- **naive**: images/s of the obvious loop (read one image, call the model on it, next);

and prints build/raw (target >= 0.9) and build/naive, and the ceiling of build/raw on this machine:
with every core busy running the model, decoding can only take time from it, so the ratio cannot
pass model / (model + decoding) in core-milliseconds per image.

Methods: EfficientNet-Lite0 with its real ImageNet weights from ../shared, and ResNet-50 and
DINOv2-small (the ``resnet50`` and ``vit`` presets' architectures) random-initialised, since their
weights are not on this machine: the time of a forward pass does not depend on the weights' values.

    python -m benchmarks.build_throughput                       # about 12 minutes on 2 cores
    python -m benchmarks.build_throughput --methods effnet --batch-sizes 1,8,32 --images 512
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
EFFNET = SHARED / "weights" / "efficientnet_lite0.in1k"
CLOTHING = SHARED / "data" / "clothing" / "train"


def architecture_folders(work: Path) -> dict[str, tuple[str, str]]:
    """method name -> (preset, model folder): the real EfficientNet-Lite0 and two random-initialised ones."""
    from transformers import (BitImageProcessor, ConvNextImageProcessor, Dinov2Config, Dinov2Model,
                              ResNetConfig, ResNetModel)

    resnet, dinov2 = work / "resnet-50-random", work / "dinov2-small-random"
    if not resnet.exists():
        ResNetModel(ResNetConfig()).eval().save_pretrained(resnet)  # the microsoft/resnet-50 architecture
        ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(resnet)
    if not dinov2.exists():  # the facebook/dinov2-small architecture and processor
        Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14)
                    ).eval().save_pretrained(dinov2)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                          do_center_crop=True, resample=3,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dinov2)
    return {"effnet": ("hf", str(EFFNET)), "resnet50": ("resnet50", str(resnet)), "vit": ("vit", str(dinov2))}


class Row(NamedTuple):
    name: str
    runtime: str
    batch_size: int
    one_at_a_time: float  #: raw forward img/s, one batch at a time
    streams: float  #: raw forward img/s in side-by-side streams (0 when the method has one stream)
    built: float  #: index build img/s
    naive: float  #: one image at a time, img/s
    decode_ms: float  #: read + decode + preprocess, ms per image
    ceiling: float  #: the best build / raw this machine allows

    @property
    def raw(self) -> float:
        return max(self.one_at_a_time, self.streams)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def raw_forward(method, prepared: list, batch_size: int, *, streams: int = 1, repeats: int = 2) -> float:
    """Images/s of the model alone on pre-processed tensors, best of ``repeats`` passes.

    ``streams == 1``: one batch at a time through ``embed_prepared`` (how queries run the model);
    more: that many batches side by side through ``embed_stream`` (how bulk embedding runs it).
    """
    from concurrent.futures import ThreadPoolExecutor

    batches = [prepared[i : i + batch_size] for i in range(0, len(prepared), batch_size)]
    best = 0.0
    with ThreadPoolExecutor(streams) as pool:
        if streams == 1:  # on the calling thread, as a query runs
            def run_all(batches: list) -> None:
                for batch in batches:
                    method.embed_prepared(batch)
        else:
            def run_all(batches: list) -> None:
                list(pool.map(method.embed_stream, batches))
        run_all(batches[:streams])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            run_all(batches)
            best = max(best, rate(len(prepared), time.perf_counter() - started))
    return best


def index_build(spec: str, model: str, files: list[Path], batch_size: int, work: Path, repeats: int = 2) -> float:
    """Images/s of a fresh ``Gallery.index`` over ``files`` (linked into one folder), best of ``repeats``.

    The method is loaded, and a 16-image gallery indexed with it, before the clock starts: the first
    build in a process pays about 0.3-1 s once (lazy imports, the bulk session's first runs), which
    would distort a rate taken over a few hundred images. Best of two, like the raw forward.
    """
    _fresh_index(spec, model, files[:16], batch_size, work)
    reports = [_fresh_index(spec, model, files, batch_size, work) for _ in range(repeats)]
    return max(rate(report.count, report.seconds) for report in reports)


def _fresh_index(spec: str, model: str, files: list[Path], batch_size: int, work: Path):
    from lens import Gallery

    folder = Path(tempfile.mkdtemp(prefix="gallery-", dir=work))
    for i, path in enumerate(files):
        (folder / f"{i:05d}{path.suffix}").symlink_to(path.resolve())
    gallery = Gallery(folder, folder.with_name(folder.name + "-idx"), models={spec: model})
    gallery.method(spec)  # loaded (and exported) before the clock starts, as in a running app
    [report] = gallery.index([spec], batch_size=batch_size, progress=False)
    assert report.count == len(files), report.skipped
    return report


def naive(method, files: list[Path]) -> float:
    """Images/s of one image at a time: read, decode, preprocess, model call."""
    from lens.images import load_image

    method.embed([load_image(files[0])])
    started = time.perf_counter()
    for path in files:
        method.embed([load_image(path)])
    return rate(len(files), time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="effnet,resnet50,vit")
    parser.add_argument("--runtimes", default="torch,onnx")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--images", type=int, default=256, help="images per measurement (effnet: 2x)")
    parser.add_argument("--naive-images", type=int, default=48)
    parser.add_argument("--folder", type=Path, default=CLOTHING, help="image files to index")
    args = parser.parse_args()

    from lens.images import iter_image_files, load_image
    from lens.methods.deep import HFBackbone, PRESETS

    files = list(iter_image_files(args.folder))
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"images from {args.folder}")
    work = Path(tempfile.mkdtemp(prefix="lens-throughput-"))
    folders = architecture_folders(work)
    rows = []
    for name in args.methods.split(","):
        preset, folder = folders[name]
        spec = f"hf:{folder}" if preset == "hf" else preset
        count = args.images * (2 if name == "effnet" else 1)
        subset = files[:count]
        for runtime in args.runtimes.split(","):
            os.environ["LENS_RUNTIME"] = runtime
            pooling = PRESETS[preset].pooling if preset in PRESETS else "auto"
            method = HFBackbone(spec, folder, pooling, runtime=runtime)
            started = time.perf_counter()
            prepared = [method.prepare(load_image(path)) for path in subset]
            decode_ms = 1000 * (time.perf_counter() - started) / len(subset)
            one_by_one = naive(method, subset[: args.naive_images])
            cores = min(os.cpu_count() or 1, torch.get_num_threads())
            for batch_size in map(int, args.batch_sizes.split(",")):
                one_at_a_time = raw_forward(method, prepared, batch_size)
                side_by_side = (raw_forward(method, prepared, batch_size, streams=method.streams)
                                if method.streams > 1 else 0.0)
                raw = max(one_at_a_time, side_by_side)
                built = index_build(spec, folder, subset, batch_size, work)
                model_ms = 1000 * cores / raw  # core-milliseconds per image of the model at its best
                ceiling = model_ms / (model_ms + decode_ms)
                rows.append(Row(name, method.runtime, batch_size, one_at_a_time, side_by_side, built, one_by_one,
                                decode_ms, ceiling))
                print(f"{name:8s} {method.runtime:11s} batch {batch_size:3d}: raw forward {one_at_a_time:6.1f} "
                      f"img/s one batch at a time, {side_by_side:6.1f} in {method.streams} streams; index build "
                      f"{built:6.1f} img/s (x{built / raw:.2f} of raw, ceiling x{ceiling:.2f}), naive "
                      f"{one_by_one:6.1f} img/s (build x{built / one_by_one:.1f}); read+decode+preprocess "
                      f"{decode_ms:.1f} ms/img", flush=True)
            del method, prepared
    print("\n| method | runtime | batch | raw forward img/s, one batch at a time | raw forward img/s, streams "
          "| index build img/s | build / best raw | ceiling | naive img/s | build / naive "
          "| read+decode+prep ms/img (1 thread) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        side = f"{r.streams:.1f}" if r.streams else "–"
        print(f"| {r.name} | {r.runtime} | {r.batch_size} | {r.one_at_a_time:.1f} | {side} | {r.built:.1f} | "
              f"{r.built / r.raw:.2f} | {r.ceiling:.2f} | {r.naive:.1f} | {r.built / r.naive:.1f}x | {r.decode_ms:.1f} |")
    fastest = {r.name: max((o for o in rows if o.name == r.name), key=lambda o: o.built) for r in rows}
    print("\nfastest build per method: " + ", ".join(
        f"{n} {r.runtime} batch {r.batch_size}: {r.built:.1f} img/s = x{r.built / r.raw:.2f} of raw, "
        f"x{r.built / r.naive:.1f} of naive" for n, r in fastest.items()))

if __name__ == "__main__":
    main()
