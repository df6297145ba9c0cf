"""AdamW with 8-bit optimizer states (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization"), on the CPU, in plain PyTorch.

The moment update is shared with GaLoreAdamW (minbert.optim.galore). For 8-bit moments it runs chunk
by chunk (`adam_moment_chunks`): dequantize a chunk of blocks of m and v, update them in fp32 with
that chunk of the gradient, re-quantize them into the same storage, and hand the fresh fp32 chunk to
the caller, which applies that chunk of its update (`update_in_chunks`); AdamW8bit does so, and so
does GaLoreAdamW for the 8-bit moments of its non-projected parameters: their temporaries are
O(minbert.optim.quant.CHUNK_ELEMENTS), not O(numel). `adam_moments` returns whole fp32 moments (for
GaLore's small low-rank ones, through the same chunks). As in bitsandbytes, the step uses the fresh
fp32 moments; only what is carried to the next step is quantized. fp32 moments are updated in place
with exactly the ops GaLoreAdamW always used.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from minbert.optim.quant import SCHEMES, QuantizedTensor
from minbert.optim.serial import PlainStateDict

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors (biases, LayerNorm) keep fp32 moments


def init_moments(state: dict, grad: torch.Tensor, quantized: bool, scheme: str = "dynamic",
                 block_size: int = 256) -> None:
    """Creates state['exp_avg'] and state['exp_avg_sq'] if missing: QuantizedTensor zeros if
    `quantized` (m signed, v unsigned), else fp32 zeros like grad."""
    if "exp_avg" in state:
        return
    if quantized:
        state["exp_avg"] = QuantizedTensor.zeros(grad.shape, scheme, block_size, True, grad.device)
        state["exp_avg_sq"] = QuantizedTensor.zeros(grad.shape, scheme, block_size, False, grad.device)
    else:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)


def _update_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                    beta1: float, beta2: float) -> None:
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_moment_chunks(state: dict, grad: torch.Tensor, beta1: float,
                       beta2: float) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For 8-bit moments state['exp_avg'], state['exp_avg_sq'] (QuantizedTensors shaped as grad):
    updates them with grad chunk by chunk, in place, yielding (lo, hi, m, v) per chunk: the fp32
    updated moments [hi - lo] of the flat elements lo:hi, new tensors the caller may clobber."""
    stored_m, stored_v = state["exp_avg"], state["exp_avg_sq"]
    flat_grad = grad.reshape(-1)
    for start, stop in stored_m.chunks():
        lo, hi = stored_m.span(start, stop)
        m, v = stored_m.dequantize_blocks(start, stop), stored_v.dequantize_blocks(start, stop)
        _update_moments(m, v, flat_grad[lo:hi], beta1, beta2)
        stored_m.store_blocks(start, m)
        stored_v.store_blocks(start, v)
        yield lo, hi, m, v


def update_in_chunks(p: torch.Tensor, state: dict, grad: torch.Tensor, beta1: float, beta2: float,
                     apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]) -> None:
    """Runs adam_moment_chunks(state, grad, ...) and apply(p_chunk, m, v) on each chunk: p_chunk is
    the flat view p[lo:hi] to update in place (of a copy written back, if p is not contiguous)."""
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
    for lo, hi, m, v in adam_moment_chunks(state, grad, beta1, beta2):
        apply(flat[lo:hi], m, v)
    if not p.is_contiguous():
        p.copy_(flat.view(p.shape))


def adam_moments(state: dict, grad: torch.Tensor, beta1: float, beta2: float, quantized: bool,
                 scheme: str = "dynamic", block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Updates state['exp_avg'] (m) and state['exp_avg_sq'] (v) with grad; returns fp32 (m, v), shaped
    as grad (for 8-bit moments, whole fp32 copies: for small tensors; see adam_moment_chunks). Moments
    missing from the state are created first (`init_moments`)."""
    init_moments(state, grad, quantized, scheme, block_size)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if not isinstance(exp_avg, QuantizedTensor):
        _update_moments(exp_avg, exp_avg_sq, grad, beta1, beta2)
        return exp_avg, exp_avg_sq
    m, v = (grad.new_empty(grad.numel(), dtype=torch.float32) for _ in range(2))
    for lo, hi, m_chunk, v_chunk in adam_moment_chunks(state, grad, beta1, beta2):
        m[lo:hi], v[lo:hi] = m_chunk, v_chunk
    return m.view(grad.shape), v.view(grad.shape)


def check_adam_args(lr: float, betas: tuple[float, float], eps: float) -> None:
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
    for b in betas:
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter: {b} - should be in [0.0, 1.0)")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")


def step_each(optimizer: torch.optim.Optimizer, closure=None):
    """An optimizer step as a loop over parameters with gradients: `optimizer._update(p, group)`
    for each, after running `closure` (with gradients enabled) if given."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                optimizer._update(p, group)
    return loss


class AdamW8bit(PlainStateDict, torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay applied before the step, bias correction, eps added
    to the bias-corrected sqrt(v)) whose moments are block-wise 8-bit QuantizedTensors.

    scheme: 'dynamic' (default; signed map for exp_avg, unsigned for exp_avg_sq) or 'absmax'
    (linear; zero-free for exp_avg_sq, see minbert.optim.quant). Parameters with fewer than
    `min_8bit_size` elements keep fp32 moments. State per parameter:
    'step' (int), 'exp_avg', 'exp_avg_sq'. No amsgrad, maximize, or sparse gradients.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, scheme: str = "dynamic",
                 block_size: int = 256, min_8bit_size: int = MIN_8BIT_SIZE):
        check_adam_args(lr, betas, eps)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scheme=scheme,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        return step_each(self, closure)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        lr, (beta1, beta2), step = group["lr"], group["betas"], state["step"]
        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - lr * group["weight_decay"])
        init_moments(state, p.grad, p.numel() >= group["min_8bit_size"], group["scheme"],
                     group["block_size"])
        step_size, bias_correction2_sqrt = lr / (1.0 - beta1 ** step), (1.0 - beta2 ** step) ** 0.5
        if not isinstance(state["exp_avg"], QuantizedTensor):
            exp_avg, exp_avg_sq = adam_moments(state, p.grad, beta1, beta2, quantized=False)
            _adam_step(p, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt, group["eps"])
            return
        update_in_chunks(p, state, p.grad, beta1, beta2, lambda p_chunk, m, v: _adam_step(
            p_chunk, m, v.sqrt_(), step_size, bias_correction2_sqrt, group["eps"], v_is_sqrt=True))


def _adam_step(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step_size: float,
               bias_correction2_sqrt: float, eps: float, v_is_sqrt: bool = False) -> None:
    """p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps), torch.optim.AdamW's rounding.
    With v_is_sqrt, exp_avg_sq already holds sqrt(v) and is clobbered."""
    denom = exp_avg_sq if v_is_sqrt else exp_avg_sq.sqrt()
    denom.div_(bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
