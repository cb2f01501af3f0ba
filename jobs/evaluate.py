"""Evaluation: the metrics of a classifier on a holdout, as a JSON-able report (pure numpy).

The holdout is time-based: the most recent records by event time, since a model is judged on
what comes next, not on a random slice of the past.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BASELINE_METRICS", "LOWER_IS_BETTER", "evaluate", "time_split"]

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
    """Accuracy, precision/recall/F1 (binary, macro, weighted and per class), ROC-AUC, log loss, the
    confusion matrix, and `baseline_<metric>` for every metric the gate accepts: the same metric
    of the prior predictor (the majority class, with the holdout's class frequencies as its
    probabilities), which a first model must beat."""
    report = _metrics(y_true, proba, classes)
    y = np.asarray(y_true, dtype=np.int64)
    k = len(classes)
    prior = np.bincount(y, minlength=k).astype(np.float64) / max(len(y), 1)
    prior_proba = np.tile(prior + np.arange(k)[::-1] * 1e-12, (len(y), 1))  # ties go to the first class
    base = _metrics(y, prior_proba, classes)
    for metric in BASELINE_METRICS:
        if metric in base:
            report[f"baseline_{metric}"] = base[metric]
    return report


BASELINE_METRICS = ("accuracy", "f1", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "roc_auc",
                    "log_loss")  # fmt: skip


def _metrics(y_true: np.ndarray, proba: np.ndarray, classes: Sequence[Any]) -> dict[str, Any]:
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
    names = [c if isinstance(c, int) else str(c) for c in classes]
    support = actual / actual.sum() if actual.sum() else np.zeros(k)
    report: dict[str, Any] = {
        "n": len(y_true),
        "classes": names,
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": aucs[-1] if k == 2 else float(np.nanmean(aucs)),
        "log_loss": float(-np.log(clipped).mean()) if len(y_true) else float("nan"),
        "f1_weighted": float((f1 * support).sum()),
        "per_class": {
            str(name): {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(actual[c]),
            }
            for c, name in enumerate(names)
        },
        "confusion_matrix": confusion.tolist(),
    }
    if k == 2:  # the last class is the positive one
        report.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
    return report
