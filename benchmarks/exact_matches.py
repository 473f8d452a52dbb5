"""Exact-item search ("local") at scale: recall, latency, build rate, memory, part-of-image, scale sweep.

    flock /tmp/lens-heavy.lock .venv/bin/python benchmarks/exact_matches.py --work /tmp/exact-bench --fresh

1. The vocabulary is learned once (``LocalMatcher.fit`` on the full gallery, timed) and saved; every
   gallery below reuses it (``--model local=FOLDER``), as a deployment would.
2. Galleries: the lens-task catalogue alone (400), and the catalogue with the distractors
   (``--distractors``, ≈8,300 images). Each query is searched through ``Gallery.search`` one at a
   time, decode included; R@1, R@10, p50/p95 ms, and how often the top result was marked exact and
   right.
3. Part of an image: one generated crop (30–50% of the area, seeded) of every catalogue image, searched
   in the large gallery.
4. Build: images/s of ``Gallery.index`` and where the time goes (decode, SIFT, quantisation per image
   on a sample; the inverted file from stored features), and bytes per image.
5. Scale sweep: the large gallery's features replicated (each copy with permuted visual words and
   flipped signature bits, so copies are distinct images with the same statistics) to 10k/30k/100k
   rows; query p50 (decode + SIFT + search) and memory per image at each size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lens import Gallery
from lens.images import iter_image_files, load_image
from lens.methods import create_method
from lens.methods.local import InvertedFile, LocalFeatures, LocalMatcher, sift_features

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def link_gallery(folder: Path, sources: dict[str, Path]) -> None:
    """A gallery folder of symlinks: ``folder/<name>/<relative path>`` -> each source's images."""
    for name, source in sources.items():
        for path in iter_image_files(source):
            target = folder / name / path.relative_to(source)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path.resolve())


