"""Block-wise 8-bit quantization of optimizer states.

Dettmers, Lewis, Shleifer and Zettlemoyer (2022), "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022, arXiv:2110.02861). A tensor is flattened, zero-padded to a multiple of `block_size` and
cut into blocks; each block keeps its absolute maximum a (fp32) and one byte per element for the
normalized value y = x / a in [-1, 1]. Two code books:

- 'absmax' (linear): signed, int8 code q = round(y * 127), x ~ q / 127 * a; the error is at most
  a / 127 / 2 (half a step), up to float rounding. Unsigned (for exp_avg_sq) it is zero-free, as in
  Li et al. (2023, "Memory Efficient Optimizers with 4-bit States"): uint8 q = clamp(round(256 y) - 1,
  0, 255) stands for (q + 1) / 256, so the error is at most a / 256 / 2 for y >= 1/256 and a / 256
  below, where small values round *up* to a / 256. With a zero code, every second moment below
  a / 254 of its block flushes to 0 and Adam divides the first moment by eps: AdamW with
  such linear states diverged even on logistic regression in our tests.
- 'dynamic': the dynamic (exponent + fraction) data type of the paper, the 256 values built as
  bitsandbytes' `create_dynamic_map`: for exponents e = 6, 5, ..., 0 the fraction range [0.1, 1] is
  cut into 2^(6-e) (signed; 2^(7-e) unsigned) equal bins whose midpoints, times 10^-e, are codes;
  the signed map mirrors them to negative values; 0 and 1 complete the set. The uint8 code is the
  index of the nearest value in the sorted map, so the error is at most half the gap between the two
  map values around y, times a (outside the map's range, [-1, min] for the signed map, the distance
  to the end value). The codes are dense near 0: the relative error grows from under 1% near a
  to tens of percent at 1e-4 a, but only values below ~1e-7 a flush to 0. bitsandbytes' 8-bit Adam
  uses the signed map for exp_avg and the unsigned one (twice as fine, no sign) for exp_avg_sq; so
  do we. Our search for the nearest code is exact; bitsandbytes 0.50's CPU kernel picks the other
  neighbour for a few percent of elements (never with a smaller error, in tests/test_quant.py).

Storage is codes (1 byte per padded element) plus one fp32 absmax per block: for block_size 256,
1 + 4/256 bytes per element against 4 for fp32, a 3.94x saving.
"""
from __future__ import annotations

import functools
import math

import torch

SCHEMES = ("dynamic", "absmax")


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values = [0.0, 1.0]
    for i in range(7):                  # exponent 10^(i - 6): 1e-6 ... 1e0
        bins = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, bins + 1)
        means = ((edges[:-1] + edges[1:]) / 2.0) * 10.0 ** (i - 6)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted values [256] of the dynamic quantization map, in [-1, 1] (signed) or [0, 1]."""
    return _dynamic_map_cpu(bool(signed)).to(device)


def _nearest_code(y: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """uint8 index of the value in sorted `code_map` [256] nearest to each element of y."""
    hi = torch.searchsorted(code_map, y).clamp_(1, code_map.numel() - 1)  # code_map[hi-1] < y <= code_map[hi]
    lo = hi - 1
    take_lo = (y - code_map[lo]) <= (code_map[hi] - y)
    return torch.where(take_lo, lo, hi).to(torch.uint8)


class QuantizedTensor:
    """A float tensor stored block-wise in 8 bits. Attributes:
    codes  [n_blocks, block_size]  int8 ('absmax', signed), uint8 ('absmax' unsigned: (q + 1) / 256)
                                   or uint8 indices into the sorted map ('dynamic')
    absmax [n_blocks]              fp32 per-block absolute maximum
    shape, block_size, scheme, signed (whether negative values are representable)."""

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                 block_size: int, scheme: str, signed: bool):
        self.codes, self.absmax = codes, absmax
        self.shape, self.block_size, self.scheme, self.signed = torch.Size(shape), block_size, scheme, signed

    @classmethod
    def quantize(cls, t: torch.Tensor, scheme: str = "dynamic", block_size: int = 256,
                 signed: bool = True) -> "QuantizedTensor":
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        flat = t.detach().reshape(-1).float()
        if not signed and bool((flat < 0).any()):
            raise ValueError("unsigned quantization cannot hold negative values; use signed=True")
        n_blocks = max(1, math.ceil(flat.numel() / block_size))
        blocks = torch.nn.functional.pad(flat, (0, n_blocks * block_size - flat.numel()))
        blocks = blocks.view(n_blocks, block_size)                   # [n_blocks, block_size]
        absmax = blocks.abs().amax(dim=1)                            # [n_blocks]
        y = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)  # in [-1, 1]
        if scheme == "absmax" and signed:
            codes = torch.round(y * 127.0).to(torch.int8)
        elif scheme == "absmax":  # zero-free: code q stands for (q + 1) / 256
            codes = (torch.round(y * 256.0) - 1.0).clamp_(0, 255).to(torch.uint8)
        else:
            codes = _nearest_code(y, dynamic_map(signed, y.device))
        return cls(codes, absmax, t.shape, block_size, scheme, signed)

    def dequantize(self) -> torch.Tensor:
        """The fp32 tensor of the original shape."""
        if self.scheme == "absmax" and self.signed:
            y = self.codes.float() / 127.0                           # [n_blocks, block_size]
        elif self.scheme == "absmax":
            y = (self.codes.float() + 1.0) / 256.0
        else:
            y = dynamic_map(self.signed, self.codes.device)[self.codes.long()]
        flat = (y * self.absmax.unsqueeze(1)).reshape(-1)
        return flat[:self.shape.numel()].view(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held: the (padded) codes and the per-block scales."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax))

    def numel(self) -> int:
        return self.shape.numel()

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, scheme={self.scheme!r}, signed={self.signed}, "
                f"block_size={self.block_size}, nbytes={self.nbytes})")


def quantize(t: torch.Tensor, scheme: str = "dynamic", block_size: int = 256,
             signed: bool = True) -> QuantizedTensor:
    """Block-wise 8-bit quantization of t (any shape); see QuantizedTensor."""
    return QuantizedTensor.quantize(t, scheme=scheme, block_size=block_size, signed=signed)
