"""The bad-input corpus: odd, broken and hostile image files, written fresh by the tests that use it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def bad_input_corpus(folder: Path) -> dict[str, bool]:
    """Write the corpus; returns file name -> whether it should decode (False: a clear error)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = Image.new("RGB", (64, 48), (200, 30, 30))
    good.paste((20, 20, 220), (0, 0, 20, 48))
    expect = {}

    def save(name: str, image: Image.Image, ok: bool = True, **kwargs) -> None:
        image.save(folder / name, **kwargs)
        expect[name] = ok

    buffer = io.BytesIO()
    good.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:300])
    expect["truncated.jpg"] = False
    (folder / "zero.jpg").write_bytes(b"")
    expect["zero.jpg"] = False
    (folder / "text.jpg").write_text("I am not a picture")
    expect["text.jpg"] = False
    save("bomb.png", Image.new("1", (20000, 20000)), ok=False)
    save("one-pixel.png", Image.new("RGB", (1, 1), (9, 9, 9)))
    save("sixteen-bit.png", Image.fromarray(np.full((30, 40), 50000, dtype=np.uint16)))
    save("cmyk.jpg", good.convert("CMYK"))
    save("palette.png", good.convert("P"))
    save("rgba.png", good.convert("RGBA"))
    save("gray.jpg", good.convert("L"))
    frames = [good, Image.new("RGB", (64, 48), (0, 255, 0))]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", good, exif=exif.tobytes())
    return expect
