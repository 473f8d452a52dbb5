"""The design choices of ``local`` measured on lens-task + distractors, from cached SIFT features.

    flock /tmp/lens-heavy.lock .venv/bin/python benchmarks/exact_choices.py --words 65536 --assign 2

SIFT keypoints (640 px, 1,000 strongest, as ``local`` extracts them) of every gallery image and query
are extracted once into ``--cache`` (an .npz per folder); each run then learns (or reuses) a
vocabulary of ``--words`` words, quantises, builds the inverted file and scores the 400 queries:
R@shortlist (the right image among the verified candidates), R@1 after RANSAC, the vote and
verification ms per query (without decode and SIFT), and the most inliers a wrong image got.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from lens.images import iter_image_files, load_image
from lens.methods.local import InvertedFile, LocalFeatures, Vocabulary, plausible, sift_features, verify
from lens.methods.sift import root_sift

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {"catalogue": "lens-task/images/catalogue", "queries": "lens-task/images/queries",
        "distractors": "distractors/images", "clothing": "clothing/train", "holidays": "holidays-subset/images"}


def _extract(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    image = load_image(path)
    return (*sift_features(image, 640, 1000), image.size)


def cached(cache: Path, name: str, folder: Path) -> tuple[list[str], list[tuple]]:
    """[(xy, descriptors, size)] per image of ``folder``, extracted once into ``cache/<name>.npz``."""
    target = cache / f"{name}.npz"
    if not target.is_file():
        paths = list(iter_image_files(folder))
        with ProcessPoolExecutor(2) as pool:
            found = list(pool.map(_extract, paths, chunksize=16))
        offsets = np.r_[0, np.cumsum([len(x) for x, _, _ in found])]
        np.savez(target, paths=np.array([str(p) for p in paths]), offsets=offsets,
                 xy=np.concatenate([x for x, _, _ in found]), desc=np.concatenate([d for _, d, _ in found]),
                 sizes=np.array([s for _, _, s in found]))
    z = np.load(target)
    o = z["offsets"]
    return list(z["paths"]), [(z["xy"][a:b], z["desc"][a:b], tuple(s)) for a, b, s in zip(o[:-1], o[1:], z["sizes"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/exact-choices"))
    parser.add_argument("--words", type=int, default=65536)
    parser.add_argument("--assign", type=int, default=1, help="words per query keypoint")
    parser.add_argument("--hamming", type=int, default=24)
    parser.add_argument("--sigma", type=float, default=16.0)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--min-inliers", type=int, default=10)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = {name: cached(args.cache, name, args.data / folder) for name, folder in SETS.items()}

    folder = args.cache / f"vocabulary-{args.words}"
    if not (folder / "vocabulary-centroids.npy").is_file():
        rng = np.random.default_rng(0)
        every = np.concatenate([d for name in SETS if name != "queries" for _, d, _ in data[name][1]])
        sample = every[rng.choice(len(every), min(len(every), 1_000_000), replace=False)]
        started = time.perf_counter()
        Vocabulary.learn(root_sift(sample), args.words).save(folder)
        print(f"vocabulary: {args.words} words from {len(sample)} descriptors in "
              f"{time.perf_counter() - started:.0f} s")
    vocabulary = Vocabulary.load(folder)

    def quantise(name: str, nearest: int = 1) -> list[LocalFeatures]:
        return [vocabulary.quantise(xy, d, size, nearest) for xy, d, size in data[name][1]]

    names = [n for n in SETS if n != "queries"]
    gallery_paths = [p for n in names for p in data[n][0]]
    inverted = InvertedFile.build(vocabulary.words, [f for n in names for f in quantise(n)])
    row_of = {Path(p).name: i for i, p in enumerate(gallery_paths)}
    truth = json.loads((args.data / "lens-task" / "groundtruth.json").read_text())["queries"]
    targets = {q: row_of[Path(rel[0]).name] for q, rel in truth.items()}
    queries = quantise("queries", args.assign)
    in_short = hit = 0
    vote_ms, verify_ms, wrong = [], [], []
    for path, query in zip(data["queries"][0], queries):
        target = targets[str(Path(path).relative_to(args.data / "lens-task" / "images"))]
        t0 = time.perf_counter()
        scores, found = inverted.vote(query, args.hamming, args.sigma)
        short = np.argsort(-scores)[: args.shortlist]
        t1 = time.perf_counter()
        inliers = {}
        for row in short:
            pairs = found[found[:, 1] == row][:, [0, 2]]
            other = inverted.features(int(row))
            count, homography = verify(query.xy, other.xy, pairs, args.threshold)
            inliers[int(row)] = count if count >= args.min_inliers and plausible(homography, other.size) else 0
        t2 = time.perf_counter()
        best = max(short, key=lambda r: (inliers[int(r)], scores[r]))
        in_short += target in short
        hit += best == target
        wrong.append(max([v for r, v in inliers.items() if r != target] + [0]))
        vote_ms.append((t1 - t0) * 1000)
        verify_ms.append((t2 - t1) * 1000)
    n = len(queries)
    print(json.dumps({"words": vocabulary.words, "assign": args.assign, "hamming": args.hamming,
                      "shortlist": args.shortlist, "gallery": len(gallery_paths), "queries": n,
                      "R@shortlist": in_short / n, "R@1": hit / n,
                      "vote_ms_p50": statistics.median(vote_ms), "verify_ms_p50": statistics.median(verify_ms),
                      "wrong_inliers_max": max(wrong), "wrong_inliers_p99": float(np.percentile(wrong, 99))}))


if __name__ == "__main__":
    main()
