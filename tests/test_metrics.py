"""Metric functions against hand-computed cases, including ties and a query with nothing relevant."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lens.evaluation.metrics import average_precision, hit_at_k, interpolated_pr, mean_or_nan, precision_recall


def test_average_precision_by_hand():
    # relevant at ranks 1, 3 and 6 of 6; 3 relevant in the gallery: (1/1 + 2/3 + 3/6) / 3
    assert average_precision([1, 0, 1, 0, 0, 1], None, 3) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # a fourth relevant item was never returned: it contributes 0
    assert average_precision([1, 0, 1, 0, 0, 1], None, 4) == pytest.approx((1 + 2 / 3 + 0.5) / 4)
    assert average_precision([1, 1], None, 2) == 1.0
    assert average_precision([0, 0, 0], None, 1) == 0.0


def test_query_with_no_relevant_items_has_no_ap_and_is_left_out_of_the_mean():
    assert average_precision([0, 0, 0], None, 0) is None
    assert mean_or_nan([None, 0.5, 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_or_nan([None]))


def _expected_over_orders(relevant, scores, fn):
    """Brute force: average ``fn`` over every order of tied items."""
    groups = {}
    for flag, score in zip(relevant, scores):
        groups.setdefault(score, []).append(flag)
    keys = sorted(groups, reverse=True)
    values = []
    for orders in itertools.product(*(itertools.permutations(groups[k]) for k in keys)):
        values.append(fn([flag for order in orders for flag in order]))
    return float(np.mean(values))


def test_ties_give_the_expected_ap_over_all_orders():
    # a tie of two items (one relevant) at ranks 1-2: AP is (1/1 + 1/2) / 2 = 0.75, not 1 or 0.5
    assert average_precision([0, 1], [0.9, 0.9], 1) == pytest.approx(0.75)
    assert average_precision([1, 0], [0.9, 0.9], 1) == pytest.approx(0.75)
    relevant = [1, 0, 1, 1, 0, 0, 1]
    scores = [0.9, 0.8, 0.8, 0.8, 0.5, 0.5, 0.5]
    expected = _expected_over_orders(relevant, scores, lambda order: average_precision(order, None, 5))
    assert average_precision(relevant, scores, 5) == pytest.approx(expected)


def test_hit_at_k_by_hand_and_with_ties():
    assert hit_at_k([0, 0, 1], None, 2) == 0.0
    assert hit_at_k([0, 0, 1], None, 3) == 1.0
    assert hit_at_k([1, 0], None, 1) == 1.0
    # 3 items tied at the top, 1 relevant, k = 1: a one in three chance
    assert hit_at_k([0, 1, 0], [0.5, 0.5, 0.5], 1) == pytest.approx(1 / 3)
    relevant, scores = [0, 1, 1, 0, 0], [0.9, 0.7, 0.7, 0.7, 0.7]
    for k in (1, 2, 3, 5):
        expected = _expected_over_orders(relevant, scores, lambda order: hit_at_k(order, None, k))
        assert hit_at_k(relevant, scores, k) == pytest.approx(expected)


def test_precision_recall_curve():
    precision, recall = precision_recall([1, 0, 1, 0], 2)
    np.testing.assert_allclose(precision, [1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1, 1])
    grid, mean = interpolated_pr([([1, 0, 1, 0], 2), ([0, 0, 0], 0)], levels=3)
    np.testing.assert_allclose(grid, [0, 0.5, 1])
    np.testing.assert_allclose(mean, [1, 1, 2 / 3])  # the query with nothing relevant is left out
