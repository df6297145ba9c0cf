"""8-bit optimizer states (`minbert.optim.quant`, `AdamW8bit`, `GaLoreAdamW(state_bits=8)`).

The quantizer is checked against the error bound of each scheme, computed here from its code values
(never from the quantizer's own output), and against bitsandbytes when it is installed. The
optimizers are checked for their byte counts, for exact AdamW math with quantization switched off
(against torch.optim.AdamW), and for tracking 32-bit training on a small convex problem. The chunked
processing is checked for giving the same bits at any chunk size and for keeping the 8-bit step's
temporaries chunk-sized (allocations seen by the profiler).
"""
from __future__ import annotations

import contextlib
import functools
import itertools

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from minbert.optim import (AdamW8bit, GaLoreAdamW, QuantizedTensor, dynamic_map, optimizer_state_bytes,
                           quantize, quant)

SHAPES = [(1,), (256,), (257,), (1000,), (3, 7, 11), (64, 48), (2, 3, 256)]
SCHEMES = [("absmax", True), ("absmax", False), ("dynamic", True), ("dynamic", False)]


def code_values(scheme: str, signed: bool) -> torch.Tensor:
    """Every value a code can stand for, in units of the block absmax, sorted."""
    if scheme == "dynamic":
        return dynamic_map(signed).double()
    if signed:
        return torch.arange(-127, 128, dtype=torch.float64) / 127   # round(y * 127)
    return torch.arange(1, 257, dtype=torch.float64) / 256          # zero-free (q + 1) / 256


def error_bound(x: torch.Tensor, scheme: str, signed: bool, block_size: int) -> torch.Tensor:
    """Per-element bound on |dequantize(quantize(x)) - x|: half the gap between the two code values
    around y = x / absmax (the distance to the end value outside the codes' range), times absmax."""
    flat = x.reshape(-1).double()
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)  # [n_blocks, block_size]
    absmax = blocks.abs().amax(1, keepdim=True).expand_as(blocks)
    y = blocks / absmax.clamp_min(1e-300)
    codes = code_values(scheme, signed)
    below = torch.where(codes[None, None, :] <= y[..., None], codes, -torch.inf).amax(-1)
    above = torch.where(codes[None, None, :] >= y[..., None], codes, torch.inf).amin(-1)
    half_gap = torch.where(below.isinf(), above - y,
                           torch.where(above.isinf(), y - below, (above - below) / 2))
    bound = half_gap * absmax + 1e-6 * absmax                         # + fp32 rounding of code * absmax
    return bound.reshape(-1)[:flat.numel()].view(x.shape)


def sample(shape, signed: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = x * torch.logspace(-4, 1, x.numel()).view(shape)  # magnitudes over 5 decades
    return x if signed else x * x                              # exp_avg_sq-like: >= 0


@pytest.mark.parametrize("block_size", [256, 64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme,signed", SCHEMES)
def test_error_within_bound(scheme, signed, shape, block_size):
    x = sample(shape, signed)
    q = quantize(x, scheme, block_size=block_size, signed=signed)
    out = q.dequantize()
    assert out.shape == x.shape and out.dtype == torch.float32
    err = (out.double() - x.double()).abs()
    bound = error_bound(x, scheme, signed, block_size)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert q.codes.shape == (-(-x.numel() // block_size), block_size)  # padded last block


@pytest.mark.parametrize("scheme,signed", SCHEMES)
def test_outlier_stays_in_its_block(scheme, signed):
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1))   # blocks of similar scale
    x = x if signed else x * x
    spiked = x.clone()
    spiked[300] = 1e4                                   # in block 1 of 4
    q, q_ref = quantize(spiked, scheme, signed=signed), quantize(x, scheme, signed=signed)
    others = [0, 2, 3]
    assert torch.equal(q.codes[others], q_ref.codes[others])
    assert torch.equal(q.absmax[others], q_ref.absmax[others])
    err = (q.dequantize() - spiked).abs().view(4, 256)
    assert (err[others].flatten() <= error_bound(x, scheme, signed, 256).view(4, 256)[others].flatten()).all()
    # the outlier's block pays for it, alone: 120-2600x the others' mean error for absmax, 7-11x for
    # dynamic, whose codes are dense near 0
    assert err[1].mean() > 5 * err[others].mean()


def test_zeros_and_scheme_errors():
    for scheme, signed in SCHEMES:
        assert torch.equal(quantize(torch.zeros(300), scheme, signed=signed).dequantize(), torch.zeros(300))
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp4'.*dynamic, absmax"):
        quantize(torch.ones(3), "fp4")
    with pytest.raises(ValueError, match="negative"):
        quantize(-torch.ones(3), "dynamic", signed=False)


def test_dynamic_map():
    for signed in (True, False):
        m = dynamic_map(signed)
        assert m.shape == (256,) and (m[1:] > m[:-1]).all() and m[-1] == 1.0 and (m == 0).sum() == 1
    assert -0.994 < dynamic_map(True)[0] < -0.99 and dynamic_map(False)[0] == 0.0


def test_against_bitsandbytes():
    """Same map as bitsandbytes; our nearest-code search is never worse than its CPU kernel's."""
    import bitsandbytes.functional as F
    for signed in (True, False):
        assert torch.equal(F.create_dynamic_map(signed=signed), dynamic_map(signed))
        x = sample((4096,), signed, seed=5)
        codes, state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed=signed), blocksize=256)
        theirs = (F.dequantize_blockwise(codes, state) - x).abs()
        q = quantize(x, "dynamic", signed=signed)
        ours = (q.dequantize() - x).abs()
        assert torch.equal(q.absmax, state.absmax)
        assert (ours <= theirs + 1e-6 * q.absmax.repeat_interleave(256)).all()


@pytest.mark.parametrize("numel,block_size,expected", [(1, 256, 256 + 4), (256, 256, 256 + 4),
                                                       (1000, 256, 1024 + 16), (1000, 64, 1024 + 64)])
def test_nbytes_exact(numel, block_size, expected):
    # codes: 1 byte per element of the padded blocks; scales: one fp32 per block
    assert quantize(torch.randn(numel), block_size=block_size).nbytes == expected


def step_once(opt, params):
    for p in params:
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0))
    opt.step()


