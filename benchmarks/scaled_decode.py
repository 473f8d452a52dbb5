"""Scaled JPEG decoding of gallery files: decode time and retrieval quality on camera-sized photos.

The Holidays subset is small (325x243), so every image is first enlarged 8x to 2600x1944 and
saved as a JPEG (quality 90): camera-sized files of the same scenes. Then, with EfficientNet-Lite0:

- decode time per file: a full decode vs ``load_image(path, min_side=method.decode_size)`` (what
  ``lens index`` does; libjpeg's DCT scaling at 1/4 here);
- Holidays mAP with the gallery decoded in full vs at reduced scale, queries always in full (as in the
  app, where the upload is decoded in full and cropped); and the cosine between each image's two
  embeddings.

    python -m benchmarks.scaled_decode            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.build_throughput import EFFNET
from benchmarks.precision import HOLIDAYS, holidays_map


def main() -> None:
    from lens.images import load_image
    from lens.methods.deep import HFBackbone

    truth = json.loads((HOLIDAYS / "groundtruth.json").read_text())["queries"]
    sources = sorted((HOLIDAYS / "images").glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="lens-scaled-"))
    files = []
    for path in sources:
        target = work / path.name
        with Image.open(path) as image:
            image.convert("RGB").resize((image.width * 8, image.height * 8), Image.BICUBIC).save(target, quality=90)
        files.append(target)
    method = HFBackbone("effnet", str(EFFNET))
    print(f"{len(files)} Holidays images enlarged to {Image.open(files[0]).size}; "
          f"EfficientNet-Lite0 ({method.runtime}), decode_size {method.decode_size}")

    timings = {}
    for label, side in (("full", None), ("scaled", method.decode_size)):
        started = time.perf_counter()
        sizes = {load_image(f, min_side=side).size for f in files[:100]}
        timings[label] = 1000 * (time.perf_counter() - started) / 100
        print(f"decode {label:6s}: {timings[label]:6.1f} ms per file, decoded sizes {sorted(sizes)[:2]}")

    def embed(side: int | None) -> np.ndarray:
        rows = []
        for start in range(0, len(files), 16):
            batch = [method.prepare(load_image(f, min_side=side)) for f in files[start : start + 16]]
            rows.append(method.embed_prepared(batch))
        return np.concatenate(rows)

    full, scaled = embed(None), embed(method.decode_size)
    names = [f.name for f in files]
    cosines = np.sum(full * scaled, axis=1)
    map_full = holidays_map(full, names, truth)
    map_mixed = holidays_map(full, names, truth, gallery=scaled)
    print(f"cosine(full, scaled) per image: min {cosines.min():.4f}, median {np.median(cosines):.4f}")
    print("\n| gallery decode | ms per file | Holidays mAP (queries decoded in full) |")
    print("|---|---:|---:|")
    print(f"| full (2600x1944) | {timings['full']:.1f} | {map_full:.4f} |")
    print(f"| scaled (libjpeg 1/4) | {timings['scaled']:.1f} | {map_mixed:.4f} ({100 * (map_mixed - map_full):+.2f} points) |")


if __name__ == "__main__":
    main()
