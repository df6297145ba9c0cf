"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").

Three learned vectors per layer, initialised to ones, rescale the attention keys and values and the
FFN's intermediate activation (the input of its down projection), the paper's placement:

    k = l_k ⊙ (W_k x + b_k),   v = l_v ⊙ (W_v x + b_v),   y = W_down (l_ff ⊙ a) + b_down

A key or value vector scales the layer's output, bias included; the FFN vector scales the input. Both
fold into the base weights exactly: W_k' = diag(l_k) W_k and b_k' = l_k ⊙ b_k; W_down' = W_down
diag(l_ff). peft's BERT defaults also scale the attention output; pass explicit `target_modules`
and `feedforward_modules` to compare it with this placement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities
from minbert.peft.layer import AdapterLinear, adapt, resolve_targets


class IA3Linear(AdapterLinear):
    """y = l ⊙ base(x) (scales the output, bias included), or y = base(l ⊙ x) (`on_input`)."""

    adapter_tensors = ("ia3_l",)

    def __init__(self, base: nn.Module, on_input: bool):
        super().__init__(base)
        self.on_input = on_input
        size = self.in_features if on_input else self.out_features
        self.ia3_l = nn.Parameter(self.weight.new_ones(size))  # [in] or [out]: identity at init

    def delta_weight(self) -> torch.Tensor:
        scale = self.ia3_l - 1
        return self.weight * (scale.unsqueeze(0) if self.on_input else scale.unsqueeze(1))

    def delta_bias(self) -> torch.Tensor | None:
        if self.on_input or self.bias is None:
            return None
        return self.bias * (self.ia3_l - 1)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return self.base_layer(x * self.ia3_l)  # [N, in] -> [N, out]
        return self.base_layer(x) * self.ia3_l

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scales={'input' if self.on_input else 'output'}"


@dataclass
class IA3:
    """`peft=ia3`: `targets` are the Linear layers given a vector (default: keys, values and the
    FFN's down projection); those also in `feedforward` scale their input, the rest their output."""

    targets: object = ("attn.key", "attn.value", "ffn.down")
    feedforward: object = ("ffn.down",)
    lr: float | None = None
    merge_eval: bool = True
    name: ClassVar[str] = "ia3"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __post_init__(self):
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        self.feedforward = [str(t) for t in self.feedforward]
        unknown = [f for f in self.feedforward if f not in self.targets]
        if unknown:
            raise ConfigError(f"feedforward={unknown} must also be in targets={self.targets}")

    def apply(self, encoder: nn.Module) -> nn.Module:
        on_input = {id(encoder.get_submodule(n)) for n in resolve_targets(encoder, self.feedforward)}
        adapt(encoder, self.targets, lambda linear: IA3Linear(linear, id(linear) in on_input))
        return encoder
