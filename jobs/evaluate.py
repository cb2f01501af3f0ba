"""Evaluation: the metrics of a classifier on a holdout, as a JSON-able report (numpy, and scipy's ranks).

The holdout is time-based: the most recent records by event time, since a model is judged on
what comes next, not on a random slice of the past.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["BASELINE_METRICS", "LOWER_IS_BETTER", "evaluate", "f1_per_class", "macro_f1", "time_split"]

LOWER_IS_BETTER = frozenset({"log_loss"})


def time_split(event_times: np.ndarray, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, holdout): the holdout is the most recent `holdout_fraction`."""
    order = np.argsort(event_times, kind="stable")
    cut = round(len(order) * (1 - holdout_fraction))
    return order[:cut], order[cut:]


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties averaged; nan with one class only."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # here: a job that never evaluates pays no scipy import

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_per_class(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[Any]) -> np.ndarray:
    """The F1 score of each of `classes` (the last axis of the result) between the labels `predicted`
    and `truth`, taken along their last axis; leading axes are a batch (bootstrap resamples, say).
    As scikit-learn's `f1_score(..., labels=classes, average=None, zero_division=0)`.

    >>> f1_per_class(np.array(["a", "a", "b"]), np.array(["a", "b", "b"]), ["a", "b", "c"]).tolist()
    [0.666..., 0.666..., 0.0]
    """
    p, t = np.asarray(predicted), np.asarray(truth)
    scores = []
    for c in classes:
        is_p, is_t = p == c, t == c
        scores.append(_f1((is_p & is_t).sum(axis=-1), is_p.sum(axis=-1), is_t.sum(axis=-1)))
    return np.stack(scores, axis=-1)


def macro_f1(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[Any]) -> np.ndarray:
    """The unweighted mean of `f1_per_class` over `classes` (a class absent from both counts as 0):
    scikit-learn's `f1_score(..., labels=classes, average="macro", zero_division=0)`, per batch entry.

    >>> float(macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), [0, 1]))
    0.733...
    """
    return f1_per_class(predicted, truth, classes).mean(axis=-1)


def _f1(true_positives: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """2 tp / (predicted + actual) per class, 0 where the class is neither predicted nor present."""
    total = predicted + actual
    return np.divide(2.0 * true_positives, total, out=np.zeros(np.shape(total)), where=total > 0)


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
    f1 = _f1(tp, predicted, actual)
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
