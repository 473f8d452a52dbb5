"""Safe image decoding: the one place where files and uploads become RGB pictures.

Every image that enters lens, gallery file or query upload, goes through :func:`load_image`, which
applies the EXIF orientation, converts every pixel mode to 8-bit RGB (transparency over white),
takes the first frame of animations and refuses decompression bombs, raising :class:`ImageError`
with a readable message instead of a library traceback.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pi_heif import register_heif_opener

register_heif_opener()  # HEIC/HEIF, as phones save photos
try:  # JPEG XL, when the optional plugin is installed (pip install pillow-jxl-plugin)
    import pillow_jxl  # noqa: F401
except ImportError:
    pass
from lens.errors import LensError
from lens.types import Box

log = logging.getLogger("lens")

#: Formats Pillow registers that lens never decodes: EPS runs Ghostscript (an interpreter) on the file,
#: and the rest are identify-only stubs or Windows-only (MPEG, HDF5, GRIB, BUFR, WMF/EMF, IPTC).
UNSAFE_OR_STUB_FORMATS = frozenset({"EPS", "MPEG", "HDF5", "GRIB", "BUFR", "WMF", "IPTC"})


def decodable_formats() -> list[str]:
    """The Pillow formats :func:`load_image` decodes: every registered opener (Pillow's own, AVIF,
    HEIC/HEIF via pi-heif, JPEG XL via pillow-jxl-plugin when installed) but the unsafe or stub ones."""
    Image.init()
    return sorted(f for f in Image.OPEN if f not in UNSAFE_OR_STUB_FORMATS)


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of every format in :func:`decodable_formats`."""
    formats = set(decodable_formats())
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in formats)


#: File extensions lens treats as images when it scans a folder (derived from the decoders registered
#: at import: .jpg, .png, .webp, .avif, .heic, .tif, .bmp, .gif, ... see the README).
IMAGE_EXTENSIONS = image_extensions()
#: Longest side / shortest side beyond which a picture is a degenerate strip (e.g. 16000x1): it is
#: padded (white, at the right or bottom, so pixel coordinates keep their meaning) to this ratio.
MAX_ASPECT = 20
#: A strip's long side is first reduced to this many pixels, so that the padded picture, and what
#: every method's preprocessing makes of it, stays bounded whatever the input's shape.
MAX_STRIP_SIDE = 4096
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
        return limit_aspect(_to_rgb(image))
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
            return Image.open(io.BytesIO(data), formats=decodable_formats())
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


def limit_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT, max_side: int = MAX_STRIP_SIDE
                 ) -> Image.Image:
    """``image`` itself when its sides are within ``max_aspect`` of each other; else a bounded copy.

    A strip (long side > ``max_aspect`` x short side) has its long side reduced to ``max_side`` (the
    short side keeps at least 1 pixel) and is then padded with white at the right or bottom up to
    ``max_aspect``: at most ``max_side`` x ``max_side / max_aspect`` pixels, whatever came in.
    """
    width, height = image.size
    if max(width, height) <= max_aspect * min(width, height):
        return image
    scale = min(1.0, max_side / max(width, height))
    if scale < 1.0:
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BOX)
        width, height = image.size
    long_side = max(width, height)
    short_side = max(1, math.ceil(long_side / max_aspect))
    size = (width, short_side) if width >= height else (short_side, height)
    canvas = Image.new(image.mode, size, (255, 255, 255) if image.mode == "RGB" else 255)
    canvas.paste(image, (0, 0))
    return canvas


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


