"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning"): a parallel and a sequential low-rank branch on each targeted Linear,

    h = W0 x + b0 + A_up A_down x + B_up B_down (W0 x + b0),

the parallel branch (rank `r_parallel`) a LoRA of the input, the sequential one (rank
`r_sequential`) a LoRA of the base layer's output. The down projections are kaiming-initialised and
the up projections zero, so the model is unchanged at init. Both fold into the base weights
exactly: W' = W0 + A_up A_down + B_up B_down W0, b' = b0 + B_up B_down b0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minbert.peft.contract import Capabilities
from minbert.peft.layer import AdapterConfig, AdapterLinear, adapt, train_biases


class HydraLinear(AdapterLinear):
    """y = base(x) + A_up A_down drop(x) + B_up B_down base(x)."""

    adapter_tensors = ("a_down", "a_up", "b_down", "b_up")

    def __init__(self, base: nn.Module, r_parallel: int, r_sequential: int, dropout: float = 0.0):
        super().__init__(base, dropout)
        w = self.weight
        self.a_down = nn.Parameter(w.new_empty(r_parallel, self.in_features))  # [rp, in]
        self.a_up = nn.Parameter(w.new_zeros(self.out_features, r_parallel))  # [out, rp]
        self.b_down = nn.Parameter(w.new_empty(r_sequential, self.out_features))  # [rs, out]
        self.b_up = nn.Parameter(w.new_zeros(self.out_features, r_sequential))  # [out, rs]
        for down in (self.a_down, self.b_down):
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear and LoRA's A

    def delta_weight(self) -> torch.Tensor:
        return self.a_up @ self.a_down + self.b_up @ (self.b_down @ self.weight)  # [out, in]

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.b_up @ (self.b_down @ self.bias)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # W0 x + b0, [N, out]
        parallel = F.linear(F.linear(self.dropout(x), self.a_down), self.a_up)
        return y + parallel + F.linear(F.linear(y, self.b_down), self.b_up)


@dataclass
class Hydra(AdapterConfig):
    """`peft=hydra`: a parallel (rank r_parallel) and a sequential (r_sequential) branch; the
    options every adapter method has (`AdapterConfig`)."""

    r_parallel: int = 8
    r_sequential: int = 8
    name: ClassVar[str] = "hydra"
    capabilities: ClassVar[Capabilities] = Capabilities()
    rank_options: ClassVar[tuple[str, ...]] = ("r_parallel", "r_sequential")

    def apply(self, encoder: nn.Module) -> nn.Module:
        adapt(encoder, self.targets, lambda linear: HydraLinear(
            linear, self.r_parallel, self.r_sequential, self.dropout))
        train_biases(encoder, self.bias)
        return encoder
