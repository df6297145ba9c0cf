"""Bottleneck adapters: small MLPs inserted into every transformer layer, with the rest frozen.

- `peft=houlsby` (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP"): an
  adapter after the attention output and after the FFN output, each inside the sublayer's residual:
  out = LN(h + A(h) + r), with h the sublayer's output (after its dropout), r its input and
  A(z) = up(act(down(z))).
- `peft=pfeiffer` (Pfeiffer et al., 2021, "AdapterFusion"): one adapter after the FFN only, fed
  the sublayer's normalised output: out = LN(h + A(LN(h + r)) + r).

These are the `adapters` library's DoubleSeqBnConfig and SeqBnConfig (1.3.0): the forms above equal
its output exactly (checked by hand once, see tests/test_peft_oracle.py). The bottleneck width is
hidden_size // reduction_factor. Initialisation: `houlsby`, the paper's near-identity init (both
projections from a normal with std 1e-2 truncated at ±2e-2, zero biases: A(z) ≈ 0), or `bert`
(BERT's N(0, 0.02), zero biases; the `adapters` library's default). `train_layer_norm` also trains
the layer norms of the adapted sublayers, as Houlsby et al. do. An adapter is a non-linear function
of the hidden states, so there is no weight update to merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities

ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU,
               "tanh": nn.Tanh}
INITS = ("houlsby", "bert")


class Bottleneck(nn.Module):
    """A(z) = up(act(down(z))), [N, H] -> [N, H // reduction_factor] -> [N, H]."""

    def __init__(self, hidden: int, reduction_factor: int, non_linearity: str, init: str):
        super().__init__()
        self.down = nn.Linear(hidden, hidden // reduction_factor)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(hidden // reduction_factor, hidden)
        for linear in (self.down, self.up):
            if init == "houlsby":
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            else:
                nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(z)))


class HoulsbyResidual(nn.Module):
    """norm(h + A(h) + r): the adapter's output joins the sublayer's, inside its residual. Wraps
    the layer's residual block (`minbert.model.Residual`) and calls it."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_block, self.adapter = base, adapter

    def adapter_params(self) -> tuple[str, ...]:
        return tuple(f"adapter.{n}" for n, _ in self.adapter.named_parameters())

    def forward(self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return self.base_block(h + self.adapter(h), r, norm)


class PfeifferResidual(HoulsbyResidual):
    """norm(h + A(norm(h + r)) + r): the adapter reads the sublayer's normalised output."""

    def forward(self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return self.base_block(h + self.adapter(self.base_block(h, r, norm)), r, norm)


@dataclass
class Houlsby:
    """`peft=houlsby`: adapters after the attention and the FFN outputs of every layer."""

    reduction_factor: int = 16
    non_linearity: str = "swish"
    init: str = "houlsby"
    train_layer_norm: bool = True
    lr: float | None = None
    name: ClassVar[str] = "houlsby"
    places: ClassVar[tuple[str, ...]] = ("attn", "ffn")
    residual: ClassVar[type] = HoulsbyResidual
    capabilities: ClassVar[Capabilities] = Capabilities(
        not_mergeable="its bottleneck adapters are non-linear functions of the hidden states, "
                      "with no weight update to fold in", seam="residual")
    merge_eval: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor={self.reduction_factor!r} must be a positive "
                              "integer")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity={self.non_linearity!r}; use one of "
                              f"{sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}; use one of {list(INITS)}")

    def apply(self, encoder: nn.Module) -> nn.Module:
        hidden = encoder.config.hidden_size
        if hidden // self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor={self.reduction_factor} leaves no bottleneck "
                              f"for hidden size {hidden}")
        for p in encoder.parameters():
            p.requires_grad_(False)
        for layer in encoder.layers:
            for place in self.places:
                adapter = Bottleneck(hidden, self.reduction_factor, self.non_linearity,
                                     self.init).to(layer.attn_norm.weight)
                setattr(layer, f"{place}_out", self.residual(getattr(layer, f"{place}_out"),
                                                             adapter))
                if self.train_layer_norm:
                    getattr(layer, f"{place}_norm").requires_grad_(True)
        return encoder


@dataclass
class Pfeiffer(Houlsby):
    """`peft=pfeiffer`: one adapter after the FFN output of every layer."""

    non_linearity: str = "relu"
    init: str = "bert"
    train_layer_norm: bool = False
    name: ClassVar[str] = "pfeiffer"
    capabilities: ClassVar[Capabilities] = Houlsby.capabilities
    places: ClassVar[tuple[str, ...]] = ("ffn",)
    residual: ClassVar[type] = PfeifferResidual

