"""Aggregators that turn two projected sentence vectors into one score, as in the multi-task
minBERT report's last-layer designs: an inner product (a logit, for paraphrase) and a scaled
cosine `(cos + alpha) * beta`, which with alpha=1, beta=2.5 spans STS-B's [0, 5] (Reimers &
Gurevych, 2019, "Sentence-BERT", use the cosine of sentence embeddings for STS)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minbert.errors import ConfigError


class InnerProduct(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=-1)  # [B, d], [B, d] -> [B]


class ScaledCosine(nn.Module):
    def __init__(self, alpha: float = 1.0, beta: float = 2.5):
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (F.cosine_similarity(a, b, dim=-1, eps=1e-8) + self.alpha) * self.beta  # [B]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


AGGREGATORS = {"inner": InnerProduct, "cosine": ScaledCosine}


def make_aggregator(name: str, alpha: float = 1.0, beta: float = 2.5) -> nn.Module:
    """Builds an aggregator by config name; an unknown name lists the valid ones."""
    if name == "cosine":
        return ScaledCosine(alpha, beta)
    if name in AGGREGATORS:
        return AGGREGATORS[name]()
    raise ConfigError(f"unknown aggregator {name!r}; valid aggregators are {sorted(AGGREGATORS)}")
