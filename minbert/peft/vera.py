"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024).

One pair of frozen random matrices A: [r, in_max] and B: [out_max, r] is shared by every adapted
layer (each slices the top-left block it needs); each layer trains only two scaling vectors:

    W = W0 + Λ_b B Λ_d A,    Λ_b = diag(b), b: [out] zeros;  Λ_d = diag(d), d: [r] = d_initial

so the model is unchanged at init. A and B are kaiming-uniform from a seeded generator exactly as
peft draws them (`projection_prng_key`), and they are saved with the adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minbert.peft.contract import Capabilities
from minbert.peft.layer import AdapterConfig, AdapterLinear, adapt, resolve_targets, train_biases


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's VeRA init: U(-b, b) with b = √3 · √2 / √fan_in."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen pair, registered once on the encoder (`encoder.vera`)."""

    used_by_layers = True  # only the VeraLinears read it: merged into them, it can go

    def adapter_params(self) -> tuple[str, ...]:
        return ("vera_A", "vera_B")  # frozen, but drawn at random: saved with the adapter

    def __init__(self, rank: int, in_max: int, out_max: int, seed: int):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((rank, in_max), g))  # drawn first, as peft
        self.register_buffer("vera_B", kaiming_uniform((out_max, rank), g))


class VeraLinear(AdapterLinear):
    """y = x W0ᵀ + b + λ_b ⊙ ((λ_d ⊙ drop(x) Aᵀ) Bᵀ)."""

    adapter_tensors = ("lambda_b", "lambda_d")

    def __init__(self, base: nn.Module, projections: VeraProjections, dropout: float,
                 d_initial: float):
        super().__init__(base, dropout)
        self.__dict__["projections"] = projections  # shared, so not registered as a child
        rank = projections.vera_A.shape[0]
        self.lambda_b = nn.Parameter(self.weight.new_zeros(self.out_features))
        self.lambda_d = nn.Parameter(self.weight.new_full((rank,), d_initial))

    def _A_B(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.projections
        return p.vera_A[:, :self.in_features], p.vera_B[:self.out_features]  # [r, in], [out, r]

    def delta_weight(self) -> torch.Tensor:
        A, B = self._A_B()
        return (self.lambda_b.unsqueeze(1) * B) @ (self.lambda_d.unsqueeze(1) * A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self._A_B()
        y = self.base_layer(x)  # [N, out]
        h = F.linear(self.dropout(x), A) * self.lambda_d  # [N, r]
        return torch.addcmul(y, F.linear(h, B), self.lambda_b)


@dataclass
class Vera(AdapterConfig):
    """`peft=vera`: shared random projections of rank `rank`, trained scaling vectors; the options
    every adapter method has (`AdapterConfig`)."""

    rank: int = 256
    d_initial: float = 0.1
    seed: int = 0  # peft's projection_prng_key
    name: ClassVar[str] = "vera"
    capabilities: ClassVar[Capabilities] = Capabilities()
    layer: ClassVar[type] = VeraLinear  # what each targeted Linear becomes (DVoRA: DvoraLinear)

    def apply(self, encoder: nn.Module) -> nn.Module:
        weights = [encoder.get_submodule(n).weight for n in resolve_targets(encoder, self.targets)]
        out_max, in_max = (max(w.shape[i] for w in weights) for i in (0, 1))
        encoder.vera = VeraProjections(self.rank, in_max, out_max, self.seed).to(weights[0])
        adapt(encoder, self.targets,
              lambda linear: self.layer(linear, encoder.vera, self.dropout, self.d_initial))
        train_biases(encoder, self.bias)
        return encoder
