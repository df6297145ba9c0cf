"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

Each targeted Linear keeps its pretrained weight W0 frozen and learns a low-rank update

    W = W0 + s · B A,    A: [r, in] kaiming-uniform,  B: [out, r] zeros,  s = alpha / r

so the model is unchanged at initialisation. rsLoRA (Kalajdzievski, 2023) scales by alpha / √r
instead. Initialisation, scaling and dropout (on the adapter's input only) follow peft's
`LoraConfig`, so an adapter exported by `minbert.peft.io.export_peft` loads into `peft` unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError, ConfigError
from minbert.checkpoint import minbert_to_hf_key
from minbert.peft import adapter_layers, adapter_state_dict
from minbert.peft.contract import Capabilities
from minbert.peft.io import peft_key
from minbert.peft.layer import AdapterConfig, AdapterLinear, adapt, low_rank_update, train_biases

# Our adapter tensors' leaf names -> peft's, in its saved LoRA (and DoRA) adapters.
PEFT_LEAVES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
               "magnitude": "lora_magnitude_vector"}


class LoraLinear(AdapterLinear):
    """y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ."""

    adapter_tensors = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0,
                 train_A: bool = True):
        super().__init__(base, dropout)
        w = self.weight
        self.scaling = scaling
        self.lora_A = nn.Parameter(w.new_empty(rank, self.in_features), requires_grad=train_A)
        self.lora_B = nn.Parameter(w.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # [out, r] @ [r, in] -> [out, in]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [N, in] -> [N, out]
        h = F.linear(self.dropout(x), self.lora_A)  # [N, in] -> [N, r]
        return low_rank_update(y, h, self.lora_B, self.scaling)


@dataclass
class Lora(AdapterConfig):
    """`peft=lora`: the method's config and `apply`: rank `rank`, scale alpha / rank (alpha / √rank
    with `rslora`), and the options every adapter method has (`AdapterConfig`: dropout, targets,
    bias, lr, merge_eval)."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    name: ClassVar[str] = "lora"
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True)

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be positive")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def make_layer(self, linear: nn.Linear) -> AdapterLinear:
        return LoraLinear(linear, self.rank, self.scaling, self.dropout)

    def apply(self, encoder: nn.Module) -> nn.Module:
        adapt(encoder, self.targets, self.make_layer)
        train_biases(encoder, self.bias)
        return encoder

    def peft_adapter(self, encoder: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """What `minbert.peft.io.export_peft` writes: peft's `LoraConfig` fields and the adapter's
        tensors (A, B, DoRA's magnitude, the biases under bias=all) under peft's names."""
        layers = dict(adapter_layers(encoder))
        if not layers or not all(isinstance(m, LoraLinear) for m in layers.values()):
            raise CheckpointError(f"peft={self.name}: the encoder has no LoRA layers to export")
        state = {peft_key(n, set(layers), PEFT_LEAVES): t
                 for n, t in adapter_state_dict(encoder).items()}
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": any("magnitude" in m.adapter_tensors for m in layers.values()),
            "bias": self.bias, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None,
            # exact module names, so that a suffix never catches a module we did not adapt
            "target_modules": sorted(minbert_to_hf_key(f"{n}.weight").removesuffix(".weight")
                                     for n in layers),
        }
        return config, state
