"""Evaluation: the metrics of a classifier on a holdout, as a JSON-able report (pure numpy).

The holdout is time-based: the most recent records by event time, since a model is judged on
what comes next, not on a random slice of the past.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LOWER_IS_BETTER", "evaluate", "time_split"]

LOWER_IS_BETTER = frozenset({"log_loss"})


def time_split(event_times: np.ndarray, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, holdout): the holdout is the most recent `holdout_fraction`."""
    order = np.argsort(event_times, kind="stable")
    cut = round(len(order) * (1 - holdout_fraction))
    return order[:cut], order[cut:]


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[Any]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (binary and macro), ROC-AUC, log loss, confusion matrix."""
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    k = len(classes)
    y_pred = proba.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    clipped = np.clip(proba[np.arange(len(y_true)), y_true], 1e-15, 1.0)
    aucs = [_binary_auc(proba[:, c], y_true == c) for c in range(k)]
    majority = int(np.bincount(y_true, minlength=k).argmax()) if len(y_true) else 0
    baseline_pred = np.full_like(y_true, majority)
    report: dict[str, Any] = {
        "n": len(y_true),
        "classes": [c if isinstance(c, int) else str(c) for c in classes],
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": aucs[-1] if k == 2 else float(np.nanmean(aucs)),
        "log_loss": float(-np.log(clipped).mean()) if len(y_true) else float("nan"),
        "confusion_matrix": confusion.tolist(),
        "baseline_accuracy": float((baseline_pred == y_true).mean()) if len(y_true) else float("nan"),
        "baseline_f1_macro": float(_f1_macro_of(y_true, baseline_pred, k)),
    }
    if k == 2:  # the last class is the positive one
        report.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
    return report


def _f1_macro_of(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    scores = []
    for c in range(k):
        tp = np.sum((y_pred == c) & (y_true == c))
        p = tp / max(np.sum(y_pred == c), 1)
        r = tp / max(np.sum(y_true == c), 1)
        scores.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return float(np.mean(scores))
