"""Perceptual hashes (``imagehash``): 64-bit codes compared by Hamming distance.

==========  ==========================================================================================
name        code (8 x 8 = 64 bits, from the greyscale image)
==========  ==========================================================================================
phash       sign of the low-frequency 8 x 8 DCT coefficients of a 32 x 32 thumbnail vs their median
dhash       whether each pixel of a 9 x 8 thumbnail is brighter than its right neighbour (gradients)
ahash       whether each pixel of an 8 x 8 thumbnail is brighter than the thumbnail's mean
==========  ==========================================================================================

Codes are packed 8 bits per byte (``np.packbits``: 8 uint8 per image) and the method's metric is
``hamming`` with ``dim`` = 64 bits; the similarity shown is ``1 - hamming / 64``. They find copies of
an image that was resized, recompressed or slightly recoloured, not flipped, rotated or cropped
(see docs/methods.md for what each survives in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from lens.errors import LensError
from lens.methods import register_method
from lens.types import BaseMethod, MethodInfo

HASHES: dict[str, Callable[..., imagehash.ImageHash]] = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "ahash": imagehash.average_hash,
}
HASH_SIZE = 8  #: codes are HASH_SIZE**2 bits


class PerceptualHash(BaseMethod):
    """One ``imagehash`` function as a method: model-free, thread-safe, cheap."""

    def __init__(self, name: str, hash_size: int = HASH_SIZE):
        self._function = HASHES[name]
        self.hash_size = hash_size
        bits = hash_size * hash_size
        self.info = MethodInfo(
            name=name,
            metric="hamming",
            dim=bits,
            # nothing learned: the fingerprint names the algorithm, so another one is never mixed in
            weights=f"imagehash-{name}-{bits}bit",
            extra={"library": f"imagehash {imagehash.__version__}", "hash_size": hash_size,
                   "packed": "np.packbits, 8 bits per byte"},
        )

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The picture's hash (``imagehash`` on its greyscale version): ``(bits / 8,)`` uint8 packed bits
        (``np.packbits``), 8 bytes for the default 64 bits."""
        bits = self._function(image, hash_size=self.hash_size).hash.reshape(-1)
        return np.packbits(bits.astype(np.uint8))

    def embed_prepared(self, items: Sequence[Any]) -> np.ndarray:
        """The prepared codes stacked: ``(n, bits / 8)`` uint8 packed bits (``(0, 8)`` for none), compared by
        Hamming distance."""
        if not items:
            return np.zeros((0, (self.info.dim + 7) // 8), dtype=np.uint8)
        return np.stack([np.asarray(item, dtype=np.uint8) for item in items])


def _factory(spec: str, model: str | None = None, **options: Any) -> PerceptualHash:
    if model:
        raise LensError(f"method '{spec}' has no model weights; drop --model {spec}=...")
    return PerceptualHash(spec, **options)


for _name in HASHES:
    register_method(_name)(_factory)