def display_path(path: Union[str, os.PathLike]) -> str:
    """``path`` as text that any strict UTF-8 output takes: bytes of a file name that are not valid
    UTF-8 (surrogate escapes in an OS path, e.g. Latin-1 ``caf\\xe9.png``) are shown as ``\\xe9``.
    For people (captions, messages); the path itself stays the OS path."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


Skip = Callable[[Path, str], None]


def iter_image_files(
    root: Union[str, os.PathLike], *, exclude: tuple[Path, ...] = (), on_skip: Skip | None = None
) -> Iterator[Path]:
    """Yield image files below ``root`` (recursive, sorted, hidden entries and ``exclude`` skipped).

    Paths are OS paths (``str`` with undecodable bytes as surrogate escapes, PEP 383), as
    :func:`os.walk` gives them. Symbolic links are followed: a linked folder is scanned like a real
    one, except a folder already scanned (a link loop, or a second link to the same folder), which is
    left out. Entries that cannot be used, a dangling or looping link or a name with an image
    extension that is not a regular file, are left out with a warning and reported to
    ``on_skip(path, reason)``.
    """
    root = Path(root)
    extensions = image_extensions()
    excluded = {p.resolve() for p in exclude}
    seen: set[tuple[int, int]] = set()

    def skip(path: Path, reason: str) -> None:
        log.warning("skipped %s: %s", path, reason)
        if on_skip is not None:
            on_skip(path, reason)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=None):
        here = Path(dirpath)
        try:
            info = os.stat(here)
            if (info.st_dev, info.st_ino) in seen:  # reached again through a link: scanned already
                dirnames[:] = []
                skip(here, "a link to a folder scanned already (symbolic link loop or duplicate link)")
                continue
            seen.add((info.st_dev, info.st_ino))
        except OSError as exc:
            skip(here, f"cannot read the folder: {exc.strerror or exc}")
            dirnames[:] = []
            continue
        # real folders before links among siblings: a folder both present and linked keeps its own path
        dirnames[:] = sorted(
            (d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded),
            key=lambda d: (os.path.islink(here / d), d),
        )
        for filename in sorted(filenames):
            if filename.startswith(".") or Path(filename).suffix.lower() not in extensions:
                continue
            path = here / filename
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    skip(path, "not a regular file")
                    continue
            except OSError as exc:
                if os.path.islink(path):
                    what = "symbolic link loop" if exc.errno == 40 else "broken symbolic link (its target is gone)"
                    skip(path, f"{what}: {os.readlink(path)}")
                else:
                    skip(path, f"cannot read it: {exc.strerror or exc}")
                continue
            yield path


def check_box(box: Box | Sequence[float], size: tuple[int, int] | None = None) -> tuple[float, float, float, float]:
    """``box`` (a :class:`~lens.types.Box` or 4 numbers) as (x1, y1, x2, y2) floats, or an
    :class:`ImageError` saying why it cannot be used.

    The one validation of a search region, for every entry point (CLI ``--box``, ``Gallery.search``,
    the app, detected boxes): four finite numbers in pixels with x1 < x2 and y1 < y2, and, given the
    image's ``size`` (width, height), some area inside the image (the rest is clamped away later).
    """
    try:
        values = Box.of(box).xyxy
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    x1, y1, x2, y2 = values
    text = f"box {x1:g},{y1:g},{x2:g},{y2:g}"
    if not all(math.isfinite(v) for v in values):
        raise ImageError(f"{text} is not usable: every coordinate must be a finite number of pixels")
    if not (x2 > x1 and y2 > y1):
        raise ImageError(f"{text} has no area: it needs x1 < x2 and y1 < y2 (left, top, right, bottom)")
    if size is not None:
        width, height = size
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ImageError(f"{text} lies outside the {width}x{height} image (no area inside it)")
    return x1, y1, x2, y2


def expand_box(
    box: Box | Sequence[float], image_size: tuple[int, int], margin: float = 0.0
) -> tuple[float, float, float, float]:
    """``box`` widened by ``margin`` x its width / height on each side, clamped to the image (pixels).

    Raises :class:`ImageError` for a box :func:`check_box` refuses (not 4 finite numbers, no area:
    needs x1 < x2 and y1 < y2, or outside the image), and :class:`LensError` for a negative ``margin``.
    """
    x1, y1, x2, y2 = check_box(box, image_size)
    width, height = image_size
    if not margin >= 0:
        raise LensError(f"the crop margin must be 0 or more, got {margin}")
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return (max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(width), x2 + dx), min(float(height), y2 + dy))


#: A click outside every detected box searches a square this share of the picture's shorter side,
#: centred on the click (about an object's size in a street photo: a hydrant, a bag, a sign).
CLICK_REGION = 0.3
#: The smallest region side, in pixels, a user's region is widened to (what a click-and-release or
#: two corners one pixel apart would give is no subject to search).
MIN_REGION = 16


def fit_region(box: Box | Sequence[float], size: tuple[int, int], min_side: float = MIN_REGION,
               label: str = "your region") -> Box:
    """A user's region made usable on a picture of ``size`` (width, height) pixels: corners put in
    order, clamped to the picture, each side widened about its centre to at least ``min_side``
    pixels (or the picture's side, when smaller), shifted back inside when widening crossed an edge.

    Returns a :class:`~lens.types.Box` with ``label`` and score 1. Raises :class:`ImageError` when the
    four numbers are not finite or the region lies wholly outside the picture.
    """
    try:
        x1, y1, x2, y2 = Box.of(box).xyxy
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ImageError(f"region {x1:g},{y1:g},{x2:g},{y2:g} is not usable: every coordinate must be a finite number")
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    width, height = size
    if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
        raise ImageError(f"region {x1:g},{y1:g},{x2:g},{y2:g} lies outside the {width}x{height} image")

    def span(low: float, high: float, limit: int) -> tuple[float, float]:
        low, high = max(0.0, low), min(float(limit), high)
        side = min(float(limit), max(high - low, min_side))
        centre = (low + high) / 2
        start = min(max(0.0, centre - side / 2), limit - side)
        return start, start + side

    (x1, x2), (y1, y2) = span(x1, x2, width), span(y1, y2, height)
    return Box(x1, y1, x2, y2, label, 1.0)


def region_around(x: float, y: float, size: tuple[int, int], share: float = CLICK_REGION,
                  min_side: float = MIN_REGION) -> Box:
    """The region searched for a click at (x, y) pixels outside every detected box: a square ``share``
    of the picture's shorter side (at least ``min_side`` pixels), centred on the click and shifted to
    lie inside the picture of ``size`` (width, height). Labelled ``region around (x, y)``.

    Raises :class:`ImageError` for a point that is not finite or lies outside the picture.
    """
    width, height = size
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
        raise ImageError(f"point {x:g},{y:g} lies outside the {width}x{height} image")
    side = max(min_side, share * min(width, height))
    left, top = (min(max(0.0, c - side / 2), max(0.0, limit - side)) for c, limit in ((x, width), (y, height)))
    return fit_region((left, top, left + side, top + side), size, min_side,
                      label=f"region around ({x:.0f}, {y:.0f})")


def changed_box(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]],
                tolerance: float = 0.5) -> tuple[float, float, float, float] | None:
    """The box a user just drew, moved or resized in a box editor, found by comparing its boxes
    before and after the edit (each ``(x1, y1, x2, y2)`` in pixels, in any order).

    Boxes of ``after`` are matched one to one with equal boxes of ``before`` (every coordinate within
    ``tolerance`` pixels); the first one left unmatched that has an area is returned, as floats.
    ``None`` when nothing was drawn or changed: a click, a box removed, or a box just started (no
    area yet). The editor may put a new box first or last; a drawn box's corners may come in any
    order and lie partly outside the picture (:func:`fit_region` orders and clamps them).
    """
    unmatched = [tuple(float(v) for v in box) for box in before]
    for box in after:
        x1, y1, x2, y2 = (float(v) for v in box)
        same = next((i for i, old in enumerate(unmatched)
                     if all(abs(a - b) <= tolerance for a, b in zip(old, (x1, y1, x2, y2)))), None)
        if same is not None:
            del unmatched[same]
        elif abs(x2 - x1) > tolerance and abs(y2 - y1) > tolerance:
            return x1, y1, x2, y2
    return None


def crop(image: Image.Image, box: Box | Sequence[float] | None, margin: float = 0.0) -> Image.Image:
    """The region of ``image`` under ``box`` (a :class:`~lens.types.Box` or ``(x1, y1, x2, y2)`` in
    pixels); ``None`` keeps the whole image (the same object is returned).

    This is lens's only crop, and its one margin rule: the box is widened by ``margin`` times its own
    width on the left and on the right, and times its own height at the top and at the bottom, then
    clamped to the image (:func:`expand_box`); its edges are rounded to whole pixels, and a region
    under a pixel wide (a tiny image) keeps the pixel under its centre. ``margin`` 0 (the default)
    is the exact region asked for; searches from a detector's box use
    :data:`lens.detect.DEFAULT_MARGIN` (5%) for context.

    Raises :class:`ImageError` (see :func:`check_box`) for a box that is not finite, is inverted or
    has no area inside the image.
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
