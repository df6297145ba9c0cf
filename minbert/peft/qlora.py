"""QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") on the CPU as
well as the GPU: the frozen base weights of the targeted layers are stored as 4-bit NormalFloat
(NF4), with the block constants quantized again, and LoRA trains on top.

- NF4: 16 values, the quantiles of N(0, 1) built as the paper (and bitsandbytes) builds them,
  asymmetric around an exact zero and scaled to [-1, 1] (`nf4_code`).
- A weight is cut into blocks of 64 (row-major); each keeps its absmax, and each element the index
  of the code value nearest to element / absmax (ties: the lower index), two per byte, the first in
  the high nibble, exactly as bitsandbytes' `quantize_4bit` packs them.
- Double quantisation: the block absmaxes minus their mean (the offset) are quantized block-wise to
  8 bits in blocks of 256 with the dynamic signed map (`minbert.optim.quant`), so a weight costs
  4 + 8/64 + 32/(64·256) ≈ 4.127 bits.
- `Linear4bit` dequantizes for the forward (fp32 compute) and is the base layer a `LoraLinear`
  wraps and calls; merging folds ΔW into the dequantized weights, held in fp32 while merged, and
  logs that it does.

Checked against bitsandbytes' CPU functions in tests/test_qlora.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minbert.optim.quant import QuantizedTensor, dynamic_map
from minbert.peft import adapter_layers
from minbert.peft.contract import Capabilities
from minbert.peft.lora import Lora

BLOCK, BLOCK2 = 64, 256


@functools.lru_cache(maxsize=None)
def nf4_code() -> torch.Tensor:
    """[16] fp32, sorted: NormalFloat4. 8 positive quantiles of N(0, 1) from [δ, 1/2] and 7
    negative ones, plus zero, normalised by the largest (δ = 0.9677083, the paper's offset)."""
    from scipy.stats import norm

    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1])).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return values / values.max()


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes [ceil(n / 2)] uint8, absmax [n_blocks] fp32) of a tensor's NF4 quantization
    in blocks of 64. A last, partial block is scaled by division by its (nonzero) absmax, the
    others by multiplication with the reciprocal, as bitsandbytes rounds them."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % BLOCK
    blocks = flat[:full].view(-1, BLOCK)  # [n_blocks, 64]
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1)
    if full < n:
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    code = nf4_code().to(w.device)
    scaled = F.pad(scaled, (0, n % 2))  # an odd count: a zero pads the last byte (code 7)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (q[::2] << 4) | q[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """The fp32 tensor of `shape` from its packed NF4 codes and fp32 block absmaxes."""
    n = torch.Size(shape).numel()
    q = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n].long()
    values = nf4_code().to(packed.device)[q]
    blocks = F.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * absmax.unsqueeze(1)
    return blocks.reshape(-1)[:n].view(shape)


class Linear4bit(nn.Module):
    """A frozen Linear whose weight is stored in NF4 with double-quantized block constants:
    `packed` [out·in / 2] uint8, `absmax_codes` [n_blocks] uint8 (dynamic signed map, blocks of
    256, with `absmax_scale` [n_blocks / 256] fp32 and `absmax_offset` [] fp32). `weight` is the
    dequantized fp32 tensor; the bias stays fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.frozen_numel = self.in_features * self.out_features  # the weights it stands for
        packed, absmax = quantize_nf4(linear.weight)
        offset = absmax.mean()
        q = QuantizedTensor.quantize(absmax - offset, "dynamic", BLOCK2, signed=True)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax_codes", q.codes.reshape(-1)[:absmax.numel()].clone())
        self.register_buffer("absmax_scale", q.absmax.clone())
        self.register_buffer("absmax_offset", offset.reshape(()))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def absmax(self) -> torch.Tensor:
        """The block absmaxes, dequantized: code[q] · scale[block of 256] + offset, [n_blocks]."""
        values = dynamic_map(True, self.packed.device)[self.absmax_codes.long()]
        scale = self.absmax_scale.repeat_interleave(BLOCK2)[:values.numel()]
        return values * scale + self.absmax_offset

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.absmax(), (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dequantized(self) -> nn.Linear:
        """A plain fp32 Linear with the dequantized weight (for merging)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device)
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


@dataclass
class QLora(Lora):
    """`peft=qlora`: LoRA's options; the targeted base weights stored in NF4."""

    name: ClassVar[str] = "qlora"
    # exported as the LoRA it trains, for a base loaded in 4 bits (bitsandbytes quantizes as we do)
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True)

    def apply(self, encoder: nn.Module) -> nn.Module:
        super().apply(encoder)
        for _, layer in adapter_layers(encoder):  # the base drops in under the LoRA layer
            layer.base_layer = Linear4bit(layer.base_layer)
        return encoder
