"""common/metrics.py: pure metric functions."""

from __future__ import annotations

import math

import pytest

from fedtune.common.metrics import exact_match, label_accuracy, mean_loss, normalize_answer, perplexity, weighted_mean


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Routine", "routine"),
        ("  routine  ", "routine"),
        ("Emergency.\nBecause the patient ...", "emergency"),
        ("\n\n  Urgent\nsecond line", "urgent"),
        ("Breach   of\tcontract.", "breach of contract"),
        ("", ""),
        ("\n \n", ""),
        ("3.5", "3.5"),  # only a trailing period goes
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match(["Routine", "urgent.", "no"], ["routine", "Urgent", "yes"]) == pytest.approx(2 / 3)
    assert exact_match(["a"], ["a"]) == 1.0
    assert exact_match(["emergency\nbecause"], ["emergency"]) == 1.0
    assert exact_match(["emergency room"], ["emergency"]) == 0.0
    assert math.isnan(exact_match([], []))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_label_accuracy():
    assert label_accuracy(["x", "y", "y", "y"], ["x", "x", "y", "Y"]) == 0.75


def test_mean_loss_and_perplexity():
    assert mean_loss(6.0, 4) == 1.5
    assert math.isnan(mean_loss(1.0, 0))
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(2.0) == pytest.approx(7.38905609893065)
    assert math.isnan(perplexity(float("nan")))
    assert math.isnan(perplexity(float("inf")))
    assert math.isfinite(perplexity(5000.0))  # capped, no OverflowError


def test_weighted_mean():
    assert weighted_mean([1.0, 4.0], [3, 1]) == pytest.approx(7 / 4)
    assert weighted_mean([2.0, 10.0, float("nan")], [1, 1, 5]) == pytest.approx(6.0)  # NaN values skipped
    assert weighted_mean([2.0, 10.0], [1, 0]) == 2.0  # zero weight skipped
    assert weighted_mean([2.0, 10.0], [1, -3]) == 2.0  # negative weight skipped
    assert math.isnan(weighted_mean([], []))
    assert math.isnan(weighted_mean([1.0], [0]))
