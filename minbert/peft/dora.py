"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024).

The weight is split into a magnitude and a direction, and LoRA adapts the direction:

    W = m · (W0 + s B A) / ||W0 + s B A||_c

with the norm taken per output row of the [out, in] weight (over the input dimension), as peft
does, and `m` initialised to ||W0||_c so the model is unchanged at init. As the paper's section 4.3
suggests, the norm is treated as a constant in backward (detached). With dropout active in
training, the dropped input feeds both the rescaled base term and the LoRA term, exactly as the
authors' code and peft do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minbert.peft.contract import Capabilities
from minbert.peft.layer import AdapterLinear, low_rank_update
from minbert.peft.lora import Lora, LoraLinear


class DoraLinear(LoraLinear):
    adapter_tensors = ("lora_A", "lora_B", "magnitude")

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__(base, rank, scaling, dropout)
        self.magnitude = nn.Parameter(self.weight_norm())  # [out] = ||W0||_c (B = 0)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A||_c per output row, [out]; a constant for autograd."""
        V = torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scaling)  # [out, in]
        return torch.linalg.vector_norm(V, dim=1)

    def lora_delta(self) -> torch.Tensor:
        return super().delta_weight()  # s B A, [out, in]

    def delta_weight(self) -> torch.Tensor:
        """The merged weight minus W0: (m/||V|| - 1) W0 + m/||V|| · s B A."""
        scale = (self.magnitude / self.weight_norm()).unsqueeze(1)  # [out, 1]
        return (scale - 1) * self.weight + scale * self.lora_delta()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()  # [out]
        y = self.base_layer(x)  # x W0ᵀ + b, [N, out]: the one call of the base layer
        if self.training and not isinstance(self.dropout, nn.Identity):
            dx = self.dropout(x)  # one mask for both terms, as in the paper's code
            lora = F.linear(F.linear(dx, self.lora_A), self.lora_B)  # [N, out]
            return y + (scale - 1) * F.linear(dx, self.weight) + scale * self.scaling * lora
        if self.bias is not None:
            y = y - self.bias  # x W0ᵀ
        y = low_rank_update(y, F.linear(x, self.lora_A), self.lora_B,
                            self.scaling)  # x (W0 + s B A)ᵀ, [N, out]
        return y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)


@dataclass
class Dora(Lora):
    """`peft=dora`: LoRA's options, with each adapted layer weight-decomposed."""

    name: ClassVar[str] = "dora"
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True)

    def make_layer(self, linear: nn.Linear) -> AdapterLinear:
        return DoraLinear(linear, self.rank, self.scaling, self.dropout)