def test_adamw8bit_state_bytes_ratio():
    w32, w8 = torch.nn.Parameter(torch.zeros(1024, 1024)), torch.nn.Parameter(torch.zeros(1024, 1024))
    ref, ours = torch.optim.AdamW([w32]), AdamW8bit([w8])
    step_once(ref, [w32])
    step_once(ours, [w8])
    n, blocks = 1024 * 1024, 1024 * 1024 // 256
    assert optimizer_state_bytes(ref) == 2 * 4 * n + 4               # fp32 moments, tensor step
    assert optimizer_state_bytes(ours) == 2 * (n + 4 * blocks) == 2129920
    ratio = optimizer_state_bytes(ref) / optimizer_state_bytes(ours)
    assert ratio >= 3.5, ratio                                       # 3.94


def test_galore_8bit_moment_bytes():
    opts = {}
    for bits in (32, 8):
        w = torch.nn.Parameter(torch.zeros(1024, 64))                # tall: R = G right^T [1024, 8]
        b = torch.nn.Parameter(torch.zeros(1024))                    # < min_8bit_size: stays fp32
        opts[bits] = GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 200, "scale": 1.0,
                                   "proj_type": "std"}, {"params": [b]}], state_bits=bits)
        step_once(opts[bits], [w, b])
        st = opts[bits].state[w]
        assert isinstance(st["exp_avg"], QuantizedTensor) == (bits == 8)
        assert isinstance(opts[bits].state[b]["exp_avg"], torch.Tensor)
    basis, bias = 8 * 64 * 4, 2 * 1024 * 4                            # right [8, 64] fp32; bias moments
    moments = {bits: optimizer_state_bytes(o) - basis - bias for bits, o in opts.items()}
    assert moments[32] == 2 * 1024 * 8 * 4 and moments[8] == 2 * (1024 * 8 + 4 * 32)
    assert moments[32] / moments[8] >= 3.5


def test_small_tensors_keep_fp32():
    big, small = torch.nn.Parameter(torch.zeros(64, 64)), torch.nn.Parameter(torch.zeros(4095))
    opt = AdamW8bit([big, small])
    step_once(opt, [big, small])
    assert isinstance(opt.state[big]["exp_avg_sq"], QuantizedTensor)
    assert isinstance(opt.state[small]["exp_avg_sq"], torch.Tensor)


