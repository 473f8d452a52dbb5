"""What one `lens search` costs from the shell: start-up (imports, model load) against the search itself.

On a small gallery (the first ``--gallery-size`` Holidays photos of ../shared, linked into a work folder
and indexed once with ``phash`` and EfficientNet-Lite0), for each method it measures:

- ``single``: the wall time of ``lens search QUERY ... --json`` (one photo, a fresh process), the median
  of ``--repeats`` runs; ``imports``: the seconds ``python -X importtime`` counts for the call's imports
  (one more run), and which heavy libraries it imported;
- ``batch``: one ``lens search Q1 ... Q50 --json`` call with ``--queries`` other Holidays photos: seconds
  to the first JSON line, the whole wall time, and seconds per photo (whole / n, and the marginal cost
  (whole - single) / (n - 1)); a checkout without the batch form (before issue #18) is reported as such,
  and n separate calls then cost about n x ``single``.

``--lens DIR`` runs another checkout's ``lens`` package (PYTHONPATH=DIR), e.g. the code before a change:

    git archive 826e676 | (mkdir -p /tmp/lens-before && tar -x -C /tmp/lens-before)
    flock /tmp/lens-heavy.lock .venv/bin/python -m benchmarks.cli_startup --lens /tmp/lens-before
    flock /tmp/lens-heavy.lock .venv/bin/python -m benchmarks.cli_startup          # this checkout

Every process runs from this repository's root (so the method spec is the documented relative one,
``hf:../shared/weights/efficientnet_lite0.in1k``), offline, after one untimed warm-up run per method
(the ONNX export of the backbone is cached on disk by then, as on every later call). About 3 minutes
per checkout on 2 idle cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOLIDAYS = REPO.parent / "shared" / "data" / "holidays-subset" / "images"
DEEP = "hf:../shared/weights/efficientnet_lite0.in1k"
METHODS = ("phash", DEEP)
HEAVY = ("torch", "torchvision", "transformers", "timm", "onnxruntime", "cv2", "faiss", "annoy", "scipy",
         "ultralytics", "gradio", "matplotlib")


def prepare(work: Path, gallery_size: int, queries: int) -> tuple[Path, Path, list[Path]]:
    """The gallery folder (links to Holidays photos), its index folder (built once) and query photos."""
    photos = sorted(HOLIDAYS.glob("*.jpg"))
    if len(photos) < gallery_size + queries:
        raise SystemExit(f"needs {gallery_size + queries} photos in {HOLIDAYS}")
    gallery, indexes = work / "gallery", work / "indexes"
    gallery.mkdir(parents=True, exist_ok=True)
    for photo in photos[:gallery_size]:
        link = gallery / photo.name
        if not link.exists():
            link.symlink_to(photo)
    done = run_lens(REPO, ["index", str(gallery), "--index-dir", str(indexes), "--methods", ",".join(METHODS),
                           "--quiet"])
    if done.returncode:
        raise SystemExit(f"index failed:\n{done.stderr}")
    return gallery, indexes, photos[gallery_size:gallery_size + queries]


def environment(lens: Path) -> dict[str, str]:
    # PYTHONSAFEPATH: `python -m lens` must not put the working directory (this repository) first on
    # sys.path, or this checkout's lens would run whatever --lens says
    return {**os.environ, "PYTHONPATH": str(lens), "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1",
            "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}


def run_lens(lens: Path, args: list[str], extra: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(extra or []), "-m", "lens", *args], cwd=REPO, env=environment(lens),
                          capture_output=True, text=True, timeout=1200)


def search_args(method: str, gallery: Path, indexes: Path, queries: list[Path]) -> list[str]:
    return ["search", *map(str, queries), "--gallery", str(gallery), "--index-dir", str(indexes),
            "--method", method, "-k", "10", "--json"]


def timed(lens: Path, args: list[str]) -> float:
    start = time.perf_counter()
    done = run_lens(lens, args)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"lens {' '.join(args[:3])} ... failed:\n{done.stderr}")
    return seconds


def imports(lens: Path, args: list[str]) -> tuple[float, list[str]]:
    """Seconds of top-level imports as ``-X importtime`` counts them, and the heavy libraries imported."""
    done = run_lens(lens, args, ["-X", "importtime"])
    total, names = 0, set()
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            names.add(match.group(3).split(".")[0])
            if len(match.group(2)) == 1:  # a top-level import: its cumulative time counts once
                total += int(match.group(1))
    return total / 1e6, [name for name in HEAVY if name in names]


def batch(lens: Path, args: list[str]) -> tuple[float, float, int] | None:
    """(seconds to the first JSON line, whole wall time, lines) of one call, or None when this checkout
    has no batch form (it rejects several photos)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lens", *args], cwd=REPO, env=environment(lens),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    first_at = time.perf_counter() - start
    rest = process.stdout.read()
    error = process.stderr.read()
    process.wait()
    whole = time.perf_counter() - start
    if process.returncode == 2 and "unrecognized arguments" in error:
        return None
    if process.returncode:
        raise SystemExit(f"batch search failed:\n{error}")
    return first_at, whole, len((first + rest).splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lens", type=Path, default=REPO, help="checkout whose lens package runs (default: this)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lens-cli-startup"), help="gallery links, indexes")
    parser.add_argument("--gallery-size", type=int, default=100)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lens = args.lens.resolve()
    gallery, indexes, queries = prepare(args.work, args.gallery_size, args.queries)
    commit = subprocess.run(["git", "-C", str(lens), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "not a git checkout"
    imported = subprocess.run([sys.executable, "-c", "import lens; print(lens.__file__)"], cwd=REPO,
                              env=environment(lens), capture_output=True, text=True).stdout.strip()
    if not imported.startswith(str(lens)):
        raise SystemExit(f"lens is imported from {imported}, not from {lens}")
    print(f"lens from {imported} ({commit}); {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"gallery: {args.gallery_size} Holidays photos; median of {args.repeats} runs")
    empty = statistics.median(timed_python() for _ in range(args.repeats))
    print(f"python -c pass: {empty:.2f} s")
    for method in METHODS:
        one = search_args(method, gallery, indexes, queries[:1])
        timed(lens, one)  # warm-up: file caches, the backbone's ONNX export
        single = statistics.median(timed(lens, one) for _ in range(args.repeats))
        seconds, heavy = imports(lens, one)
        print(f"{method}: single photo {single:.2f} s wall; imports {seconds:.2f} s "
              f"({', '.join(heavy) or 'none of the heavy libraries'})")
        found = batch(lens, search_args(method, gallery, indexes, queries))
        n = len(queries)
        if found is None:
            print(f"{method}: {n} photos: no batch form in this checkout; {n} calls ~ {n * single:.0f} s "
                  f"({single:.2f} s per photo)")
            continue
        first, whole, lines = found
        assert lines == n, f"{lines} JSON lines for {n} photos"
        print(f"{method}: {n} photos in one call: first result after {first:.2f} s, all in {whole:.2f} s: "
              f"{whole / n:.3f} s per photo ({(whole - single) / (n - 1):.3f} s marginal); "
              f"{n} separate calls ~ {n * single:.0f} s")


def timed_python() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
