"""Index-build throughput on one machine: single-process ``Gallery.index`` against ``--ray`` (a local Ray).

In one run, each on a fresh index of the same image files with the same method:

- **single process**: ``Gallery.index`` as ``lens index`` runs it (decoding threads overlapped with
  the model, ONNX Runtime on CPU);
- **ray, N actors**: ``Gallery.index(..., ray=RayCluster(num_cpus=CPUS, actors=N))``: a Ray Data
  pipeline whose N actors each load the model once and embed batches of paths; the local Ray is
  started once before the first Ray build (its start-up is printed apart and not counted).

Printed per way: embedding images/s (images embedded / embedding seconds,
``IndexReport.images_per_second``), the whole build's seconds (embedding + index + publishing; for Ray, actor start-up and
model loads included), and whether the stored vectors equal the single-process ones.

    flock /tmp/lens-heavy.lock python -m benchmarks.ray_embedding      # 4,000 distractors, ~5 min on 2 cores
    python -m benchmarks.ray_embedding --images 400 --actors 1,2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
DISTRACTORS = SHARED / "data" / "distractors" / "images"
EFFNET = SHARED / "weights" / "efficientnet_lite0.in1k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DISTRACTORS)
    parser.add_argument("--method", default=f"hf:{EFFNET}")
    parser.add_argument("--images", type=int, help="use only the first N images (sorted by name)")
    parser.add_argument("--actors", default="2", help="comma-separated actor counts to try (default: 2)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    args = parser.parse_args()

    from lens.distributed import RayCluster
    from lens.gallery import Gallery

    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if args.images:
        files = files[: args.images]
    gallery_files = {p.name: p for p in files}
    print(f"{len(files)} images from {args.folder}; method {args.method}; {os.cpu_count()} CPU cores")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lens-ray-bench-") as work:
        work_dir = Path(work)
        single = Gallery(args.folder, work_dir / "single", files=gallery_files)
        started = time.perf_counter()
        [report] = single.index([args.method], progress=False)
        rows.append(("single process", report, time.perf_counter() - started, True))
        expected = np.asarray(single.open(args.method).vectors)

        cluster = RayCluster(num_cpus=args.cpus, temp_dir=str(work_dir / "ray"))
        started = time.perf_counter()
        cluster.start()
        print(f"local Ray started in {time.perf_counter() - started:.1f} s (not counted below)")
        try:
            for actors in [int(a) for a in args.actors.split(",") if a.strip()]:
                cluster.actors = actors
                on_ray = Gallery(args.folder, work_dir / f"ray-{actors}", files=gallery_files)
                started = time.perf_counter()
                [report] = on_ray.index([args.method], progress=False, ray=cluster)
                seconds = time.perf_counter() - started
                same = np.array_equal(np.asarray(on_ray.open(args.method).vectors), expected)
                rows.append((f"ray, {actors} actor{'s' if actors > 1 else ''} x {cluster.cpus_per_actor} CPU",
                             report, seconds, same))
        finally:
            cluster.stop()
    print(f"{'way':<28} {'embedded':>8} {'embed img/s':>11} {'build s':>8}  vectors = single process")
    for name, report, seconds, same in rows:
        print(f"{name:<28} {report.embedded:>8} {report.images_per_second:>11.1f} {seconds:>8.1f}  {same}")


if __name__ == "__main__":
    main()
