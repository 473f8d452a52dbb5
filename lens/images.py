"""Safe image decoding: the one place where files and uploads become RGB pictures.

Every image that enters lens, gallery file or query upload, goes through :func:`load_image`, which
applies the EXIF orientation, converts every pixel mode to 8-bit RGB (transparency over white),
takes the first frame of animations and refuses decompression bombs, raising :class:`ImageError`
with a readable message instead of a library traceback.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pi_heif import register_heif_opener

register_heif_opener()  # HEIC/HEIF, as phones save photos
from lens.errors import LensError
from lens.types import Box

#: File extensions lens treats as images when it scans a folder.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".heic", ".heif"}
)
#: Largest picture decoded (width x height); bigger ones are refused as likely decompression bombs.
MAX_PIXELS = 80_000_000
EXIF_ORIENTATION = 0x0112  #: the EXIF tag that says how the camera was held
#: Largest file or upload read, in bytes.
MAX_BYTES = 64 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(LensError, ValueError):
    """An image that cannot be used, with a message fit to show a user."""


def load_image(
    source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES, name: str | None = None,
    min_side: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a path, raw bytes, a PIL image or an HxWxC uint8 array) to an RGB image.

    ``name``: what error messages call the image (default: its path); e.g. an upload's own file name
    rather than the server's temporary path. ``min_side``: the caller needs no more than this many
    pixels on the shorter side, so a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled
    decoding, several times faster on camera photos) as long as both sides stay at least ``min_side``.

    Decoding happens once: a PIL image that is already RGB and upright is returned as it is (no
    copy), so passing the result along (to a detector, a crop, a search) costs nothing. Limits:
    ``max_pixels`` (width x height) and ``max_bytes`` (file or upload size). Raises
    :class:`ImageError` with a message fit for a user for anything that cannot be used.
    """
    name = f"'{name}'" if name else _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        try:
            image = Image.fromarray(source)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"cannot use array of shape {source.shape} as an image: {exc}") from exc
    else:
        image = _open(source, name, max_bytes)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} pixels, over the limit of {max_pixels:,} pixels "
            "(refused as a possible decompression bomb)"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        if min_side and image.format == "JPEG" and min(width, height) >= 2 * min_side:
            image.draft(image.mode, (min_side, min_side))
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else no copy: a decoded picture passes as is
            image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise _decode_error(name, exc) from exc


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, bytes):
        return f"uploaded image ({len(source):,} bytes)"
    return "image"


def _open(source: Union[str, os.PathLike, bytes], name: str, max_bytes: int) -> Image.Image:
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name} does not exist or is not a file")
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"{name} is empty (0 bytes)")
        if size > max_bytes:
            raise ImageError(f"{name} is {size:,} bytes, over the limit of {max_bytes:,}")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise ImageError(f"{name} is over the limit of {max_bytes:,} bytes")
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image lens can read (unknown or corrupt format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name} is refused as a possible decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise _decode_error(name, exc) from exc
    except Exception as exc:  # e.g. a plugin's own error: still a clear message, never a traceback
        raise ImageError(f"cannot open {name}: {type(exc).__name__}: {exc}") from exc


def _decode_error(name: str, exc: BaseException) -> ImageError:
    if "truncated" in str(exc).lower():
        return ImageError(f"{name} is truncated (the file is incomplete): {exc}")
    return ImageError(f"cannot decode {name}: {exc}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        if mode == "F" and array.max() <= 1.0:
            top = 1.0
        gray = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def iter_image_files(root: Union[str, os.PathLike], *, exclude: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield image files below ``root`` (recursive, sorted, hidden entries and ``exclude`` skipped)."""
    root = Path(root)
    excluded = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        for filename in sorted(filenames):
            if filename.startswith(".") or Path(filename).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            yield here / filename


def expand_box(
    box: Box | Sequence[float], image_size: tuple[int, int], margin: float = 0.0
) -> tuple[float, float, float, float]:
    """``box`` widened by ``margin`` x its width / height on each side, clamped to the image (pixels).

    Raises :class:`ImageError` for a box that is not 4 numbers, has no area (needs x1 < x2 and
    y1 < y2) or lies outside the image, and :class:`LensError` for a negative ``margin``.
    """
    try:
        x1, y1, x2, y2 = Box.of(box).xyxy
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    width, height = image_size
    if not margin >= 0:
        raise LensError(f"the crop margin must be 0 or more, got {margin}")
    if not (x2 > x1 and y2 > y1):
        raise ImageError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has no area (needs x1 < x2 and y1 < y2)")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise ImageError(
            f"box {x1:g},{y1:g},{x2:g},{y2:g} lies outside the {width}x{height} image (no area inside it)"
        )
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return (max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(width), x2 + dx), min(float(height), y2 + dy))


def crop(image: Image.Image, box: Box | Sequence[float] | None, margin: float = 0.0) -> Image.Image:
    """The region of ``image`` under ``box`` (a :class:`~lens.types.Box` or ``(x1, y1, x2, y2)`` in
    pixels); ``None`` keeps the whole image (the same object is returned).

    This is lens's only crop, and its one margin rule: the box is widened by ``margin`` times its own
    width on the left and on the right, and times its own height at the top and at the bottom, then
    clamped to the image (:func:`expand_box`); its edges are rounded to whole pixels, and a region
    under a pixel wide (a tiny image) keeps the pixel under its centre. ``margin`` 0 (the default)
    is the exact region asked for; searches from a detector's box use
    :data:`lens.detect.DEFAULT_MARGIN` (5%) for context.

    Raises :class:`ImageError` (see :func:`expand_box`) for a box with no area inside the image.
    """
    if box is None:
        return image
    x1, y1, x2, y2 = expand_box(box, image.size, margin)
    width, height = image.size

    def span(low: float, high: float, size: int) -> tuple[int, int]:
        start, stop = round(low), round(high)
        if stop <= start:  # under a pixel wide: the pixel under its centre
            start = min(int((low + high) / 2), size - 1)
            stop = start + 1
        return start, stop

    (left, right), (top, bottom) = span(x1, x2, width), span(y1, y2, height)
    return image.crop((left, top, right, bottom))
