"""LoRA-FA: Memory-efficient Low-rank Adaptation (Zhang et al., 2023).

LoRA with the down-projection A frozen at its random initialisation and only B trained, so the
update W = W0 + s B A lives in the fixed row space of A and no activation gradient for A is kept.
Everything else (scaling, targets, bias, export to peft's LoRA format) is LoRA's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minbert.peft.contract import Capabilities
from minbert.peft.layer import AdapterLinear
from minbert.peft.lora import Lora, LoraLinear


@dataclass
class LoraFA(Lora):
    """`peft=lora_fa`: LoRA's options; A is frozen."""

    name: ClassVar[str] = "lora_fa"
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True)

    def make_layer(self, linear: nn.Linear) -> AdapterLinear:
        return LoraLinear(linear, self.rank, self.scaling, self.dropout, train_A=False)