def make_crops(catalogue: Path, out: Path, seed: int = 0) -> dict[str, str]:
    """One crop of 30–50% of the area of every catalogue image; {crop path: catalogue file name}."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for path in iter_image_files(catalogue):
        image = load_image(path)
        width, height = image.size
        area = rng.uniform(0.30, 0.50)
        aspect = rng.uniform(0.75, 1.33)
        w = int(round(min(width, np.sqrt(area * width * height * aspect))))
        h = int(round(min(height, area * width * height / w)))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        target = out / f"{path.stem}__crop.png"
        image.crop((x, y, x + w, y + h)).save(target)
        truth[str(target)] = path.name
    return truth


def run_queries(gallery: Gallery, queries: dict[str, str], k: int = 10) -> dict[str, float]:
    """R@1, R@10, p50/p95 ms, exact-and-right share, for ``queries`` {path: relevant file name}."""
    times, hit1, hit10, exact_right, exact_top = [], 0, 0, 0, 0
    for query, relevant in queries.items():
        started = time.perf_counter()
        results = gallery.search(query, "local", k=k)
        times.append((time.perf_counter() - started) * 1000)
        names = [Path(r.path).name for r in results]
        hit1 += bool(names) and names[0] == relevant
        hit10 += relevant in names
        if results and results[0].match == "exact":
            exact_top += 1
            exact_right += names[0] == relevant
    n = len(queries)
    return {"queries": n, "R@1": hit1 / n, "R@10": hit10 / n,
            "p50_ms": statistics.median(times), "p95_ms": float(np.percentile(times, 95)),
            "top_exact": exact_top / n, "top_exact_right": exact_right / max(1, exact_top)}


def build_breakdown(paths: list[Path], method: LocalMatcher, sample: int = 200) -> dict[str, float]:
    """Per-image ms of decode, SIFT and quantisation on an even sample of ``paths`` (one thread)."""
    chosen = paths[:: max(1, len(paths) // sample)][:sample]
    decode = sift = quantise = 0.0
    for path in chosen:
        t0 = time.perf_counter()
        image = load_image(path, min_side=method.decode_size)
        t1 = time.perf_counter()
        xy, descriptors = sift_features(image, method.config.max_side, method.config.max_keypoints)
        t2 = time.perf_counter()
        method.vocabulary.quantise(xy, descriptors, image.size)
        t3 = time.perf_counter()
        decode, sift, quantise = decode + t1 - t0, sift + t2 - t1, quantise + t3 - t2
    n = len(chosen)
    return {"decode_ms": decode / n * 1000, "sift_ms": sift / n * 1000, "quantise_ms": quantise / n * 1000}


def index_bytes(inverted: InvertedFile) -> dict[str, float]:
    """Bytes per image held in memory for search (postings + positions) and stored on disk."""
    rows = max(1, len(inverted))
    search = (inverted.post_rows.nbytes + inverted.post_keys.nbytes + inverted.post_signatures.nbytes
              + inverted.starts.nbytes + np.asarray(inverted.xy).nbytes + inverted.offsets.nbytes)
    stored = sum(np.asarray(getattr(inverted, n)).nbytes
                 for n in ("offsets", "xy", "words", "signatures", "sizes", "alive"))
    return {"search_bytes_per_image": search / rows, "stored_bytes_per_image": stored / rows,
            "keypoints_per_image": inverted.offsets[-1] / rows}


def replicate(inverted: InvertedFile, rows: int, seed: int = 0) -> InvertedFile:
    """An inverted file of ``rows`` images: the real ones, then copies with permuted words and signatures."""
    rng = np.random.default_rng(seed)
    real = [inverted.features(r) for r in range(len(inverted))]
    features: list[LocalFeatures] = list(real)
    while len(features) < rows:
        permutation = rng.permutation(inverted.word_count).astype(np.uint32)
        flip = np.uint64(rng.integers(0, 2**63, dtype=np.int64)) | np.uint64(1)
        for f in real[: rows - len(features)]:
            features.append(LocalFeatures(f.xy, permutation[f.words], f.signatures ^ flip, f.size))
    return InvertedFile.build(inverted.word_count, features)


def scale_sweep(method: LocalMatcher, queries: list[str], sizes: list[int]) -> list[dict[str, float]]:
    rows = []
    base = method.inverted
    for size in sizes:
        started = time.perf_counter()
        inverted = replicate(base, size) if size > len(base) else base
        built = time.perf_counter() - started
        searcher = LocalMatcher(method.info.name, method.config, method.vocabulary, inverted)
        times, match_times = [], []
        for query in queries:
            t0 = time.perf_counter()
            item = searcher.prepare(load_image(query))
            t1 = time.perf_counter()
            searcher.match(item, 10)
            t2 = time.perf_counter()
            times.append((t2 - t0) * 1000)
            match_times.append((t2 - t1) * 1000)
        rows.append({"images": len(inverted), "p50_ms": statistics.median(times),
                     "match_p50_ms": statistics.median(match_times), "build_s": built,
                     **index_bytes(inverted)})
        print(json.dumps(rows[-1]), flush=True)
        del inverted, searcher
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--distractors", default="distractors/images,clothing/train,holidays-subset/images",
                        help="folders under --data added to the large gallery")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exact-bench"))
    parser.add_argument("--words", type=int, default=65536)
    parser.add_argument("--sizes", default="10000,30000,100000", help="scale sweep sizes ('' to skip)")
    parser.add_argument("--sweep-queries", type=int, default=100)
    parser.add_argument("--queries", type=int, default=0, help="use only the first N queries (smoke runs)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the indexes first (default: reuse them; an unchanged gallery is not re-embedded)")
    parser.add_argument("--skip-crops", action="store_true")
    parser.add_argument("--tag", default="", help="report-<tag>.json instead of report.json")
    args = parser.parse_args()

    task = args.data / "lens-task"
    truth = json.loads((task / "groundtruth.json").read_text())
    queries = {str(task / "images" / q): Path(rel[0]).name for q, rel in truth["queries"].items()}
    if args.queries:
        queries = dict(list(queries.items())[: args.queries])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"cpus": os.cpu_count()}

    big = work / "gallery"
    link_gallery(big, {"catalogue": task / "images" / "catalogue",
                       **{Path(d).parts[0]: args.data / d for d in args.distractors.split(",") if d}})
    small = work / "catalogue"
    link_gallery(small, {"catalogue": task / "images" / "catalogue"})
    paths = list(iter_image_files(big))
    report["gallery_images"] = len(paths)

    vocabulary = work / f"vocabulary-{args.words}"
    if not (vocabulary / "vocabulary-centroids.npy").is_file():
        started = time.perf_counter()
        fitted = create_method("local", words=args.words).fit(paths)
        fitted.vocabulary.save(vocabulary)
        report["vocabulary_seconds"] = time.perf_counter() - started
    models = {"local": str(vocabulary)}

    results = {}
    for name, root in (("catalogue", small), ("catalogue+distractors", big)):
        index_dir = work / f"index-{name}"
        if args.fresh:
            shutil.rmtree(index_dir, ignore_errors=True)
        gallery = Gallery(root, index_dir, models=models)
        started = time.perf_counter()
        built = gallery.index(["local"], progress=False)[0]
        seconds = time.perf_counter() - started
        results[name] = {"images": built.count, "embedded": built.embedded, "build_seconds": seconds,
                         "images_per_second": built.embedded / seconds if built.embedded else None,
                         **run_queries(gallery, queries)}
        print(name, json.dumps(results[name]), flush=True)
    report["lens_task"] = results

    if not args.skip_crops:
        crops = make_crops(task / "images" / "catalogue", work / "crops")
        if args.queries:
            crops = dict(list(crops.items())[: args.queries])
        report["part_of_image"] = run_queries(gallery, crops)
        print("crops", json.dumps(report["part_of_image"]), flush=True)

    method = gallery.method("local")
    assert isinstance(method, LocalMatcher)
    breakdown = build_breakdown(paths, method)
    started = time.perf_counter()
    InvertedFile.build(method.vocabulary.words, [method.inverted.features(r) for r in range(len(method.inverted))])
    report["build"] = {**breakdown, "inverted_file_seconds": time.perf_counter() - started,
                       **index_bytes(method.inverted)}
    print("build", json.dumps(report["build"]), flush=True)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        report["scale"] = scale_sweep(method, list(queries)[: args.sweep_queries], sizes)
    (work / f"report{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
