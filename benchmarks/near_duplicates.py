"""Which edits each near-duplicate method survives: top-1 hits on edited copies of gallery photos.

The gallery is scikit-image's textured CC0 photos (the tests' set, at most 320 px); each query is
one photo after one edit (the tests' ``VARIANTS``: half size, JPEG quality 20, brighter, central
crops, rotations, mirror image). A hit means the unedited photo is the first result.

    .venv/bin/python benchmarks/near_duplicates.py [--methods phash,dhash,ahash,sift]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from near_duplicates import PHOTOS, VARIANTS, photo, write_photos  # noqa: E402

from lens import Gallery  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="phash,dhash,ahash,sift")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(Path(tmp) / "photos")
        gallery = Gallery(Path(tmp) / "photos", Path(tmp) / "idx")
        gallery.index(methods, progress=False)
        print(f"top-1 hits out of {len(PHOTOS)} photos\n")
        print("| method | " + " | ".join(VARIANTS) + " | seconds |")
        print("|---|" + "---:|" * (len(VARIANTS) + 1))
        for method in methods:
            started, hits = time.perf_counter(), []
            for edit in VARIANTS.values():
                results = gallery.search_many([edit(photo(p)) for p in PHOTOS], method, k=1)
                hits.append(sum(r[0].path == f"{p}.png" for p, r in zip(PHOTOS, results)))
            print(f"| {method} | " + " | ".join(map(str, hits)) + f" | {time.perf_counter() - started:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
