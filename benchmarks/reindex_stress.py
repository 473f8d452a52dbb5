"""Searching a gallery while it is re-indexed: one writer, several readers, every failure counted.

A generated 20-image gallery; one writer re-runs ``Gallery.index(["phash"])`` in a loop, adding or
removing one file each time (so every build differs); readers search one of the gallery's pictures
and check the top hit is that picture at similarity 1.0. Half the readers share one ``Gallery`` (as
the app does: its opened indexes must keep working across rebuilds), the others open a fresh
``Gallery`` per search (as ``lens search`` does). ``--cli`` runs the same with real processes:
``lens index`` in a loop and ``lens search --json`` in a loop per reader.

    .venv/bin/python benchmarks/reindex_stress.py --seconds 180 [--readers 2] [--cli]
    .venv/bin/python benchmarks/reindex_stress.py --seconds 60 --lens ../main   # another checkout's lens
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_paths(lens_root: Path) -> None:
    sys.path[:0] = [str(lens_root), str(REPO / "tests")]


def run_threads(folder: Path, index_dir: Path, seconds: float, readers: int) -> dict:
    """One writer and ``readers`` readers (odd ones open a fresh Gallery per search) for ``seconds``.

    ``folder`` holds ``write_gallery``'s pictures (img003.png among them) and ``index_dir`` a phash index
    of it. Returns ``{"searches", "builds", "errors": {kind: count}, "examples": {kind: message}}``.
    tests/test_replayed_faults.py runs this same loop for 4 s and expects no error.
    """
    from conftest import make_picture

    from lens import Gallery

    stop = threading.Event()
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    counts = collections.Counter()
    shared = Gallery(folder, index_dir)
    extra = folder / "extra.png"
    query = make_picture(3)

    def fail(where: str, exc: BaseException | str) -> None:
        kind = f"{where}: {type(exc).__name__}" if isinstance(exc, BaseException) else f"{where}: {exc}"
        errors[kind] += 1
        examples.setdefault(kind, str(exc)[:300])

    def writer() -> None:
        gallery = Gallery(folder, index_dir)
        while not stop.is_set():
            try:
                extra.unlink() if extra.exists() else make_picture(999).save(extra)
                gallery.index(["phash"], progress=False)
                counts["builds"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                fail("writer", exc)

    def reader(fresh: bool) -> None:
        while not stop.is_set():
            try:
                gallery = Gallery(folder, index_dir) if fresh else shared
                [hit] = gallery.search(query, "phash", k=1)
                if (hit.path, hit.score) != ("img003.png", 1.0):
                    fail("reader", f"wrong result {hit.path} {hit.score}")
                counts["searches"] += 1
            except Exception as exc:  # noqa: BLE001
                fail("reader", exc)

    threads = [threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=reader, args=(i % 2 == 1,), daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(120)
    return {"searches": counts["searches"], "builds": counts["builds"], "errors": dict(errors),
            "examples": examples}


def run_processes(folder: Path, index_dir: Path, seconds: float, readers: int, lens_root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(lens_root), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "lens"]  # run in the temporary folder: `-m` puts the cwd first on sys.path
    deadline = time.time() + seconds
    errors: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    counts = collections.Counter()
    lock = threading.Lock()
    extra = folder / "extra.png"
    sys.path[:0] = [str(REPO / "tests")]
    from conftest import make_picture

    def note(kind: str, text: str) -> None:
        with lock:
            errors[kind] += 1
            examples.setdefault(kind, text[-300:])

    def writer() -> None:
        while time.time() < deadline:
            extra.unlink() if extra.exists() else make_picture(999).save(extra)
            done = subprocess.run([*base, "index", str(folder), "--index-dir", str(index_dir), "--methods",
                                   "phash", "--quiet"], env=env, capture_output=True, text=True, cwd=folder.parent)
            if done.returncode != 0:
                note("lens index failed", done.stderr)
            with lock:
                counts["builds"] += 1

    def reader() -> None:
        while time.time() < deadline:
            done = subprocess.run([*base, "search", str(folder / "img003.png"), "--gallery", str(folder),
                                   "--index-dir", str(index_dir), "--method", "phash", "-k", "1", "--json"],
                                  env=env, capture_output=True, text=True, cwd=folder.parent)
            if done.returncode != 0:
                note("lens search failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:60], done.stderr)
            else:
                [hit] = json.loads(done.stdout)
                if not (hit["path"].endswith("img003.png") and hit["score"] == 1.0):
                    note("wrong result", done.stdout)
            with lock:
                counts["searches"] += 1

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"searches": counts["searches"], "builds": counts["builds"], "errors": dict(errors),
            "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--cli", action="store_true", help="processes: lens index / lens search in loops")
    parser.add_argument("--lens", type=Path, default=REPO, help="checkout whose lens package is exercised")
    args = parser.parse_args()
    lens_root = args.lens.resolve()
    _setup_paths(lens_root)
    from conftest import write_gallery

    from lens import Gallery

    with tempfile.TemporaryDirectory() as tmp:
        folder, index_dir = Path(tmp) / "photos", Path(tmp) / "idx"
        write_gallery(folder, args.images)
        Gallery(folder, index_dir).index(["phash"], progress=False)
        started = time.perf_counter()
        if args.cli:
            outcome = run_processes(folder, index_dir, args.seconds, args.readers, lens_root)
        else:
            outcome = run_threads(folder, index_dir, args.seconds, args.readers)
        elapsed = time.perf_counter() - started
        left = len(list((index_dir / "phash").glob("build-*")))
    mode = "processes (lens index / lens search)" if args.cli else "threads (Gallery.index / Gallery.search)"
    print(f"lens from {lens_root}; {mode}; {args.images} images, 1 writer + {args.readers} readers, "
          f"{elapsed:.0f} s")
    print(f"builds published: {outcome['builds']}, searches: {outcome['searches']}, "
          f"errors: {sum(outcome['errors'].values())}, build folders left: {left}")
    for kind, count in sorted(outcome["errors"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d}  {kind}   e.g. {outcome['examples'][kind]!r}")


if __name__ == "__main__":
    main()