def test_unquantized_equals_torch_adamw():
    """With every tensor below min_8bit_size this is AdamW itself: checks the Adam math."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 32), (32,), (5, 7, 3)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    our_p = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ref, ours = torch.optim.AdamW(ref_p, **kw), AdamW8bit(our_p, min_8bit_size=10 ** 12, **kw)
    for _ in range(25):
        for a, b in zip(ref_p, our_p):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        ref.step()
        ours.step()
    for a, b, t in zip(ref_p, our_p, init):
        assert (a - b).abs().max() <= 1e-6          # observed ~1e-7: lerp_ vs mul_/add_ in exp_avg
        assert (a - t).abs().max() > 0.1            # not vacuous


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_exact(signed):
    """The table search equals the exact nearest-value search (in float64; ties: lower code) on 2M
    values over all magnitudes and at, just above and below every midpoint. The former search in
    float32 arithmetic differs only within float rounding of a midpoint (the midpoint's fp32 ulp)."""
    g, m32 = torch.Generator().manual_seed(7), dynamic_map(signed)
    y = torch.rand(2 ** 21, generator=g) ** torch.randint(1, 40, (2 ** 21,), generator=g)  # 0 ... 1
    mids = (m32[1:] + m32[:-1]) / 2
    near = torch.cat([mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1)])  # at, above, below
    y = torch.cat([y, near, -y, -near]) if signed else torch.cat([y, near])
    rows = y.numel() // 255 + 1
    body = torch.cat([y, y.new_zeros(rows * 255 - y.numel())]).view(rows, 255)
    x = torch.cat([torch.ones(rows, 1), body], 1)              # absmax 1 per block: normalized == y
    codes = quantize(x, "dynamic", signed=signed).codes[:, 1:].reshape(-1)[:y.numel()].long()
    m64, y64 = m32.double(), y.double()
    hi = torch.searchsorted(m64, y64).clamp_(1, 255)
    assert torch.equal(codes, torch.where(y64 - m64[hi - 1] <= m64[hi] - y64, hi - 1, hi))
    hi = torch.searchsorted(m32, y).clamp_(1, 255)             # the former float32 search
    former = torch.where(y - m32[hi - 1] <= m32[hi] - y, hi - 1, hi)
    off = codes != former
    turn = (m64[1:] + m64[:-1])[torch.minimum(codes, former)[off]] / 2   # between the two picks
    assert ((codes - former)[off].abs() == 1).all() and off.sum() < 1e-4 * y.numel()
    assert ((y64[off] - turn).abs() <= 2 ** -24 * turn.abs()).all()


def run_8bit(chunk: int, monkeypatch, kind="adamw", scheme="dynamic", block_size=256, t=False):
    """Parameter, m and v codes / scales after 3 steps of AdamW8bit or GaLoreAdamW(state_bits=8) (a
    plain group) on a [70, 301] weight, 21070 elements: a partial last block, with CHUNK_ELEMENTS =
    chunk (t: the parameter is a non-contiguous transpose)."""
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(70, 301, generator=g)
    w = torch.nn.Parameter(init.t().contiguous().t() if t else init)   # same values, strides (1, 70)
    kw = dict(scheme=scheme, block_size=block_size, weight_decay=0.1)
    opt = AdamW8bit([w], **kw) if kind == "adamw" else GaLoreAdamW([w], state_bits=8, **kw)
    for _ in range(3):
        w.grad = torch.randn(w.shape, generator=g)
        opt.step()
    st = opt.state[w]
    return [w.detach()] + [getattr(st[k], a) for k in ("exp_avg", "exp_avg_sq") for a in ("codes", "absmax")]


@pytest.mark.parametrize("kind,scheme,block_size", [("adamw", "dynamic", 256), ("adamw", "absmax", 256),
                                                    ("adamw", "dynamic", 64), ("galore", "dynamic", 256)])
def test_chunk_size_does_not_change_results(monkeypatch, kind, scheme, block_size):
    whole = run_8bit(2 ** 40, monkeypatch, kind, scheme, block_size)
    for chunk in (256, 1000, 4096):                             # 1000: rounded down to whole blocks
        assert all(map(torch.equal, run_8bit(chunk, monkeypatch, kind, scheme, block_size), whole))
    assert all(map(torch.equal, run_8bit(256, monkeypatch, kind, scheme, block_size, t=True), whole))
    x = sample((3, 5000), True)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 300)
    small = quantize(x, scheme, block_size)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 2 ** 40)
    assert torch.equal(small.dequantize(), quantize(x, scheme, block_size).dequantize())


