"""What a degenerate strip costs: peak memory and time of `lens search` / `lens index` per input shape.

Queries: an ordinary 640x480 photo and a 16000x1 PNG; galleries: 8 generated photos, with and
without four 6000x2 / 2x6000 strips. Each figure is one `lens` process measured by /usr/bin/time
(peak resident memory, wall seconds), so model start-up is included, as a user sees it.

    .venv/bin/python benchmarks/strip_cost.py --method hf:../shared/weights/efficientnet_lite0.in1k
    .venv/bin/python benchmarks/strip_cost.py --lens ../main ...      # another checkout's lens
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests")]

from conftest import make_picture, write_gallery  # noqa: E402
from PIL import Image  # noqa: E402


def measured(args: list[str], lens_root: Path, cwd: Path) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(lens_root), "HF_HUB_OFFLINE": "1"}
    # cwd outside any checkout: `python -m` puts the working directory first on sys.path
    done = subprocess.run(["/usr/bin/time", "-f", "TIME %M %e", sys.executable, "-m", "lens", *args],
                          env=env, capture_output=True, text=True, cwd=cwd)
    found = re.search(r"TIME (\d+) ([\d.]+)", done.stderr)
    status = "ok" if done.returncode == 0 else done.stderr.strip().splitlines()[-2][:80]
    return int(found.group(1)) / 1024, float(found.group(2)), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="phash")
    parser.add_argument("--lens", type=Path, default=REPO)
    args = parser.parse_args()
    lens_root = args.lens.resolve()
    method = args.method
    if method.startswith("hf:") and not os.path.isabs(method[3:]):
        method = "hf:" + str(Path(method[3:]).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, strips = tmp / "plain", tmp / "strips"
        write_gallery(plain, 8)
        write_gallery(strips, 8)
        for i, size in enumerate([(6000, 2), (2, 6000), (6000, 2), (2, 6000)]):
            Image.new("RGB", size, (40 * i, 200, 30)).save(strips / f"strip{i}.png")
        make_picture(5, (640, 480)).save(tmp / "photo.jpg")
        Image.new("RGB", (16000, 1), (200, 30, 30)).save(tmp / "strip.png")
        rows = []
        for name, folder in (("8 photos", plain), ("8 photos + 4 strips 6000x2", strips)):
            rows.append((f"lens index: {name}", *measured(
                ["index", str(folder), "--index-dir", str(tmp / f"idx-{folder.name}"), "--methods", method,
                 "--quiet"], lens_root, tmp)))
        for name, query in (("640x480 photo", tmp / "photo.jpg"), ("16000x1 PNG", tmp / "strip.png")):
            rows.append((f"lens search: {name}", *measured(
                ["search", str(query), "--gallery", str(plain), "--index-dir", str(tmp / "idx-plain"),
                 "--method", method, "-k", "3"], lens_root, tmp)))
    print(f"lens from {lens_root}; method {args.method}\n")
    print("| run | peak memory (MiB) | seconds | outcome |")
    print("|---|---:|---:|---|")
    for name, mib, seconds, status in rows:
        print(f"| {name} | {mib:,.0f} | {seconds:.1f} | {status} |")


if __name__ == "__main__":
    main()
