"""The combined search (method ``auto``): exact matches above visually similar images.

Google Lens answers a photo with "this exact item" first and "things that look like it" after.
lens does the same with two indexes of the gallery:

- **exact**: the local-feature method (``local``: visual words, inverted file, RANSAC homography)
  over the whole photo, the subject box only weighting the keypoints; its geometrically verified
  results are marked ``match="exact"`` with their inlier count and matched region;
- **similar**: a global embedding (the first indexed method that is not a keypoint or hash method,
  e.g. ``hf:...`` or ``resnet50``) of the subject, marked ``match="similar"``.

The answer is every exact match (most inliers first), then the similar images not already shown,
``k`` in all. Either part alone is used when only its index exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from lens.errors import IndexNotFoundError

if TYPE_CHECKING:
    from lens.gallery import SearchResult

AUTO = "auto"  #: the combined search's method name
EXACT_METHOD = "local"  #: the method whose verified results are exact matches
#: methods never used for "visually similar" when another is indexed (keypoints and hashes)
_NOT_SIMILAR = ("local", "sift", "phash", "dhash", "ahash", "whash")


def auto_methods(indexed: Sequence[str]) -> tuple[str | None, str | None]:
    """(exact method, similar method) among the ``indexed`` method names; None where there is none."""
    exact = EXACT_METHOD if EXACT_METHOD in indexed else None
    others = [m for m in indexed if m != EXACT_METHOD]
    preferred = [m for m in others if m not in _NOT_SIMILAR]
    similar = (preferred or others or [None])[0]
    if exact is None and similar is None:
        raise IndexNotFoundError(
            "the combined search (method 'auto') needs an index: build `--methods local` for exact "
            "matches and a global embedding (e.g. `--methods resnet50`) for visually similar images")
    return exact, similar


def combine(exact: Sequence[SearchResult], similar: Sequence[SearchResult], k: int) -> list[SearchResult]:
    """The verified results of ``exact`` (in their order), then ``similar`` ones not among them; ranks
    renumbered from 1, at most ``k``."""
    verified = [r for r in exact if r.match == "exact"]
    shown = {r.path for r in verified}
    rest = [replace(r, match="similar", inliers=0, region=None) for r in similar if r.path not in shown]
    return [replace(r, rank=i + 1) for i, r in enumerate([*verified, *rest][:k])]
