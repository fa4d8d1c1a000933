"""Metrics against scipy, the logistic fit, degenerate inputs, per-image aggregation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from iqa_dist.metrics import aggregate_by_key, compute_metrics, krcc, logistic_plcc, plcc, rmse, srcc

CORRELATIONS = {"srcc": (srcc, stats.spearmanr), "plcc": (plcc, stats.pearsonr), "krcc": (krcc, stats.kendalltau)}


@pytest.fixture
def scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    label = np.round(rng.uniform(0, 100, 60))  # rounded: some ties, as in MOS
    return label + rng.normal(0, 15, 60), label


@pytest.mark.parametrize("name", CORRELATIONS)
def test_correlations_equal_scipy(scores, name: str) -> None:
    ours, theirs = CORRELATIONS[name]
    pred, label = scores
    assert ours(pred, label) == pytest.approx(theirs(pred, label)[0], abs=1e-12)


def test_rmse(scores) -> None:
    pred, label = scores
    assert rmse(pred, label) == pytest.approx(math.sqrt(sum((p - y) ** 2 for p, y in zip(pred, label)) / len(pred)))


def test_logistic_fit_improves_plcc_of_a_monotone_nonlinear_relation() -> None:
    rng = np.random.default_rng(1)
    pred = np.linspace(-3, 3, 80)
    label = 100 / (1 + np.exp(-2.5 * pred)) + rng.normal(0, 2, 80)
    assert logistic_plcc(pred, label) > 0.99 > plcc(pred, label) + 0.03
    assert logistic_plcc(pred, -label) == pytest.approx(-logistic_plcc(pred, label), abs=1e-6)


@pytest.mark.parametrize("metric", [srcc, plcc, krcc, logistic_plcc])
@pytest.mark.parametrize("pred,label", [
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [4.0] * 6),  # constant labels
    ([2.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),  # constant predictions
    ([1.0], [2.0]),  # one sample
    ([], []),
], ids=["constant-label", "constant-pred", "single", "empty"])
def test_degenerate_input_is_nan_with_warning(metric, pred, label) -> None:
    with pytest.warns(RuntimeWarning):
        assert math.isnan(metric(pred, label))


def test_logistic_needs_more_points_than_parameters() -> None:
    with pytest.warns(RuntimeWarning, match="samples"):
        assert math.isnan(logistic_plcc([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]))


def test_non_finite_pairs_are_dropped_with_warning(scores) -> None:
    pred, label = scores
    dirty_pred, dirty_label = pred.copy(), label.copy()
    dirty_pred[3], dirty_label[7] = np.nan, np.inf
    keep = np.ones(len(pred), bool)
    keep[[3, 7]] = False
    with pytest.warns(RuntimeWarning, match="2 non-finite"):
        result = compute_metrics(dirty_pred, dirty_label)
    assert result["n"] == 58
    assert result["srcc"] == pytest.approx(srcc(pred[keep], label[keep]))


def test_compute_metrics_on_lower_is_better_labels(scores) -> None:
    pred, label = scores
    mos = compute_metrics(pred, label)
    dmos = compute_metrics(pred, 100 - label, higher_is_better=False)
    assert set(mos) == {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "n"}
    for key in ("srcc", "plcc", "plcc_logistic", "krcc"):
        assert dmos[key] == pytest.approx(mos[key], abs=1e-6) and mos[key] > 0.5
    assert dmos["rmse"] == pytest.approx(rmse(pred, 100 - label))


def test_aggregate_by_key_means_per_image_sorted_by_key() -> None:
    keys = ["b", "a", "b", "c", "a", "b"]
    preds = [1.0, 10.0, 2.0, 7.0, 20.0, 3.0]
    labels = [50.0, 60.0, 50.0, 70.0, 60.0, 50.0]
    out = aggregate_by_key(keys, preds, labels)
    assert list(out.keys) == ["a", "b", "c"]
    np.testing.assert_allclose(out.preds, [15.0, 2.0, 7.0])
    np.testing.assert_allclose(out.labels, [60.0, 50.0, 70.0])
    order = [5, 3, 0, 4, 2, 1]  # same patches, another arrival order
    again = aggregate_by_key([keys[i] for i in order], [preds[i] for i in order])
    assert list(again.keys) == list(out.keys) and again.labels is None
    np.testing.assert_allclose(again.preds, out.preds)


def test_aggregate_by_key_warns_on_disagreeing_labels() -> None:
    with pytest.warns(RuntimeWarning, match="different labels"):
        aggregate_by_key(["a", "a"], [1.0, 2.0], [3.0, 4.0])
