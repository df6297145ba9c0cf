"""Task metrics, computed by scikit-learn (accuracy, F1, macro-F1, Matthews correlation) and scipy
(Pearson's and Spearman's correlations) rather than by hand, and the overall dev score.

A task names its primary `metric` and any extra `metrics`; each is logged as `task/split/<key>`,
where the key is the metric's name except accuracy's, which keeps the CS224N project's `acc`
(`sst/dev/acc`). `overall` is the mean of the tasks' primary metrics, each mapped to [0, 1]: the
correlations and MCC (in [-1, 1]) as (x + 1) / 2, the rest as they are. For SST, Quora and STS
that is exactly the CS224N overall score, (acc_sst + acc_para + (r_sts + 1) / 2) / 3."""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

Metric = Callable[[np.ndarray, np.ndarray], float]  # (predictions, gold) -> score


def _correlation(fn) -> Metric:
    """A scipy correlation; constant predictions (or labels) have none, and score 0, no linear
    (or monotonic) association, rather than NaN, which would poison a sweep's objective."""
    def score(pred: np.ndarray, gold: np.ndarray) -> float:
        pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        if len(gold) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
            return 0.0
        return float(fn(pred, gold)[0])
    return score


def _classes(fn, **kwargs) -> Metric:
    def score(pred: np.ndarray, gold: np.ndarray) -> float:
        with warnings.catch_warnings():  # a class never predicted: sklearn's 0, with a warning
            warnings.simplefilter("ignore")
            return float(fn(np.asarray(gold).astype(np.int64), np.asarray(pred).astype(np.int64),
                            **kwargs))
    return score


METRICS: dict[str, Metric] = {
    "accuracy": _classes(skm.accuracy_score),
    "f1": _classes(skm.f1_score, zero_division=0.0),  # binary: F1 of class 1
    "macro_f1": _classes(skm.f1_score, average="macro", zero_division=0.0),
    "mcc": _classes(skm.matthews_corrcoef),
    "pearson": _correlation(stats.pearsonr),
    "spearman": _correlation(stats.spearmanr),
}
CLASSIFICATION = ("accuracy", "f1", "macro_f1", "mcc")
REGRESSION = ("pearson", "spearman")
SIGNED = ("mcc", "pearson", "spearman")  # in [-1, 1]
KEYS = {"accuracy": "acc"}  # the CS224N project's key for accuracy


def key(metric: str) -> str:
    """The metric's part of a `task/split/metric` key."""
    return KEYS.get(metric, metric)


def score(metric: str, pred: np.ndarray, gold: np.ndarray) -> float:
    if not len(gold):
        return float("nan")
    return METRICS[metric](pred, gold)


def normalized(metric: str, value: float) -> float:
    """The metric mapped to [0, 1] for the overall score."""
    return (value + 1.0) / 2.0 if metric in SIGNED else value


def overall(primary: list[tuple[str, float]]) -> float:
    """The overall score of (metric, value) pairs, one per task: the mean of the normalized values."""
    return float(np.mean([normalized(m, v) for m, v in primary]))
