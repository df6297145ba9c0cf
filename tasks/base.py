"""What a task is: its files and columns, how labels are parsed and checked, its loss, its
prediction rule and its dev metric. One `Task` per CS224N task lives in its own module
(`tasks/sst.py`, `tasks/para.py`, `tasks/sts.py`), following the CS224N minBERT default project.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Task:
    name: str  # short name used in configs and metric keys: sst, para, sts
    file_prefix: str  # ids-sst -> ids-sst-train.csv
    text_columns: tuple[str, ...]  # one column (single sentence) or two (a pair)
    label_column: str
    label_range: tuple[float, float]  # inclusive; labels outside it are an error
    integer_labels: bool  # class ids; a label like 2.5 is then outside the label set
    metric: str  # acc | pearson
    prediction_column: str  # header of the CS224N leaderboard prediction file
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (head output, labels) -> scalar
    predict: Callable[[torch.Tensor], torch.Tensor]  # head output -> prediction per example
    score: Callable[[np.ndarray, np.ndarray], float]  # (predictions, labels) -> metric

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def metric_key(self) -> str:
        return f"{self.name}/dev/{self.metric}"

    def path(self, root: Path, split: str) -> Path:
        return Path(root) / f"{self.file_prefix}-{split}.csv"

    def parse_label(self, raw: str | None) -> float:
        """Parses a label cell; raises ValueError when it is not a number (a malformed row)."""
        if raw is None or not raw.strip():
            raise ValueError("empty label")
        value = float(raw)
        if value != value:  # NaN
            raise ValueError("NaN label")
        return value

    def label_ok(self, value: float) -> bool:
        lo, hi = self.label_range
        return lo <= value <= hi and (not self.integer_labels or float(value).is_integer())

    def normalized(self, value: float) -> float:
        """Maps the task's metric to [0, 1] for the overall score: Pearson r -> (r + 1) / 2."""
        return (value + 1.0) / 2.0 if self.metric == "pearson" else value


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold)) if len(gold) else float("nan")


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    """Pearson r. Constant predictions have no defined r; they score 0 (no linear association)."""
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(gold) < 2 or pred.std() == 0 or gold.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, gold)[0, 1])


def overall_score(tasks: list[Task], scores: dict[str, float]) -> float:
    """The CS224N overall dev score: the mean of the tasks' metrics, each mapped to [0, 1]."""
    return float(np.mean([t.normalized(scores[t.metric_key]) for t in tasks]))
