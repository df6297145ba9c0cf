"""Aggregators that turn two projected sentence vectors into a task's output, as in the multi-task
minBERT report's last-layer designs: an inner product (one logit, for a 2-class pair task such as
paraphrase), a scaled cosine `(cos + alpha) * beta` for a score (with alpha = 1 + lo/beta and
beta = (hi - lo)/2 it spans the task's label_range [lo, hi], STS-B's [0, 5] at alpha=1, beta=2.5;
Reimers & Gurevych, 2019, "Sentence-BERT", use the cosine of sentence embeddings for STS), and
Sentence-BERT's classification objective, a linear map of (u, v, |u - v|) to one logit per class,
for pair tasks with more than two classes (NLI)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError


class InnerProduct(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=-1)  # [B, d], [B, d] -> [B]


class ScaledCosine(nn.Module):
    def __init__(self, alpha: float = 1.0, beta: float = 2.5):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    @classmethod
    def spanning(cls, lo: float, hi: float) -> "ScaledCosine":
        """The scaled cosine whose range, cos in [-1, 1], is [lo, hi]."""
        beta = (hi - lo) / 2.0
        return cls(1.0 + lo / beta, beta)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (F.cosine_similarity(a, b, dim=-1, eps=1e-8) + self.alpha) * self.beta  # [B]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class SBertClassifier(nn.Module):
    """softmax(W [u; v; |u - v|]) (Reimers & Gurevych, 2019, §3): the logits of C classes."""

    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.out = nn.Linear(3 * dim, num_outputs)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([a, b, (a - b).abs()], dim=-1))  # [B, 3d] -> [B, C]


AGGREGATORS = ("inner", "cosine", "sbert")


def make_aggregator(name: str | None, num_outputs: int = 1, dim: int = 64,
                    alpha: float | None = None, beta: float | None = None,
                    label_range: tuple[float, float] | None = None) -> nn.Module:
    """Builds an aggregator by config name. `None`: the one for the output size, the inner
    product's logit for one output, Sentence-BERT's classifier for more. The cosine's alpha and
    beta come from `label_range` unless both are given."""
    if name is None:
        name = "inner" if num_outputs == 1 else "sbert"
    if name not in AGGREGATORS:
        raise ConfigError(f"unknown aggregator {name!r}; valid aggregators are {list(AGGREGATORS)}")
    if name == "sbert":
        return SBertClassifier(dim, num_outputs)
    if num_outputs != 1:
        raise ConfigError(f"aggregator={name} gives one output, but this task's head needs "
                          f"{num_outputs} (one logit per class); use aggregator: sbert")
    if name == "inner":
        return InnerProduct()
    if (alpha is None) != (beta is None):
        raise ConfigError(f"aggregator=cosine: alpha={alpha}, beta={beta}; give both, or neither "
                          "(then they span the task's label_range)")
    if alpha is not None:
        return ScaledCosine(alpha, beta)
    if label_range is None:
        raise ConfigError("aggregator=cosine needs a task with label_range (a regression task), "
                          "or explicit alpha and beta")
    return ScaledCosine.spanning(*label_range)
