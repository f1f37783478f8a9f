"""Metrics with missing labels (NaN) masked out, averaged over targets.

Regression: ``rmse``, ``mae``, ``r2``. Binary classification (predictions are probabilities or logits;
only their order and the 0.5 / 0 threshold matter): ``roc_auc``, ``pr_auc`` (average precision),
``accuracy``. A target whose test labels are all one class has no ROC-AUC; it is left out of the average
(as OGB's ``Evaluator`` does) and the result is NaN if no target remains.

Computed here rather than with ``ogb.graphproppred.Evaluator``, whose package import starts a PyPI version
check (a network call); the tests check these numbers against ``Evaluator`` (``rmse`` of
``ogbg-molfreesolv``, ``rocauc`` of ``ogbg-molbbbp``) and scikit-learn.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["REGRESSION_METRICS", "CLASSIFICATION_METRICS", "compute_metrics", "primary_metric"]

REGRESSION_METRICS = ("rmse", "mae", "r2")
CLASSIFICATION_METRICS = ("roc_auc", "pr_auc", "accuracy")


def primary_metric(task: str) -> tuple:
    """``(name, mode)`` used for early stopping and model selection."""
    return ("rmse", "min") if task == "regression" else ("roc_auc", "max")


def compute_metrics(task: str, y_true, y_pred, logits: bool = False) -> Dict[str, float]:
    """Metrics of ``y_pred`` against ``y_true`` (both ``[M, T]``; NaN in ``y_true`` = missing).

    Example:
        >>> compute_metrics("regression", [[1.0], [2.0], [np.nan]], [[1.0], [4.0], [9.0]])["rmse"]
        1.4142135623730951
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    per = {}
    for t in range(y_true.shape[1]):
        mask = ~np.isnan(y_true[:, t])
        yt, yp = y_true[mask, t], y_pred[mask, t]
        if yt.size == 0:
            continue
        if task == "regression":
            err = yp - yt
            ss_tot = float(((yt - yt.mean()) ** 2).sum())
            vals = {
                "rmse": float(np.sqrt((err ** 2).mean())),
                "mae": float(np.abs(err).mean()),
                "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            }
        elif task == "classification":
            threshold = 0.0 if logits else 0.5
            both = yt.min() != yt.max()
            vals = {
                "roc_auc": float(roc_auc_score(yt, yp)) if both else float("nan"),
                "pr_auc": float(average_precision_score(yt, yp)) if both else float("nan"),
                "accuracy": float(((yp > threshold) == (yt > 0.5)).mean()),
            }
        else:
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        for k, v in vals.items():
            per.setdefault(k, []).append(v)
    names = REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS
    out = {}
    for k in names:
        vals = [v for v in per.get(k, []) if not np.isnan(v)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
