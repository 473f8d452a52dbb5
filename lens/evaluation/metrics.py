"""Retrieval metrics, kept apart from indexes and methods (like faiss's contrib/evaluation.py).

Conventions (the report states them too):

- **AP** is non-interpolated average precision over the returned ranking: the mean, over *all*
  relevant gallery items, of the precision at the rank where each is found; a relevant item that is not
  returned contributes 0. Tied scores are handled exactly (McSherry & Najork, ECIR 2008): the AP is the
  expectation over every order of the tied items, so no arbitrary tie-break can change a result.
- A query with **no relevant items** has no AP: it is left out of the mean (and counted).
- **Recall@k** is the fraction of queries with at least one relevant item in the top k (the usual
  "R@k" of image retrieval); with ties at rank k, the expected value over tie orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _tie_groups(scores: Sequence[float]) -> list[tuple[int, int]]:
    """(start, end) index ranges of runs of equal scores in a ranking sorted best first."""
    groups, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or scores[i] != scores[start]:
            groups.append((start, i))
            start = i
    return groups


def average_precision(relevant: Sequence[bool], scores: Sequence[float] | None, n_relevant: int) -> float | None:
    """AP of one ranking; ``relevant[i]`` says whether the item at rank i+1 is relevant.

    ``scores`` (best first) identify ties; ``None`` means no ties. ``n_relevant`` is the number of
    relevant items in the whole gallery. Returns None when there is nothing relevant.
    """
    if n_relevant <= 0:
        return None
    scores = list(scores) if scores is not None else list(range(len(relevant), 0, -1))
    total, found = 0.0, 0
    for start, end in _tie_groups(scores):
        n = end - start
        r = sum(bool(x) for x in relevant[start:end])
        if r:
            for j in range(1, n + 1):  # position j inside the group, rank start + j
                others = (j - 1) * (r - 1) / (n - 1) if n > 1 else 0.0
                total += (r / n) * (found + 1 + others) / (start + j)
        found += r
    return total / n_relevant


def hit_at_k(relevant: Sequence[bool], scores: Sequence[float] | None, k: int) -> float:
    """1 if a relevant item is in the top k, 0 if not; expected value when a tie straddles rank k."""
    scores = list(scores) if scores is not None else list(range(len(relevant), 0, -1))
    for start, end in _tie_groups(scores):
        r = sum(bool(x) for x in relevant[start:end])
        if start >= k:
            return 0.0
        if end <= k:
            if r:
                return 1.0
            continue
        # the group straddles rank k: m = k - start of its n items make the cut
        n, m = end - start, k - start
        return 1.0 - math.comb(n - r, m) / math.comb(n, m) if r else 0.0
    return 0.0


def precision_recall(relevant: Sequence[bool], n_relevant: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each rank of one ranking: two ``(len(relevant),)`` float64 arrays in
    [0, 1] (empty when nothing is relevant)."""
    if n_relevant <= 0 or not len(relevant):
        return np.zeros(0), np.zeros(0)
    hits = np.cumsum(np.asarray(relevant, dtype=np.float64))
    ranks = np.arange(1, len(relevant) + 1)
    return hits / ranks, hits / n_relevant


def interpolated_pr(rankings: Sequence[tuple[Sequence[bool], int]], levels: int = 21) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision at ``levels`` recall points over queries (for PR curves).

    ``rankings``: (relevant flags best first, number relevant in the gallery) per query. Returns the
    recall grid ``(levels,)`` (0 to 1) and the mean over queries of the best precision at a recall >=
    each level, ``(levels,)`` float64 (queries with nothing relevant left out; zeros when none is left).
    """
    grid = np.linspace(0.0, 1.0, levels)
    curves = []
    for relevant, n_relevant in rankings:
        precision, recall = precision_recall(relevant, n_relevant)
        if not len(precision):
            continue
        best = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at recall >= r
        idx = np.searchsorted(recall, grid, side="left")
        curves.append(np.where(idx < len(best), best[np.minimum(idx, len(best) - 1)], 0.0))
    if not curves:
        return grid, np.zeros_like(grid)
    return grid, np.mean(curves, axis=0)


def mean_or_nan(values: Sequence[float | None]) -> float:
    """The mean of the values that are not None (queries without an AP left out); NaN when none is left."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")
