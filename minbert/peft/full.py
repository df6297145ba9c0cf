"""Full fine-tuning (`peft=none`): every encoder parameter is trained, as in BERT's original recipe
(Devlin et al., 2019). It is the baseline of the PEFT study's tables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minbert.peft.contract import Capabilities


@dataclass
class FullFinetune:
    lr: float | None = None  # the learning rate it trains at; the optimizer reads ${peft.lr}
    name: ClassVar[str] = "none"
    capabilities: ClassVar[Capabilities] = Capabilities()  # mergeable: its update is the weights'
    merge_eval: ClassVar[bool] = False  # no adapter layers to merge

    def apply(self, encoder: nn.Module) -> nn.Module:
        for p in encoder.parameters():
            p.requires_grad_(True)
        return encoder