def step_allocations(opt) -> tuple[int, int]:
    """(largest single allocation, peak of the bytes allocated and not yet freed) in one opt.step()."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler saw no allocations"
    sizes = [n for _, n in events]
    return max(sizes), max(itertools.accumulate(sizes))


@contextlib.contextmanager
def one_thread():
    """For many small ops: a second thread only adds synchronisation, which costs 30x when the cores
    are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_8bit_step_temporaries_are_chunk_sized(monkeypatch):
    """The 8-bit step of an 8M-element parameter (32 chunks) allocates temporaries of ~29 bytes per
    element of one chunk, a fraction of the parameter's bytes; processed as one chunk, the same step
    holds over 5x the parameter's bytes (so the measurement does see the temporaries)."""
    numel, chunk, peaks = 32 * quant.CHUNK_ELEMENTS, quant.CHUNK_ELEMENTS, {}
    for chunk_elements in (chunk, 2 ** 40):
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk_elements)
        w = torch.nn.Parameter(torch.zeros(numel))
        w.grad = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        opt = AdamW8bit([w])
        with one_thread():
            opt.step()                                           # creates the state
            peaks[chunk_elements] = step_allocations(opt)
    param_bytes = 4 * numel
    assert peaks[chunk][0] <= 4 * chunk                         # one fp32 chunk at most
    assert peaks[chunk][1] <= 40 * chunk and peaks[chunk][1] < param_bytes / 4
    assert peaks[2 ** 40][1] > 4 * param_bytes


def test_bad_state_bits():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    for bits in (16, 4, "8"):
        with pytest.raises(ValueError, match="state_bits must be one of 32, 8"):
            GaLoreAdamW([w], state_bits=bits)
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        AdamW8bit([w], scheme="linear")


# --- 8-bit training tracks 32-bit training -------------------------------------------------------
# Eight independent logistic regressions (a Linear(64, 8), BCE, noisy labels) on fixed data, full
# batch, 200 steps of lr 1e-2. The problem is convex with a unique optimum, so the two runs are
# pulled to the same point and comparing weights is meaningful. (On a non-convex MLP that
# interpolates the data the runs drift apart, 25-75% of the distance travelled, and so do
# bitsandbytes' AdamW8bit and torch's AdamW, so weights would test nothing there.) The 8-bit moments
# carry per-element errors of ~1% of the block absmax; tolerances: final loss within 0.5%, and
# ||W8 - W32|| within 3% (AdamW) / 6% (GaLore, whose SVD bases are taken from the drifted gradients)
# of ||W32 - W0||, per tensor. Observed: loss 5e-6 and weights 0.1-0.4% (AdamW); loss 0.07-0.14% and
# weights 1.6-3.0% (GaLore). Storing the second moment with a zero code ('absmax' without the
# zero-free map) fails this test (10% on GaLore); so does any error that breaks the Adam step.
STEPS, LR = 200, 1e-2


@functools.lru_cache(maxsize=None)
def train(kind: str, bits: int, scheme: str = "dynamic") -> tuple[float, float, list, list]:
    """(initial loss, final loss, initial weights, final weights) of the logistic regressions,
    on one thread (the ops are tiny)."""
    with one_thread():
        return _train(kind, bits, scheme)


def _train(kind: str, bits: int, scheme: str) -> tuple[float, float, list, list]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 64, generator=g)                                   # [N, D]
    y = (torch.rand(2048, 8, generator=g) < torch.sigmoid(X @ torch.randn(64, 8, generator=g) / 4)).float()
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 8)                                             # weight [8, 64], bias [8]
    kw = dict(lr=LR, weight_decay=0.01)
    if kind == "adamw":
        opt = torch.optim.AdamW(net.parameters(), **kw) if bits == 32 else \
            AdamW8bit(net.parameters(), scheme=scheme, min_8bit_size=0, **kw)
    else:  # 'std' on the wide [8, 64] weight projects on the left: moments [4, 64]
        opt = GaLoreAdamW([{"params": [net.weight], "rank": 4, "update_proj_gap": 50, "scale": 1.0,
                            "proj_type": "std"}, {"params": [net.bias]}],
                          state_bits=bits, scheme=scheme, min_8bit_size=0, **kw)
    loss_fn = lambda: torch.nn.functional.binary_cross_entropy_with_logits(net(X), y)  # noqa: E731
    init = [p.detach().clone() for p in net.parameters()]
    loss0 = loss_fn().item()
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        return loss0, loss_fn().item(), init, [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("kind,weight_tol", [("adamw", 0.03), ("galore", 0.06)])
@pytest.mark.parametrize("scheme", ["dynamic", "absmax"])
def test_8bit_tracks_32bit(kind, weight_tol, scheme):
    loss0, loss32, init, w32 = train(kind, 32)
    _, loss8, _, w8 = train(kind, 8, scheme)
    assert loss32 < 0.8 * loss0                                              # it trained
    assert abs(loss8 - loss32) <= 0.005 * loss32, (loss8, loss32)
    for a, b, w0 in zip(w32, w8, init):
        assert not torch.equal(a, b)                                         # quantization was on
        rel = ((b - a).norm() / (a - w0).norm()).item()
        assert rel <= weight_tol, f"{kind}/{scheme}: weights differ by {rel:.3%} of the distance travelled"
