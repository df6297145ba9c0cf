"""AdamW with 8-bit optimizer states (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization"), on the CPU, in plain PyTorch.

`adam_moments` is the moment update shared with GaLoreAdamW (minbert.optim.galore): it loads the
moments from the state (dequantizing 8-bit ones), updates them in fp32, stores them back
(re-quantizing) and returns the fp32 values, which the caller turns into its update. As in
bitsandbytes, the step uses the fresh fp32 moments; only what is carried to the next step is
quantized. fp32 moments are updated in place with exactly the ops GaLoreAdamW always used.
"""
from __future__ import annotations

import torch

from minbert.optim.quant import SCHEMES, QuantizedTensor

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors (biases, LayerNorm) keep fp32 moments


def adam_moments(state: dict, grad: torch.Tensor, beta1: float, beta2: float, quantized: bool,
                 scheme: str = "dynamic", block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Updates state['exp_avg'] (m) and state['exp_avg_sq'] (v) with grad; returns fp32 (m, v), shaped
    as grad. When the state has no moments yet they are created: QuantizedTensors if `quantized`
    (m signed, v unsigned), else fp32 zeros like grad."""
    if "exp_avg" not in state:
        zeros = torch.zeros_like(grad)
        if quantized:
            state["exp_avg"] = QuantizedTensor.quantize(zeros, scheme, block_size, signed=True)
            state["exp_avg_sq"] = QuantizedTensor.quantize(zeros, scheme, block_size, signed=False)
        else:
            state["exp_avg"], state["exp_avg_sq"] = zeros, torch.zeros_like(grad)
    stored_m, stored_v = state["exp_avg"], state["exp_avg_sq"]
    is_q = isinstance(stored_m, QuantizedTensor)
    exp_avg = stored_m.dequantize() if is_q else stored_m
    exp_avg_sq = stored_v.dequantize() if is_q else stored_v

    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

    if is_q:
        scheme, block_size = stored_m.scheme, stored_m.block_size
        state["exp_avg"] = QuantizedTensor.quantize(exp_avg, scheme, block_size, signed=True)
        state["exp_avg_sq"] = QuantizedTensor.quantize(exp_avg_sq, scheme, block_size, signed=False)
    return exp_avg, exp_avg_sq


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


class AdamW8bit(torch.optim.Optimizer):
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
        exp_avg, exp_avg_sq = adam_moments(state, p.grad, beta1, beta2,
                                           quantized=p.numel() >= group["min_8bit_size"],
                                           scheme=group["scheme"], block_size=group["block_size"])
        bias_correction1 = 1.0 - beta1 ** step
        bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
