"""Task heads on top of the encoder's sentence vectors, following the multi-task minBERT report's
three last-layer designs for sentence pairs:

- `concat`:   encode x1 and x2 separately, concatenate the two vectors, apply one affine map;
- `separate`: encode separately, project each vector with its own affine map (d=64), aggregate;
- `joint`:    encode `[CLS] x1 [SEP] x2 [SEP]` once, project its vector twice (W1, W2), aggregate.

SST always uses `ClassifierHead`. A head's `joint` attribute tells the batcher how to encode pairs.
"""
from __future__ import annotations

import torch
from torch import nn

from tasks.aggregators import make_aggregator


class ClassifierHead(nn.Module):
    joint = False

    def __init__(self, hidden_size: int, num_classes: int = 5, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(h))  # [B, H] -> [B, C]


class ConcatHead(nn.Module):
    joint = False

    def __init__(self, hidden_size: int, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden_size, 1)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        h = torch.cat([h1, h2], dim=-1)  # [B, 2H]
        return self.out(self.dropout(h)).squeeze(-1)  # [B]


class _ProjectAggregate(nn.Module):
    def __init__(self, hidden_size: int, proj_dim: int = 64, aggregator: str = "inner",
                 alpha: float = 1.0, beta: float = 2.5, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj1 = nn.Linear(hidden_size, proj_dim)  # W1
        self.proj2 = nn.Linear(hidden_size, proj_dim)  # W2
        self.aggregate = make_aggregator(aggregator, alpha, beta)


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
        return self.aggregate(p1, p2)  # [B]


class JointHead(_ProjectAggregate):
    joint = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.dropout(h)  # [B, H], the pair's joint vector
        return self.aggregate(self.proj1(h), self.proj2(h))  # [B]
