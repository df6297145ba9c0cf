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
  do we. Our search for the nearest code is exact (ties: the lower code), and cheap: each midpoint
  between two map values, rounded down to float32 (so y <= it exactly when y <= the true
  midpoint), falls in a bucket of floats sharing the top 16 bits of their pattern, at most one per
  bucket (checked when the table is built); the code is a table's code for y's bucket plus
  (y > that bucket's midpoint), a few passes over y instead of a binary search. bitsandbytes 0.50's
  CPU kernel picks the other neighbour for a few percent of elements (never with a smaller error,
  in tests/test_quant.py).

Storage is codes (1 byte per padded element) plus one fp32 absmax per block: for block_size 256,
1 + 4/256 bytes per element against 4 for fp32, a 3.94x saving. Quantizing and dequantizing run in
chunks of whole blocks (about CHUNK_ELEMENTS elements; `QuantizedTensor.store_blocks` and
`dequantize_blocks`), so their temporaries stay O(chunk) whatever the tensor's size; AdamW8bit
updates its moments chunk by chunk through them.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from minbert.optim.serial import packable

SCHEMES = ("dynamic", "absmax")
CHUNK_ELEMENTS = 2 ** 18  # elements per chunk (rounded down to whole blocks, at least one)


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


def _midpoints_cpu(signed: bool) -> torch.Tensor:
    """[255] fp32: the exact midpoints of consecutive map values, rounded down to float32."""
    values = _dynamic_map_cpu(signed).double()
    exact = (values[1:] + values[:-1]) / 2.0                             # exact in float64
    mids = exact.float()
    return torch.where(mids.double() > exact, mids.nextafter(torch.tensor(-torch.inf)), mids)


@functools.lru_cache(maxsize=None)
def _nearest_tables_cpu(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(code [65536] uint8, threshold [65536] fp32) over the top 16 bits k of a float32's pattern:
    the nearest code of y is code[k] + (y > threshold[k]), i.e. torch.bucketize(y, _midpoints_cpu)."""
    mids = _midpoints_cpu(signed)
    top = torch.arange(2 ** 16, dtype=torch.int32) << 16                  # wraps to the sign bit
    a, b = top.view(torch.float32), (top | 0xFFFF).view(torch.float32)     # ends of each bucket
    lo, hi = torch.fmin(a, b), torch.fmax(a, b)                           # NaN buckets: +-inf
    code_lo, code_hi = torch.bucketize(lo, mids), torch.bucketize(hi, mids)
    if (code_hi - code_lo).max() > 1:
        raise AssertionError("a 16-bit float bucket holds two midpoints of the dynamic map")
    threshold = torch.where(code_hi > code_lo, mids[code_lo.clamp(max=254)], torch.inf)
    return code_lo.to(torch.uint8), threshold


def _nearest_code(y: torch.Tensor, out: torch.Tensor, signed: bool) -> None:
    """Writes into `out` (uint8, y's numel) the index of the sorted dynamic map's value nearest to
    each element of fp32 y (ties: the lower index). Temporaries: 9 bytes per element of y."""
    code, threshold = (t.to(y.device) for t in _nearest_tables_cpu(signed))
    flat, out = y.reshape(-1), out.view(-1)
    key = (flat.view(torch.int32) >> 16).bitwise_and_(0xFFFF)          # top 16 bits, as int32
    torch.index_select(code, 0, key, out=out)
    out.add_(torch.gt(flat, torch.index_select(threshold, 0, key)).view(torch.uint8))


@functools.lru_cache(maxsize=None)
def _code_values_cpu(scheme: str, signed: bool) -> torch.Tensor:
    """[256] fp32: the normalized value each code stands for, indexed by the code's byte (uint8)."""
    byte = torch.arange(256)
    if scheme == "dynamic":
        return _dynamic_map_cpu(signed)
    if signed:   # int8 q = byte - 256 for byte >= 128; q / 127 as the fp32 division
        return torch.where(byte < 128, byte, byte - 256).float() / 127.0
    return (byte.float() + 1.0) / 256.0


@packable
class QuantizedTensor:
    """A float tensor stored block-wise in 8 bits. Attributes:
    codes  [n_blocks, block_size]  int8 ('absmax', signed), uint8 ('absmax' unsigned: (q + 1) / 256)
                                   or uint8 indices into the sorted map ('dynamic')
    absmax [n_blocks]              fp32 per-block absolute maximum
    shape, block_size, scheme, signed (whether negative values are representable).

    Blocks can be read and rewritten in place by range (`dequantize_blocks`, `store_blocks`; the
    ranges of `chunks()` bound the temporaries); `quantize` / `dequantize` / `store` do whole tensors
    chunk by chunk."""

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                 block_size: int, scheme: str, signed: bool):
        self.codes, self.absmax = codes, absmax
        self.shape, self.block_size, self.scheme, self.signed = torch.Size(shape), block_size, scheme, signed

    def to_state(self) -> dict:
        """Plain data for an optimizer's state dict (`minbert.optim.serial`)."""
        return {"codes": self.codes, "absmax": self.absmax, "shape": list(self.shape),
                "block_size": self.block_size, "scheme": self.scheme, "signed": self.signed}

    @classmethod
    def from_state(cls, fields: dict) -> "QuantizedTensor":
        return cls(fields["codes"], fields["absmax"], torch.Size(fields["shape"]),
                   fields["block_size"], fields["scheme"], fields["signed"])

    @classmethod
    def empty(cls, shape, scheme: str = "dynamic", block_size: int = 256, signed: bool = True,
              device: torch.device | str = "cpu") -> "QuantizedTensor":
        """Uninitialized storage for a tensor of `shape` (fill it with `store_blocks`)."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        n_blocks = max(1, math.ceil(torch.Size(shape).numel() / block_size))
        dtype = torch.int8 if scheme == "absmax" and signed else torch.uint8
        return cls(torch.empty(n_blocks, block_size, dtype=dtype, device=device),
                   torch.empty(n_blocks, device=device), shape, block_size, scheme, signed)

    @classmethod
    def zeros(cls, shape, scheme: str = "dynamic", block_size: int = 256, signed: bool = True,
              device: torch.device | str = "cpu") -> "QuantizedTensor":
        """The quantized zero tensor of `shape`, without an fp32 tensor of that size."""
        q = cls.empty(shape, scheme, block_size, signed, device)
        q.store_blocks(0, torch.zeros(min(block_size, max(1, q.numel())), device=device))
        q.codes.copy_(q.codes[:1].expand_as(q.codes))   # every block codes zero like the first
        q.absmax.zero_()
        return q

    @classmethod
    def quantize(cls, t: torch.Tensor, scheme: str = "dynamic", block_size: int = 256,
                 signed: bool = True) -> "QuantizedTensor":
        q = cls.empty(t.shape, scheme, block_size, signed, t.device)
        q.store(t)
        return q

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Block ranges (start, stop) covering all blocks, each of about CHUNK_ELEMENTS elements."""
        step = max(1, CHUNK_ELEMENTS // self.block_size)
        n_blocks = self.codes.shape[0]
        for start in range(0, n_blocks, step):
            yield start, min(start + step, n_blocks)

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """The range of flat element indices (lo, hi) that blocks [start, stop) hold (not padding)."""
        return min(start * self.block_size, self.numel()), min(stop * self.block_size, self.numel())

    def dequantize_blocks(self, start: int, stop: int) -> torch.Tensor:
        """fp32 [hi - lo]: the flat elements lo:hi (see `span`) of blocks [start, stop), a new tensor."""
        codes = self.codes[start:stop]                                   # [k, block_size]
        values = _code_values_cpu(self.scheme, self.signed).to(codes.device)
        y = torch.index_select(values, 0, codes.view(torch.uint8).reshape(-1).int())
        y = y.view(codes.shape).mul_(self.absmax[start:stop].unsqueeze(1))
        lo, hi = self.span(start, stop)
        return y.view(-1)[:hi - lo]

    def store_blocks(self, start: int, values: torch.Tensor) -> None:
        """Quantizes the flat `values` into blocks start, start + 1, ... in place (codes and absmax).
        values: whole blocks, or ending with the tensor's last element (the padding is zeros)."""
        bs, n = self.block_size, values.numel()
        stop = start + max(1, math.ceil(n / bs))
        if stop > self.codes.shape[0] or (n % bs and stop * bs < self.numel()):
            raise ValueError(f"{n} values do not fill whole blocks from block {start} of {self!r}")
        x = values.detach().reshape(-1).float()
        if n < (stop - start) * bs:
            x = torch.nn.functional.pad(x, (0, (stop - start) * bs - n))
        blocks = x.view(stop - start, bs)                               # [k, block_size]
        if not self.signed and bool((blocks.amin(dim=1) < 0).any()):
            raise ValueError("unsigned quantization cannot hold negative values; use signed=True")
        absmax = torch.amax(blocks.abs(), dim=1, out=self.absmax[start:stop])
        y = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
        self._encode(y, self.codes[start:stop])

    def _encode(self, y: torch.Tensor, out: torch.Tensor) -> None:
        """Writes the codes of normalized y [k, block_size] (a temporary: clobbered) into out."""
        if self.scheme == "absmax" and self.signed:
            out.copy_(y.mul_(127.0).round_())                           # int8 round(y * 127)
        elif self.scheme == "absmax":  # zero-free: code q stands for (q + 1) / 256
            out.copy_(y.mul_(256.0).round_().sub_(1.0).clamp_(0, 255))
        else:
            _nearest_code(y, out, self.signed)

    def store(self, t: torch.Tensor) -> None:
        """Re-quantizes the whole tensor from t (of this shape), chunk by chunk, in place."""
        if t.shape != self.shape:
            raise ValueError(f"cannot store a tensor of shape {tuple(t.shape)} in {self!r}")
        flat = t.detach().reshape(-1)
        for start, stop in self.chunks():
            self.store_blocks(start, flat[slice(*self.span(start, stop))])

    def dequantize(self) -> torch.Tensor:
        """The fp32 tensor of the original shape."""
        out = torch.empty(self.numel(), device=self.codes.device)
        for start, stop in self.chunks():
            out[slice(*self.span(start, stop))] = self.dequantize_blocks(start, stop)
        return out.view(self.shape)

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
