"""GaLore: AdamW whose moments live in a low-rank projection of each weight's gradient.

Zhao et al. (2024), "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
(arXiv:2403.03507). For a weight W [m, n] with gradient G, GaLore keeps an orthonormal basis P from
the SVD of G, runs Adam on the projected gradient R = P^T G (or G P^T), and applies the Adam update
projected back, P N * scale. With the default 'std' the Adam moments are
r x max(m, n) instead of m x n.

This follows galore-torch 1.0 (`galore_torch.GaLoreAdamW`, i.e. adamw.py and galore_projector.py)
number for number. Its conventions, which are not all obvious from the paper:
- the per-parameter `step` counts completed updates and starts at 0; the projector is given that
  count *before* the increment, so P is recomputed at the first update and then whenever
  step % update_proj_gap == 0, i.e. at updates 1, 1+gap, 1+2*gap, ... (counting from 1);
- the moments are NOT reset or rotated when P is refreshed;
- bias correction folds into the step size (lr * sqrt(1 - b2^t) / (1 - b1^t)), eps is added to
  sqrt(v) uncorrected, and decoupled weight decay multiplies the already-updated weight by
  (1 - lr * weight_decay);
- the SVD runs in float32 and P is cast back to the gradient's dtype;
- proj_type 'full' projects both sides, R = U_r^T G V_r [r, r], so the moments are r x r.
Deliberate differences, none changing the numbers wherever galore-torch runs: the basis is a
compact copy, where galore-torch keeps a slice that holds the whole SVD factor in memory; we remember
which side was projected instead of re-deriving it from the low-rank shape in project_back, which in
galore-torch breaks 'reverse_std' on a wide [m, n] (m < n) weight when rank >= m; an unknown
proj_type or a non-2-D weight in a 'rank' group is a clear ValueError; missing group keys take the
projector's defaults; and a closure runs with grad enabled.

state_bits=8 (not in galore-torch 1.0's GaLoreAdamW) stores the moments block-wise 8-bit
(minbert.optim.quant; Dettmers et al., 2022): always the low-rank moments of projected groups, and
those of plain-AdamW groups from `min_8bit_size` elements up. The step itself runs in fp32; for
the full-size 8-bit moments of non-projected parameters it runs chunk by chunk (as AdamW8bit does),
so that its fp32 temporaries stay small.
"""
from __future__ import annotations

import math

import torch

from minbert.optim.adamw8 import (MIN_8BIT_SIZE, adam_moments, check_adam_args, init_moments, step_each,
                                  update_in_chunks)
