"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., 2024).

Full-parameter training, in which the gradient of each targeted 2-D weight (by default every
attention and FFN Linear weight) is projected to rank r before Adam sees it, so Adam's moments live
in the low-rank space; the update is projected back and multiplied by `scale`, and the projector is
recomputed from the SVD of the current gradient every `update_proj_gap` steps. Every other parameter
(biases, LayerNorm, embeddings, pooler, task heads) gets plain AdamW. The optimizer is
`minbert.optim.GaLoreAdamW`, which reproduces galore-torch 1.0 number for number.

A method that needs the projecting optimizer declares `own_optimizer` (the trainer then builds
GaLoreAdamW, `trainers/engine/optim.py`), and its `param_groups` hook splits the trainer's groups and
tags the projected one with `rank`, `update_proj_gap`, `scale` and `proj_type`, which GaLoreAdamW
reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from common.errors import ConfigError
from minbert.optim.galore import PROJ_TYPES
from minbert.peft.contract import Capabilities, NoHooks
from minbert.peft.layer import resolve_targets


def check_projection(rank: int, update_proj_gap: int, proj_type: str, key: str = "rank") -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{key}={rank!r} must be a positive integer")
    if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ConfigError(f"update_proj_gap={update_proj_gap!r} must be a positive integer")
    if proj_type not in PROJ_TYPES:
        raise ConfigError(f"proj_type={proj_type!r}; use one of {list(PROJ_TYPES)}")


def split_groups(groups: list[dict], projected: list[nn.Parameter], tags: dict) -> list[dict]:
    """Moves `projected` out of their groups into new groups (one per source group, keeping its
    options such as lr) tagged with the projection options `tags`."""
    ids = {id(p) for p in projected}
    out = []
    for g in groups:
        mine = [p for p in g["params"] if id(p) in ids]
        rest = [p for p in g["params"] if id(p) not in ids]
        options = {k: v for k, v in g.items() if k != "params"}
        out += [{**options, "params": rest}] if rest else []
        out += [{**options, **tags, "params": mine}] if mine else []
    return out


@dataclass
class Galore(NoHooks):
    """`peft=galore`: every parameter trains; the targeted weights' gradients are projected."""

    rank: int = 8
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    targets: object = "all_linear"
    lr: float | None = None
    merge_eval: bool = False  # nothing to merge: the weights themselves train
    name: ClassVar[str] = "galore"
    capabilities: ClassVar[Capabilities] = Capabilities(own_optimizer=True)  # GaLoreAdamW

    def __post_init__(self):
        check_projection(self.rank, self.update_proj_gap, self.proj_type)
        if not isinstance(self.targets, str):
            self.targets = [str(t) for t in self.targets]

    def apply(self, encoder: nn.Module) -> nn.Module:
        resolve_targets(encoder, self.targets)  # fails early on a bad `targets`
        for p in encoder.parameters():
            p.requires_grad_(True)
        return encoder

    def projected(self, model: nn.Module) -> list[nn.Parameter]:
        encoder = getattr(model, "encoder", model)
        return [encoder.get_submodule(n).weight for n in resolve_targets(encoder, self.targets)]

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        tags = {"rank": self.rank, "update_proj_gap": self.update_proj_gap, "scale": self.scale,
                "proj_type": self.proj_type}
        return split_groups(groups, self.projected(model), tags)
