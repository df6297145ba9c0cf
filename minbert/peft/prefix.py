"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): every layer's attention gets `num_virtual_tokens` extra keys and values, learned,
that every real token attends to; the model itself stays frozen.

With `prefix_projection` (the paper's reparameterisation, which it found needed for stable
training), the prefix is an MLP of a smaller table, P' -> Linear -> tanh -> Linear -> [P, 2·L·H];
in evaluation the MLP's output is computed once and kept as plain tensors (`folded`), so inference
costs the same as without it. The keys and values are laid out as peft lays them out ([P, 2L, heads,
head_dim], layer i's keys at 2i, its values at 2i+1), so peft's tensors load unchanged.

Positions: the real tokens keep theirs, 0..T-1, since the prefix is keys and values, not tokens
(peft with transformers shifts them to P..P+T-1 instead; the oracle is `transformers.BertModel` given
the prefix as its key/value cache with explicit position ids). It enters through the encoder's
`kv_prefix` seam; a prefix is not a weight update, so there is nothing to merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities


class PrefixEncoder(nn.Module):
    """B -> [(keys, values)] per layer, each [B, heads, P, head_dim]."""

    def __init__(self, layers: int, heads: int, hidden: int, tokens: int, projection: bool,
                 projection_hidden: int):
        super().__init__()
        self.layers, self.heads, self.hidden, self.tokens = layers, heads, hidden, tokens
        width = 2 * layers * hidden
        if projection:
            self.embedding = nn.Parameter(torch.randn(tokens, hidden))  # as nn.Embedding, peft
            self.mlp = nn.Sequential(nn.Linear(hidden, projection_hidden), nn.Tanh(),
                                     nn.Linear(projection_hidden, width))
        else:
            self.prefix = nn.Parameter(torch.randn(tokens, width))
        self._folded: torch.Tensor | None = None

    def adapter_params(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.named_parameters())

    def table(self) -> torch.Tensor:
        """The prefix, [P, 2·L·H]: the MLP's output (kept once computed, out of training)."""
        if not hasattr(self, "mlp"):
            return self.prefix
        if self.training:
            return self.mlp(self.embedding)
        if self._folded is None:
            with torch.no_grad():
                self._folded = self.mlp(self.embedding)
        return self._folded

    def train(self, mode: bool = True) -> "PrefixEncoder":
        self._folded = None  # the MLP may change: fold it again when evaluating
        return super().train(mode)

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P, L, nh = self.tokens, self.layers, self.heads
        kv = self.table().view(P, 2 * L, nh, self.hidden // nh).permute(1, 2, 0, 3)  # [2L,nh,P,hd]
        shape = (batch_size, nh, P, self.hidden // nh)
        return [(kv[2 * i].expand(shape), kv[2 * i + 1].expand(shape)) for i in range(L)]


@dataclass
class Prefix:
    """`peft=prefix`: `num_virtual_tokens` keys and values in front of every layer's attention."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    projection_hidden: int = 512
    lr: float | None = None
    name: ClassVar[str] = "prefix"
    capabilities: ClassVar[Capabilities] = Capabilities(
        not_mergeable="its prefix is extra keys and values for attention, not a weight update",
        seam="kv_prefix")
    merge_eval: ClassVar[bool] = False

    def __post_init__(self):
        for key in ("num_virtual_tokens", "projection_hidden"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")

    def apply(self, encoder: nn.Module) -> nn.Module:
        for p in encoder.parameters():
            p.requires_grad_(False)
        c = encoder.config
        encoder.kv_prefix = PrefixEncoder(c.num_hidden_layers, c.num_attention_heads,
                                          c.hidden_size, self.num_virtual_tokens,
                                          self.prefix_projection, self.projection_hidden
                                          ).to(encoder.pooler.dense.weight)
        return encoder
