"""What a task is, read from its config file `conf/task/<name>.yaml`: its kind (single sentence or
pair, classification or regression), its columns, labels and metrics, and where its data comes
from. From the kind follow its loss, its prediction rule and its head's output size; nothing in the
framework is written for a particular task (the CS224N tasks are files like any other).

- classification with 2 labels on a pair: one logit, BCE-with-logits (Quora paraphrase, as in the
  CS224N minBERT project); otherwise `num_labels` logits and cross-entropy (SST-5, CFIMDB, MNLI);
- regression: one score, MSE (STS-B), labels in `label_range`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks import metrics as M

KINDS = ("single_classification", "pair_classification", "single_regression", "pair_regression")
FORMATS = ("cs224n", "csv", "tsv", "json", "parquet", "hub")
SPLITS = ("train", "dev", "test")  # test is optional; dev is required


@dataclass(frozen=True)
class Task:
    name: str  # the config name, used in metric keys: sst, para, sts, cfimdb, ...
    kind: str  # one of KINDS
    text_columns: tuple[str, ...]  # one column (single_*) or two (pair_*)
    label_column: str
    metric: str  # the primary metric, in dev/overall
    extra_metrics: tuple[str, ...] = ()
    num_labels: int | None = None  # classification
    label_range: tuple[float, float] | None = None  # regression: inclusive
    id_column: str | None = None  # None: `id` if the data has one, else the row number
    label_names: tuple[str, ...] | None = None  # classification: what predict.py prints
    prediction_column: str = ""
    source: dict = field(default_factory=dict, compare=False)  # format, data_files | path, name
    head: dict = field(default_factory=dict, compare=False)  # this task's head settings
    file: str = ""  # the config file it came from, for error messages

    @property
    def is_pair(self) -> bool:
        return self.kind.startswith("pair_")

    @property
    def is_regression(self) -> bool:
        return self.kind.endswith("_regression")

    @property
    def num_outputs(self) -> int:
        """The head's outputs: 1 for a score or a 2-class pair's logit, else one per class."""
        if self.is_regression or (self.is_pair and self.num_labels == 2):
            return 1
        return self.num_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric, *[m for m in self.extra_metrics if m != self.metric])

    def metric_key(self, split: str = "dev", metric: str | None = None) -> str:
        return f"{self.name}/{split}/{M.key(metric or self.metric)}"

    @property
    def format(self) -> str:
        return self.source.get("format", "cs224n")

    def label_ok(self, value: float) -> bool:
        if self.is_regression:
            lo, hi = self.label_range
            return lo <= value <= hi
        return float(value).is_integer() and 0 <= value < self.num_labels

    def label_rule(self) -> str:
        if self.is_regression:
            return "a number in [{:g}, {:g}] (label_range)".format(*self.label_range)
        return f"an integer in [0, {self.num_labels - 1}] (num_labels: {self.num_labels})"

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.is_regression:
            return F.mse_loss(output, y.float())  # [B], [B]
        if self.num_outputs == 1:
            return F.binary_cross_entropy_with_logits(output, y.float())  # [B], [B]
        return F.cross_entropy(output, y.long())  # [B, C], [B]

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        if self.is_regression:
            return output  # [B]
        if self.num_outputs == 1:
            return (output > 0).long()  # sigmoid(logit) > 0.5
        return output.argmax(dim=-1)

    def score(self, pred: np.ndarray, gold: np.ndarray, split: str = "dev") -> dict[str, float]:
        """`task/split/metric` -> value for the primary metric and the extra ones."""
        return {self.metric_key(split, m): M.score(m, pred, gold) for m in self.metrics}

    def format_prediction(self, value) -> str:
        """A prediction as the task's labels are: a class id, or a score with its decimals."""
        return f"{float(value):.6f}" if self.is_regression else f"{int(value)}"

    def path(self, root: Path, split: str) -> Path | None:
        """The data file of a split (relative paths are under the data root), None if unlisted."""
        files = self.source.get("data_files") or {}
        if split not in files:
            return None
        path = Path(str(files[split])).expanduser()
        return path if path.is_absolute() else Path(root) / path


def overall_score(tasks: list[Task], scores: dict[str, float], split: str = "dev") -> float:
    """The overall score: the mean of the tasks' normalized primary metrics (tasks.metrics)."""
    return M.overall([(t.metric, scores[t.metric_key(split)]) for t in tasks])
