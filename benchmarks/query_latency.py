"""Query latency from a box click to results, per method, at gallery sizes 1k, 10k and 100k.

What is timed is what the app does after a click when the photo's detections are cached:
``LensService.search(photo, method, k=10, box)``: crop the box (with its margin), embed the crop,
search the method's index, re-rank where the method does (SIFT), and return the results. Queries are
clothing test photos (not in the gallery) with a box covering the middle of the photo; each is
searched once to warm up, then ``--queries`` times; p50 and p95 over all of them.

Sizes: the real gallery (``--images`` clothing photos, every method indexed by ``lens``) is padded
with synthetic rows to each size: vectors drawn around the real ones (Gaussian noise, renormalised;
bit codes with flipped bits), under made-up paths. They go through the same index layer with the
default index for the size (Annoy up to 10k, HNSW above; bit codes Annoy), published as a normal
build. SIFT is measured on the real gallery only: its re-ranking needs each image's real keypoints.

Recall@10 of each index against exact search on the same vectors is printed too.

    python -m benchmarks.query_latency                          # about 12 minutes on 2 cores
    python -m benchmarks.query_latency --sizes 1000,10000 --methods effnet,phash
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.serving_gallery import SHARED_TEST, environment, prepare


def pad_build(gallery, spec: str, size: int, target: Path, rng: np.random.Generator) -> float:
    """Publish ``spec``'s real build padded to ``size`` rows into ``target``; returns recall@10 of its index."""
    from lens.evaluation.evaluate import exact_top
    from lens.index import create_index, default_index
    from lens.store import Item, open_build, publish

    stored = gallery.open(spec)
    method = gallery.method(spec)  # not SIFT, whose fitted state cannot be padded
    real = np.asarray(stored.vectors)
    extra = size - len(real)
    base = real[rng.integers(0, len(real), extra)]
    if stored.index.metric == "hamming":
        bits = np.unpackbits(base, axis=1)
        flips = rng.random(bits.shape) < 0.15
        synthetic = np.packbits(bits ^ flips, axis=1)
    else:
        noisy = base + rng.normal(0, 0.6 / np.sqrt(real.shape[1]), base.shape).astype(np.float32)
        synthetic = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    vectors = np.concatenate([real, synthetic])
    items = list(stored.items) + [Item(f"synthetic/{i:06d}.jpg", 0, 0) for i in range(extra)]
    index = create_index(default_index(size, stored.index.metric), stored.index.dim, stored.index.metric)
    index.build(vectors)
    method_dir = target / gallery.method_dir(spec).name
    publish(method_dir, method.info, items, vectors, index, build={"synthetic_rows": extra})
    # recall@10 against exact search, for 50 real rows as queries
    queries = vectors[rng.choice(len(real), 50, replace=False)]
    found, _ = open_build(method_dir, method.info).index.search(queries, 10)
    exact = exact_top(vectors, queries, stored.index.metric, 10)
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--methods", default="effnet,resnet50,vit,siamese,autoencoder,phash,sift")
    parser.add_argument("--images", type=int, default=1000, help="real gallery images (the 1k size)")
    parser.add_argument("--queries", type=int, default=20, help="timed searches per method and size")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lens-serving-bench")
    args = parser.parse_args()

    from lens import Gallery
    from lens.images import iter_image_files, load_image
    from lens.service import LensService

    print(environment())
    names = args.methods.split(",")
    gallery_dir, index_dir, specs, models = prepare(args.work, args.images, names)
    photos = list(iter_image_files(SHARED_TEST))
    photos = [photos[i] for i in np.random.default_rng(2).permutation(len(photos))[: args.queries]]
    queries = [load_image(p) for p in photos]
    boxes = [(w * 0.15, h * 0.1, w * 0.85, h * 0.9) for w, h in (q.size for q in queries)]
    rng = np.random.default_rng(0)
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = {name: len(Gallery(gallery_dir, index_dir, models=models).open(specs[name]).items) for name in names}
    for size in sizes:
        for name in names:
            spec, count = specs[name], counts[name]
            if name == "sift":  # the real gallery only, once
                if size != sizes[0]:
                    continue
                size_here = count
            elif size < count:
                continue
            else:
                size_here = size
            real = Gallery(gallery_dir, index_dir, models=models)
            target = index_dir if size_here == count else args.work / f"padded-{size_here}"
            recall = 1.0
            if target != index_dir:
                recall = pad_build(real, spec, size_here, target, rng)
            gallery = Gallery(gallery_dir, target, models=models)
            service = LensService(gallery, [spec], detector="yolo")
            service.start(background=False, build_missing=False)
            for query, box in zip(queries, boxes):  # warm-up: model loaded, index paged in
                service.search(query, spec, 10, box)
            times = []
            for query, box in zip(queries, boxes):
                started = time.perf_counter()
                outcome = service.search(query, spec, 10, box)
                times.append(1000 * (time.perf_counter() - started))
                assert len(outcome.results) == 10
            p50, p95 = np.percentile(times, [50, 95])
            index_spec = gallery.open(spec).manifest["index"]
            rows.append((name, size_here, index_spec, p50, p95, recall))
            print(f"{name:12s} {size_here:7,d} images  {index_spec:26s} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  "
                  f"recall@10 {recall:.3f}", flush=True)
            if target != index_dir:
                shutil.rmtree(target, ignore_errors=True)
    print("\n| method | gallery | index | p50 ms | p95 ms | index recall@10 |")
    print("|---|---:|---|---:|---:|---:|")
    for name, size, spec, p50, p95, recall in rows:
        print(f"| {name} | {size:,} | `{spec}` | {p50:.1f} | {p95:.1f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
