"""IQA metrics on per-image scores: SRCC, PLCC (raw and after a logistic fit), KRCC, RMSE.

A metric that cannot be computed (too few samples, a constant input, a failed fit)
is NaN with a warning, never an exception. Non-finite pairs are dropped with a warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

# the fewest samples that say anything; the logistic has 4 parameters to fit
MIN_SAMPLES = {"correlation": 2, "logistic": 5}


def _pairs(pred: ArrayLike, label: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(pred, dtype=float).ravel(), np.asarray(label, dtype=float).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{name}: {p.size} predictions for {y.size} labels")
    finite = np.isfinite(p) & np.isfinite(y)
    if not finite.all():
        warnings.warn(f"{name}: dropped {np.count_nonzero(~finite)} non-finite pairs", RuntimeWarning, stacklevel=3)
    return p[finite], y[finite]


def _usable(p: np.ndarray, y: np.ndarray, name: str, min_n: int) -> bool:
    if len(p) < min_n:
        warnings.warn(f"{name}: needs {min_n} samples, got {len(p)}: NaN", RuntimeWarning, stacklevel=3)
        return False
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        warnings.warn(f"{name}: constant input: NaN", RuntimeWarning, stacklevel=3)
        return False
    return True


def _correlation(fn: Callable, pred: ArrayLike, label: ArrayLike, name: str) -> float:
    p, y = _pairs(pred, label, name)
    return float(fn(p, y)[0]) if _usable(p, y, name, MIN_SAMPLES["correlation"]) else float("nan")


def srcc(pred: ArrayLike, label: ArrayLike) -> float:
    """Spearman rank correlation."""
    return _correlation(stats.spearmanr, pred, label, "srcc")


def plcc(pred: ArrayLike, label: ArrayLike) -> float:
    """Pearson linear correlation of the raw predictions."""
    return _correlation(stats.pearsonr, pred, label, "plcc")


def krcc(pred: ArrayLike, label: ArrayLike) -> float:
    """Kendall rank correlation (tau-b)."""
    return _correlation(stats.kendalltau, pred, label, "krcc")


def rmse(pred: ArrayLike, label: ArrayLike) -> float:
    """Root mean squared error; meaningful only when predictions are on the labels' scale."""
    p, y = _pairs(pred, label, "rmse")
    if len(p) == 0:
        warnings.warn("rmse: no samples: NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(np.sqrt(np.mean((p - y) ** 2)))


def logistic(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic of IQA papers (VQEG), mapping predictions to the label scale."""
    with np.errstate(over="ignore"):  # far tails saturate to b1 or b2, which is the intent
        return (b1 - b2) / (1 + np.exp(-(x - b3) / abs(b4))) + b2


def logistic_plcc(pred: ArrayLike, label: ArrayLike) -> float:
    """PLCC between the labels and the predictions mapped by a least-squares logistic fit.

    Signed like the raw correlations: negative when the fitted logistic falls, so an
    inverted model does not look good here alone.
    """
    p, y = _pairs(pred, label, "plcc_logistic")
    if not _usable(p, y, "plcc_logistic", MIN_SAMPLES["logistic"]):
        return float("nan")
    # start spanning the labels, centred on the predictions, rising or falling with the
    # raw correlation (b1 is the limit at high predictions, b2 at low ones)
    b1, b2 = (y.max(), y.min()) if stats.pearsonr(p, y)[0] >= 0 else (y.min(), y.max())
    init = [b1, b2, np.mean(p), np.std(p)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)  # no covariance: not needed
            params, _ = optimize.curve_fit(logistic, p, y, p0=init, maxfev=10000)
    except (RuntimeError, ValueError) as err:
        warnings.warn(f"plcc_logistic: fit failed ({err}): NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    fitted = logistic(p, *params)
    if np.ptp(fitted) == 0:
        warnings.warn("plcc_logistic: the fitted logistic is flat: NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(np.sign(params[0] - params[1]) * stats.pearsonr(fitted, y)[0])


def compute_metrics(pred: ArrayLike, label: ArrayLike, higher_is_better: bool = True) -> dict[str, float]:
    """srcc, plcc, plcc_logistic, krcc, rmse and n (pairs used) of per-image predictions.

    ``higher_is_better=False`` is for labels where higher means worse (DMOS) while the
    predictions are quality scores (higher means better), e.g. a model trained on MOS
    tested on a DMOS set: correlations are taken against the negated labels, so a good
    model scores positive. A model trained on those DMOS labels themselves predicts DMOS
    and wants ``higher_is_better=True``. RMSE is always on the raw values, so it means
    something only when predictions and labels share a scale.
    """
    p, y = _pairs(pred, label, "compute_metrics")
    signed = y if higher_is_better else -y
    return {"srcc": srcc(p, signed), "plcc": plcc(p, signed), "plcc_logistic": logistic_plcc(p, signed),
            "krcc": krcc(p, signed), "rmse": rmse(p, y), "n": len(p)}


class PerImage(NamedTuple):
    keys: np.ndarray  # sorted
    preds: np.ndarray  # mean prediction over each image's patches
    labels: np.ndarray | None  # each image's label, when labels were given


def aggregate_by_key(keys: ArrayLike, preds: ArrayLike, labels: ArrayLike | None = None) -> PerImage:
    """Per-image mean of patch predictions, images sorted by key (reproducible whatever the
    order the patches arrived in, e.g. gathered from several ranks)."""
    unique, index = np.unique(np.asarray(keys), return_inverse=True)
    counts = np.bincount(index)
    mean_preds = np.bincount(index, weights=np.asarray(preds, dtype=float)) / counts
    if labels is None:
        return PerImage(unique, mean_preds, None)
    labels = np.asarray(labels, dtype=float)
    mean_labels = np.bincount(index, weights=labels) / counts
    if not np.allclose(labels, mean_labels[index], equal_nan=True):
        warnings.warn("aggregate_by_key: patches of one image carry different labels; using their mean",
                      RuntimeWarning, stacklevel=2)
    return PerImage(unique, mean_preds, mean_labels)
