"""Test helpers: a gallery of scikit-image's CC0 photos, their near-duplicate variants, ../shared.

The variants are the edits the near-duplicate methods are documented against (docs/methods.md).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

from conftest import shared_path  # noqa: F401  (re-exported for the test modules)
from PIL import Image

from lens.evaluation import metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: textured photos shipped with scikit-image (CC0); ``colorwheel`` is left out: SIFT finds
#: (almost) no keypoints on smooth colour gradients
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "gravel",
          "immunohistochemistry", "page", "moon", "text", "hubble_deep_field", "grass"]
MAX_SIDE = 320  #: photos are written at most this big (keeps the tests fast)


def photo(name: str) -> Image.Image:
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return image


def write_photos(folder: Path, names: list[str] = PHOTOS) -> dict[str, Path]:
    """The photos as PNG files in ``folder``: {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        paths[name] = folder / f"{name}.png"
        photo(name).save(paths[name])
    return paths


def _jpeg(image: Image.Image, quality: int = 20) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _centre(image: Image.Image, keep: float) -> Image.Image:
    width, height = image.size
    dx, dy = round(width * (1 - keep) / 2), round(height * (1 - keep) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "jpeg": _jpeg,  # recompressed at quality 20
    "brighter": lambda im: im.point(lambda v: min(255, int(v * 1.2) + 10)),
    "crop90": lambda im: _centre(im, 0.9),  # the central 90% (of width and height)
    "crop50": lambda im: _centre(im, 0.5),
    "rotate10": lambda im: im.rotate(10, resample=Image.Resampling.BICUBIC),
    "rotate90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
}


def average_precision(ranked: list[str], relevant: set[str]) -> float:
    """AP of one ranking (INRIA Holidays protocol: the query itself already removed)."""
    return metrics.average_precision([name in relevant for name in ranked], None, len(relevant)) or 0.0