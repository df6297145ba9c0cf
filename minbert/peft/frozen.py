"""The frozen encoder (`peft=frozen`): no encoder parameter trains, only the task heads on the
pretrained features (with `heads=joint`, a probe of the pooled [CLS] of each input, as in the
feature-based baselines of Devlin et al., 2019, Section 5.3, and Peters et al., 2019, "To Tune or
Not to Tune?"). It is the floor a PEFT method has to beat: what the heads learn without adapting
the encoder at all (`experiment=zoo`'s heads-only row)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minbert.peft.contract import Capabilities


@dataclass
class FrozenEncoder:
    lr: float | None = None  # the heads' learning rate; the optimizer reads ${peft.lr}
    name: ClassVar[str] = "frozen"
    capabilities: ClassVar[Capabilities] = Capabilities()  # mergeable: its update is zero
    merge_eval: ClassVar[bool] = False  # no adapter layers to merge

    def apply(self, encoder: nn.Module) -> nn.Module:
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder
