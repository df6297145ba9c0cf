"""What every weight-update adapter shares: choosing the Linear layers to adapt, and a Linear whose
frozen weight can take its update folded in (merge) and back out (unmerge).

An adapted layer keeps the base layer's `weight` and `bias` under their own names, so
`layers.0.attn.query.weight` stays the checkpoint's key whether or not the layer is adapted, and
methods only add tensors beside it (`lora_A`, `lora_B`, `magnitude`, ...). A method names those in
`adapter_names`; `minbert.peft.adapter_state_dict` reads them back for saving. The layout follows
peft's tuner layers (Mangrulkar et al., 2022), without the multi-adapter bookkeeping.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from minbert.errors import ConfigError

# `peft.targets` presets over minBERT's module names (`layers.{i}.attn.query`, `layers.{i}.ffn.up`).
TARGET_PRESETS = {
    "attn_qv": ("attn.query", "attn.value"),
    "attn_qkv": ("attn.query", "attn.key", "attn.value"),
    "all_linear": ("attn.query", "attn.key", "attn.value", "attn.out", "ffn.up", "ffn.down"),
}
BIAS_CHOICES = ("none", "all")


def resolve_targets(encoder: nn.Module, targets) -> list[str]:
    """The names of the Linear modules `targets` selects: a preset name, or a list of module names
    or name suffixes (`attn.query`, `ffn.up`, `layers.0.attn.value`), matched as peft matches them."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError(f"targets={targets!r} is not a preset; use one of "
                              f"{sorted(TARGET_PRESETS)} or a list of module names")
        targets = TARGET_PRESETS[targets]
    linear = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    chosen = []
    for t in targets:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"targets: {t!r} matches no Linear module of the encoder; names look "
                              f"like {', '.join(linear[:6])}, ... (suffixes such as attn.query work)")
        chosen += [n for n in hits if n not in chosen]
    return sorted(chosen, key=linear.index)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def adapt(encoder: nn.Module, targets, make_layer) -> list[str]:
    """Freezes the encoder and swaps each targeted Linear for `make_layer(linear)`."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    names = resolve_targets(encoder, targets)
    for name in names:
        replace_module(encoder, name, make_layer(encoder.get_submodule(name)))
    return names


def check_options(method) -> None:
    """Validates the options the adapter methods share (`rank`, `dropout`, `targets`, `bias`)
    before any model is built, and turns a Hydra list of targets into a plain list."""
    if not isinstance(method.rank, int) or method.rank < 1:
        raise ConfigError(f"rank={method.rank!r} must be a positive integer")
    if not 0 <= method.dropout < 1:
        raise ConfigError(f"dropout={method.dropout!r} must be in [0, 1)")
    if not isinstance(method.targets, str):
        method.targets = [str(t) for t in method.targets]
    if method.bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={method.bias!r}; use one of {list(BIAS_CHOICES)}")


def train_biases(model: nn.Module, bias: str) -> None:
    """peft's `bias="all"`: every parameter named `*bias` (Linear and LayerNorm) trains too."""
    if bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={bias!r}; use one of {list(BIAS_CHOICES)}")
    if bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)


class AdapterLinear(nn.Module, ABC):
    """A frozen Linear plus an update ΔW that a subclass defines by `delta_weight` (the update in
    weight space, [out, in]) and `adapter_forward` (the output of the unmerged layer).

    `merge` folds ΔW into `weight` and keeps the frozen W0 aside, so that `unmerge` restores it
    bit for bit (no drift from repeated merge-for-eval cycles). A merged layer is a plain Linear."""

    adapter_names: tuple[str, ...] = ()
    # The adapter tensors ΔW is made of (None: all of `adapter_names`). A merge of experts forms ΔW
    # from these, and merges any other tensor of the layer as a task vector (`trainers.experts`).
    delta_names: tuple[str, ...] | None = None

    def __init__(self, base: nn.Linear, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in], frozen
        self.bias = base.bias  # [out], frozen unless the method's `bias=all` trains it
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._unmerged_weight: torch.Tensor | None = None
        self.train(base.training)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW, [out, in]: the update this layer adds to its frozen weight."""

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unmerged layer's output, [N, out] for x [N, in]."""

    @torch.no_grad()
    def merge(self, delta: torch.Tensor | None = None) -> None:
        """Folds ΔW in: this layer's own, or a given [out, in] `delta` (a merge of experts)."""
        if self.merged:
            return
        merged = self.weight + (self.delta_weight() if delta is None else delta.to(self.weight))
        self._unmerged_weight, self.weight.data = self.weight.data, merged

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.data, self._unmerged_weight = self._unmerged_weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("this adapter layer is merged; unmerge it before training")
            return F.linear(x, self.weight, self.bias)
        return self.adapter_forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"merged={self.merged}")


def low_rank_update(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · h Bᵀ, fused into one addmm for the packed [N, r] activations minBERT uses."""
    if y.dim() == 2:
        return torch.addmm(y, h, B.t(), alpha=s)
    return y + s * F.linear(h, B)
