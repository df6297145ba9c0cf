"""Task metrics, computed by scikit-learn (accuracy, F1, macro-F1, Matthews correlation) and scipy
(Pearson's and Spearman's correlations) rather than by hand, and the overall dev score.

A task names its primary `metric` and any extra `metrics`; each is logged as `task/split/<key>`,
where the key is the metric's name except accuracy's, which keeps the CS224N project's `acc`
(`sst/dev/acc`). `overall` is the mean of the tasks' primary metrics, each mapped to [0, 1]: the
correlations and MCC (in [-1, 1]) as (x + 1) / 2, the rest as they are. For SST, Quora and STS
that is exactly the CS224N overall score, (acc_sst + acc_para + (r_sts + 1) / 2) / 3.

A metric that is undefined is NaN, with a warning that says why: a correlation when the gold labels
or the predictions are all equal (no variance: Pearson's r is 0/0) or there are fewer than two
examples, any metric on no examples. Not 0.0: that would read as a real, if poor, score. An overall
with any task's primary metric NaN is NaN too, and the training loop never keeps a NaN dev/overall
as its best state (`trainers.engine.scoring`). (sklearn's own conventions stay: F1 with no
positives predicted, zero_division, and MCC with one class predicted score 0.)"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

log = logging.getLogger(__name__)
Metric = Callable[[np.ndarray, np.ndarray], float]  # (predictions, gold) -> score


def undefined(metric: str, why: str) -> float:
    """NaN, with a warning that says which metric is undefined and why."""
    log.warning("%s is undefined (NaN): %s", metric, why)
    return float("nan")


def _correlation(name: str, fn) -> Metric:
    """A scipy correlation; constant predictions (or labels) have none: NaN, with a warning."""
    def score(pred: np.ndarray, gold: np.ndarray) -> float:
        pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        n = len(gold)
        if n < 2:
            return undefined(name, f"{n} example(s); a correlation needs at least 2")
        if not np.isfinite(pred).all():
            return undefined(name, f"{int((~np.isfinite(pred)).sum())} of the {n} predictions "
                             "are not finite numbers")
        if np.ptp(gold) == 0:
            return undefined(name, f"all {n} gold labels are equal ({gold[0]:g}), so they have "
                             "no variance to correlate with")
        if np.ptp(pred) == 0:
            return undefined(name, f"all {n} predictions are equal ({pred[0]:g}), so they have "
                             "no variance to correlate with")
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
    "pearson": _correlation("pearson", stats.pearsonr),
    "spearman": _correlation("spearman", stats.spearmanr),
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
        return undefined(metric, "no examples to score")
    return METRICS[metric](pred, gold)


def normalized(metric: str, value: float) -> float:
    """The metric mapped to [0, 1] for the overall score."""
    return (value + 1.0) / 2.0 if metric in SIGNED else value


def overall(primary: list[tuple[str, float]]) -> float:
    """The overall score of (metric, value) pairs, one per task: the mean of the normalized values;
    NaN if any value is NaN (a task's primary metric undefined) or there are none."""
    values = [normalized(m, float(v)) for m, v in primary]
    if not values or any(np.isnan(v) for v in values):
        return float("nan")
    return float(np.mean(values))
