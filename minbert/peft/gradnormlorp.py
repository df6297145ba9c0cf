"""GradNormLoRP: Gradient Weight-Normalized Low-Rank Projection (Huang et al., AAAI 2025).

DoRA's weight normalisation, W = m · (W0 + sBA) / ||W0 + sBA||_c (`minbert.peft.dora`), trained
with the gradients of the LoRA factors A and B projected GaLore-style, D̃ = U η(Uᵀ D V) Vᵀ: the
Adam moments of A and B live in a rank-`proj_rank` space and the projectors are refreshed from the
SVD of the current gradient every `update_proj_gap` steps. `proj_type=full` projects both sides as
the paper's equations do (the default); `std` compresses one side as GaLore does. The magnitude m and
the task heads get plain AdamW. The optimizer is `minbert.optim.GaLoreAdamW`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minbert.peft import adapter_layers
from minbert.peft.contract import Capabilities, NoHooks
from minbert.peft.dora import Dora
from minbert.peft.galore import check_projection, split_groups


@dataclass
class GradNormLoRP(Dora, NoHooks):
    """`peft=gradnormlorp`: DoRA's options, plus the projection of the LoRA factors' gradients."""

    proj_rank: int | None = None  # None: the LoRA rank
    update_proj_gap: int = 250
    scale: float = 0.25
    proj_type: str = "full"
    name: ClassVar[str] = "gradnormlorp"
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True,  # a DoRA adapter
                                                        own_optimizer=True)  # GaLoreAdamW

    def __post_init__(self):
        super().__post_init__()
        if self.proj_rank is None:
            self.proj_rank = self.rank
        check_projection(self.proj_rank, self.update_proj_gap, self.proj_type, key="proj_rank")

    def projected(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in adapter_layers(model) for p in (layer.lora_A, layer.lora_B)]

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        tags = {"rank": self.proj_rank, "update_proj_gap": self.update_proj_gap,
                "scale": self.scale, "proj_type": self.proj_type}
        return split_groups(groups, self.projected(model), tags)
