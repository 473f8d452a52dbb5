"""Locality-sensitive hashing: random-hyperplane bit codes searched by Hamming distance.

Spec: ``lsh:BITS`` or ``lsh:BITS:rerank=N`` (default 256 bits). Each vector becomes BITS sign bits
of random projections (FAISS ``IndexLSH`` with a random rotation, a fixed seed, codes packed 8 per
byte): ``BITS / 8`` bytes per vector instead of ``4 * d``. Two vectors at angle ``t`` differ in a
fraction ``t / pi`` of the bits, so the similarity reported is the cosine estimate
``cos(pi * hamming / BITS)``. ``rerank=N`` makes the gallery re-rank the top N candidates with the
exact cosine of the stored float vectors. For float (cosine) methods only: bit-code methods such as
``phash`` are already binary; index those with ``annoy`` or ``faiss:BFlat``.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from lens.errors import LensError
from lens.index import register_backend
from lens.index.faiss_index import FaissIndex


@register_backend("lsh")
class LshIndex(FaissIndex):
    """Random-hyperplane LSH codes (FAISS ``IndexLSH``, Charikar 2002: vectors at angle t differ in a
    fraction t / pi of their bits), searched by Hamming distance; similarity ``cos(pi * h / BITS)``.

    Spec ``lsh:BITS[:rerank=N]``; cosine (float) vectors only. Raises :class:`LensError` otherwise.
    """

    default_factory = "256"

    def __init__(self, spec: str, dim: int, metric: str):
        if metric != "cosine":
            raise LensError(f"the lsh backend hashes float vectors (cosine), not '{metric}' codes; "
                            "use annoy or faiss:BFlat for bit codes")
        super().__init__(spec, dim, metric)
        try:
            self.bits = int(self.factory)
        except ValueError:
            raise LensError(f"lsh spec '{spec}' should be lsh:BITS, e.g. lsh:256") from None
        if self.bits < 8 or self.bits % 8:
            raise LensError(f"lsh bits must be a positive multiple of 8, got {self.bits} in '{spec}'")

    def _parse_parameters(self, options: dict[str, str], spec: str) -> dict[str, float]:
        if options:
            raise LensError(f"unknown lsh option(s) {sorted(options)} in '{spec}'; use rerank")
        return {}

    def _new_index(self) -> Any:
        return faiss.IndexLSH(self.dim, self.bits, True, False)  # random rotation, sign thresholds

    def _similarities(self, distances: np.ndarray) -> np.ndarray:
        return np.clip(np.cos(np.pi * distances / self.bits), 0.0, 1.0).astype(np.float32)
