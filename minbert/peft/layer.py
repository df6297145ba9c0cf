"""What every weight-update adapter shares: its common options (`AdapterConfig`), choosing the
Linear layers to adapt, and an adapter around a Linear whose update can be folded into its weights
(merge) and back out (unmerge).

An adapted layer wraps its base layer (`base_layer`, as peft's tuner layers do; Mangrulkar et
al., 2022) and calls it once in its forward, so a method never re-implements the base Linear and
a quantized base drops in. Methods add tensors beside it (`lora_A`, `lora_B`, `magnitude`, ...)
and name them in `adapter_tensors`, which `adapter_params()` returns (the `AdapterModule`
capability of `minbert.peft`); `delta()`, `merge()` and `unmerge()` are the `Mergeable` one.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

log = logging.getLogger(__name__)

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


@dataclass
class AdapterConfig:
    """The options the adapter methods share, validated when the method is built (before any
    model is): `dropout` (on the adapter's input), `targets` (a preset or a list of module names;
    a Hydra list becomes a plain one), `bias` (`none`, or `all`: every bias trains too), `lr` (the
    method's learning rate, which the trainer's optimizer reads as `${peft.lr}`) and `merge_eval`
    (score dev and test on merged weights). A subclass adds its own rank options and names them in
    `rank_options`, each checked to be a positive integer."""

    dropout: float = 0.0
    targets: object = "attn_qkv"
    bias: str = "none"
    lr: float | None = None
    merge_eval: bool = True
    rank_options: ClassVar[tuple[str, ...]] = ("rank",)

    def __post_init__(self):
        for key in self.rank_options:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.targets, str):
            self.targets = [str(t) for t in self.targets]
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r}; use one of {list(BIAS_CHOICES)}")


def train_biases(model: nn.Module, bias: str) -> None:
    """peft's `bias="all"`: every parameter named `*bias` (Linear and LayerNorm) trains too."""
    if bias not in BIAS_CHOICES:
        raise ConfigError(f"bias={bias!r}; use one of {list(BIAS_CHOICES)}")
    if bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)


class AdapterLinear(nn.Module, ABC):
    """A frozen base Linear plus an update (ΔW, Δb) that a subclass defines by `delta_weight` (the
    update in weight space, [out, in]), optionally `delta_bias` ([out]), and `adapter_forward`
    (the unmerged output, which calls `self.base_layer` once).

    `merge` folds the update into the base layer's weight (and bias) and keeps the frozen values
    aside, so that `unmerge` restores them bit for bit (no drift from repeated merge-for-eval
    cycles). A merged layer is its base layer."""

    adapter_tensors: tuple[str, ...] = ()  # the tensors the method adds (trained or drawn)
    # The adapter tensors ΔW is made of (None: all of `adapter_tensors`). A merge of experts forms
    # ΔW from these, and merges any other tensor of the layer as a task vector (`trainers.strategies.experts`).
    delta_names: tuple[str, ...] | None = None

    def __init__(self, base: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._quantized: nn.Module | None = None  # a quantized base, aside while merged
        self.train(base.training)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # [out, in], frozen

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias  # [out], frozen unless the method's `bias=all` trains it

    def adapter_params(self) -> tuple[str, ...]:
        return self.adapter_tensors

    @property
    def merged(self) -> bool:
        return self._unmerged is not None

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW, [out, in]: the update this layer adds to its frozen weight."""

    def delta_bias(self) -> torch.Tensor | None:
        """Δb, [out], for methods whose update reaches the bias ((IA)³ on keys and values)."""
        return None

    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.delta_weight(), self.delta_bias()

    @abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unmerged layer's output, [N, out] for x [N, in]."""

    @torch.no_grad()
    def merge(self, delta_weight: torch.Tensor | None = None,
              delta_bias: torch.Tensor | None = None) -> None:
        """Folds the update in: this layer's own, or a given [out, in] ΔW (and [out] Δb), as a
        merge of experts gives."""
        if self.merged:
            return
        own = delta_weight is None and delta_bias is None
        dw, db = self.delta() if own else (delta_weight, delta_bias)
        if hasattr(self.base_layer, "dequantized"):  # a quantized base cannot hold W0 + ΔW
            log.info("merging into the dequantized weights of a quantized layer (held in fp32 "
                     "while merged; unmerge puts the quantized layer back)")
            self._quantized, self.base_layer = self.base_layer, self.base_layer.dequantized()
        weight, bias = self.weight, self.bias
        self._unmerged = (weight.data, bias.data if db is not None else None)
        if dw is not None:
            weight.data = weight + dw.to(weight)
        if db is not None:
            bias.data = bias + db.to(bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.data, bias = self._unmerged
            if bias is not None:
                self.bias.data = bias
            self._unmerged = None
            if self._quantized is not None:
                self.base_layer, self._quantized = self._quantized, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("this adapter layer is merged; unmerge it before training")
            return self.base_layer(x)
        return self.adapter_forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"merged={self.merged}")


def low_rank_update(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """y + s · h Bᵀ, fused into one addmm for the packed [N, r] activations minBERT uses."""
    if y.dim() == 2:
        return torch.addmm(y, h, B.t(), alpha=s)
    return y + s * F.linear(h, B)