from minbert.optim.quant import SCHEMES, QuantizedTensor
from minbert.optim.serial import PlainStateDict, packable

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
STATE_BITS = (32, 8)


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A compact copy, so the basis does not keep the whole SVD factor alive as a slice would. It
    keeps the slice's (column-major, from LAPACK) layout, so the matmuls round exactly as galore-torch's."""
    return t.to(dtype=dtype, copy=True)


@packable
class GaLoreProjector:
    """Projects one weight's gradient onto a rank-r orthonormal basis from its SVD, G = U S Vh.

    For G [m, n] and k = min(rank, m, n), the basis is one or both of
      left  = U[:, :k]   [m, k]   used as R = left^T G   [k, n], back: left R
      right = Vh[:k, :]  [k, n]   used as R = G right^T  [m, k], back: R right
    chosen by proj_type: 'left', 'right', 'full' (both, R is [k, k]), 'std' (right if m >= n else
    left: the smaller side is compressed, R is [max(m, n), k] or [k, max(m, n)]) and 'reverse_std'
    (the opposite of 'std').
    """

    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std"):
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"unknown GaLore proj_type {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.left: torch.Tensor | None = None   # [m, k] or None
        self.right: torch.Tensor | None = None  # [k, n] or None

    def to_state(self) -> dict:
        """Its fields as plain values and tensors, for a checkpoint (`minbert.optim.serial`)."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, fields: dict) -> "GaLoreProjector":
        projector = cls(fields["rank"], fields["update_proj_gap"], fields["scale"],
                        fields["proj_type"])
        projector.left, projector.right = fields["left"], fields["right"]
        return projector

    def sides(self, shape: torch.Size) -> tuple[bool, bool]:
        """(use left, use right) for a gradient of this shape."""
        tall = shape[0] >= shape[1]
        return {"std": (not tall, tall), "reverse_std": (tall, not tall), "left": (True, False),
                "right": (False, True), "full": (True, True)}[self.proj_type]

    def refresh(self, grad: torch.Tensor) -> None:
        """Recomputes the basis from the SVD of the current gradient (in float32, like galore-torch)."""
        use_left, use_right = self.sides(grad.shape)
        U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)  # U [m, min], Vh [min, n]
        self.left = _owned(U[:, :self.rank], grad.dtype) if use_left else None
        self.right = _owned(Vh[:self.rank, :], grad.dtype) if use_right else None

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The low-rank gradient of grad [m, n], refreshing the basis first when `step` is due."""
        if grad.dim() != 2:
            raise ValueError(f"GaLore projects 2-D weights, got a gradient of shape {tuple(grad.shape)}; "
                             "put this parameter in a param group without 'rank'")
        if (self.left is None and self.right is None) or step % self.update_proj_gap == 0:
            self.refresh(grad)
        low = grad
        if self.left is not None:
            low = self.left.t() @ low    # [k, m] @ [m, n] -> [k, n]
        if self.right is not None:
            low = low @ self.right.t()   # [., n] @ [n, k] -> [., k]
        return low

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """The full-shape [m, n] update for a low-rank one, times `scale`."""
        full = low
        if self.left is not None:
            full = self.left @ full      # [m, k] @ [k, .] -> [m, .]
        if self.right is not None:
            full = full @ self.right     # [., k] @ [k, n] -> [., n]
        return full * self.scale

    def matrices(self) -> list[torch.Tensor]:
        """The orthonormal matrices currently held (one, or two for 'full'; none before the first step)."""
        return [m for m in (self.left, self.right) if m is not None]


class GaLoreAdamW(PlainStateDict, torch.optim.Optimizer):
    """AdamW (the transformers/galore-torch variant), with GaLore for the param groups that set `rank`.

    A projected group reads `rank`, `update_proj_gap` (default 200), `scale` (default 1.0) and
    `proj_type` (default 'std'); galore-torch requires all four. Other groups get plain AdamW.
    State per parameter: 'step' (int), 'exp_avg', 'exp_avg_sq' (low-rank shaped when projected) and,
    when projected, 'projector' (a GaLoreProjector).

    state_bits: 32 (fp32 moments, galore-torch's numbers) or 8: the moments are QuantizedTensors
    (`scheme` 'dynamic' or 'absmax', blocks of `block_size`) for every projected parameter and for
    plain-AdamW parameters of at least `min_8bit_size` elements. Low-rank moments are quantized
    whatever their size: at small rank they are mostly below bitsandbytes' 4096 threshold, which
    would otherwise leave state_bits=8 without effect on GaLore.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False,  # accepted for galore-torch compatibility
                 state_bits: int = 32, scheme: str = "dynamic", block_size: int = 256,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        check_adam_args(lr, betas, eps)
        if state_bits not in STATE_BITS:
            raise ValueError(f"GaLoreAdamW state_bits must be one of {', '.join(map(str, STATE_BITS))}, "
                             f"got {state_bits!r}")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.state_bits, self.scheme, self.block_size, self.min_8bit_size = (
            state_bits, scheme, block_size, min_8bit_size)

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group and param_group.get("proj_type", "std") not in PROJ_TYPES:
            raise ValueError(f"unknown GaLore proj_type {param_group['proj_type']!r}; "
                             f"use one of {', '.join(PROJ_TYPES)}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        return step_each(self, closure)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        state = self.state[p]
        state.setdefault("step", 0)
        projector = None
        if "rank" in group:
            if "projector" not in state:
                state["projector"] = GaLoreProjector(
                    group["rank"], update_proj_gap=group.get("update_proj_gap", 200),
                    scale=group.get("scale", 1.0), proj_type=group.get("proj_type", "std"))
            projector = state["projector"]
            grad = projector.project(grad, state["step"])  # step before this update: 0, 1, 2, ...
        beta1, beta2 = group["betas"]
        state["step"] += 1
        quantized = self.state_bits == 8 and (projector is not None or p.numel() >= self.min_8bit_size)
        step_size = group["lr"]
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1

        if quantized and projector is None:  # full-size 8-bit moments: the same ops, chunk by chunk
            init_moments(state, grad, True, self.scheme, self.block_size)
            update_in_chunks(p, state, grad, beta1, beta2, lambda p_chunk, m, v: p_chunk.add_(
                m / v.sqrt_().add_(group["eps"]), alpha=-step_size))
        else:  # the moments are kept across projector refreshes; fp32 (m, v) shaped as grad
            exp_avg, exp_avg_sq = adam_moments(state, grad, beta1, beta2, quantized,
                                               scheme=self.scheme, block_size=self.block_size)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            update = exp_avg / denom
            if projector is not None:
                update = projector.project_back(update)  # [m, n], times scale
            p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, on the already-updated full weight
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def _tensor_bytes(obj) -> int:
    if isinstance(obj, QuantizedTensor):  # its codes and per-block scales
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):  # a projector object: its orthonormal matrices
        return sum(_tensor_bytes(v) for v in vars(obj).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state`: numel * element_size of every tensor found in each
    parameter's state, looking inside lists, tuples, dicts and objects' attributes (so a GaLore
    projector's orthonormal matrices count, ours or galore-torch's; an 8-bit QuantizedTensor counts
    its codes and scales). Python numbers (GaLore's int
    'step') count 0; a tensor step, as torch.optim.AdamW keeps, counts. Parameters, gradients and
    param_groups are not counted, and a tensor reachable twice is counted twice."""
    return sum(_tensor_bytes(s) for s in optimizer.state.values())
