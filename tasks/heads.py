"""Task heads on top of the encoder's sentence vectors, chosen by a task's kind, not its name,
following the multi-task minBERT report's three last-layer designs for sentence pairs:

- `concat`:   encode x1 and x2 separately, concatenate the two vectors, apply one affine map;
- `separate`: encode separately, project each vector with its own affine map (d=64), aggregate;
- `joint`:    encode `[CLS] x1 [SEP] x2 [SEP]` once, project its vector twice (W1, W2), aggregate.

A single-sentence task uses `ClassifierHead` (one logit per class, or one score). Every head
takes `num_outputs` (from the task: 1 for a score or a 2-class pair's logit, C for C classes) and
returns [B] for one output, [B, C] for more. A head's `joint` attribute tells the batcher how to
encode pairs. `conf/heads/<design>.yaml` holds each kind's defaults; a task file's `head:` keys
override them for that task.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tasks.aggregators import make_aggregator


def _squeeze(out: torch.Tensor) -> torch.Tensor:
    return out.squeeze(-1) if out.shape[-1] == 1 else out  # [B, 1] -> [B]; [B, C] stays


class ClassifierHead(nn.Module):
    joint = False

    def __init__(self, hidden_size: int, num_outputs: int = 5, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _squeeze(self.out(self.dropout(h)))  # [B, H] -> [B, C] (or [B])


class ConcatHead(nn.Module):
    joint = False

    def __init__(self, hidden_size: int, num_outputs: int = 1, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden_size, num_outputs)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        h = torch.cat([h1, h2], dim=-1)  # [B, 2H]
        return _squeeze(self.out(self.dropout(h)))  # [B] (or [B, C])


class _ProjectAggregate(nn.Module):
    def __init__(self, hidden_size: int, num_outputs: int = 1, proj_dim: int = 64,
                 aggregator: Literal["inner", "cosine", "sbert"] | None = None,
                 alpha: float | None = None,
                 beta: float | None = None, label_range: tuple[float, float] | None = None,
                 dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj1 = nn.Linear(hidden_size, proj_dim)  # W1
        self.proj2 = nn.Linear(hidden_size, proj_dim)  # W2
        self.aggregate = make_aggregator(aggregator, num_outputs, proj_dim, alpha, beta,
                                         label_range)


class SeparateHead(_ProjectAggregate):
    """W1 and W2 start equal (`same_init`), so that the aggregate begins as a similarity of the
    two sentence vectors, as in a siamese encoder; they are trained apart from there."""

    joint = False

    def __init__(self, hidden_size: int, same_init: bool = True, **kwargs):
        super().__init__(hidden_size, **kwargs)
        if same_init:
            self.proj2.load_state_dict(self.proj1.state_dict())

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        p1 = self.proj1(self.dropout(h1))  # [B, d]
        p2 = self.proj2(self.dropout(h2))  # [B, d]
        return self.aggregate(p1, p2)  # [B] (or [B, C])


class JointHead(_ProjectAggregate):
    joint = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.dropout(h)  # [B, H], the pair's joint vector
        return self.aggregate(self.proj1(h), self.proj2(h))  # [B] (or [B, C])
