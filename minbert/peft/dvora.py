"""DVoRA (Liu et al., 2024, the DoRA paper's "DVoRA"): DoRA's weight decomposition over VeRA's
update. The direction is W0 plus VeRA's ΔV = Λ_b B Λ_d A (shared frozen random A, B; trained
vectors b, d), the magnitude m is trained per output row:

    W = m · (W0 + ΔV) / ‖W0 + ΔV‖_c,

the norm per output row, detached in backward as in DoRA, m initialised to ‖W0‖_c so the model is
unchanged at init. Trains λ_b, λ_d and m. Built from our VeRA layer (checked against peft) and
DoRA's formula (checked against peft's DoRA); mergeable exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minbert.peft.contract import Capabilities
from minbert.peft.vera import Vera, VeraLinear, VeraProjections


class DvoraLinear(VeraLinear):
    adapter_tensors = ("lambda_b", "lambda_d", "magnitude")

    def __init__(self, base: nn.Module, projections: VeraProjections, dropout: float,
                 d_initial: float):
        super().__init__(base, projections, dropout, d_initial)
        self.magnitude = nn.Parameter(self.weight_norm())  # [out] = ||W0||_c (b = 0)

    def vera_delta(self) -> torch.Tensor:
        return super().delta_weight()  # Λ_b B Λ_d A, [out, in]

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + ΔV||_c per output row, [out]; a constant for autograd."""
        return torch.linalg.vector_norm(self.weight + self.vera_delta(), dim=1)

    def delta_weight(self) -> torch.Tensor:
        scale = (self.magnitude / self.weight_norm()).unsqueeze(1)  # [out, 1]
        return (scale - 1) * self.weight + scale * self.vera_delta()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm()  # [out]
        y = self.base_layer(x)  # x W0ᵀ + b
        if self.training and not isinstance(self.dropout, nn.Identity):
            dx = self.dropout(x)  # one mask for both terms, as DoRA
            return y + (scale - 1) * F.linear(dx, self.weight) + scale * self._vera(dx)
        if self.bias is not None:
            y = y - self.bias
        y = (y + self._vera(x)) * scale  # x (W0 + ΔV)ᵀ · m / ||W0 + ΔV||
        return y if self.bias is None else y + self.bias

    def _vera(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self._A_B()
        return F.linear(F.linear(x, A) * self.lambda_d, B) * self.lambda_b  # [N, out]


@dataclass
class Dvora(Vera):
    """`peft=dvora`: VeRA's options; each adapted layer weight-decomposed as DoRA does."""

    name: ClassVar[str] = "dvora"
    capabilities: ClassVar[Capabilities] = Capabilities()
    layer: ClassVar[type] = DvoraLinear
