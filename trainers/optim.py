"""Building a run's optimizer: the trainer's AdamW (a Hydra `_partial_`), unless the PEFT method
projects gradients (GaLore, GradNormLoRP: `minbert.optim.GaLoreAdamW`) or `optim.state_bits=8`
asks for block-wise 8-bit moments (Dettmers et al., 2022: `minbert.optim.AdamW8bit`, or GaLore's
low-rank moments in 8 bits). The partial's keyword arguments (lr, weight_decay, betas, eps) carry
over to whichever optimizer is built."""
from __future__ import annotations

import functools

import torch

from minbert.errors import ConfigError
from minbert.optim import AdamW8bit, GaLoreAdamW
from trainers.loop import param_groups

STATE_BITS = (32, 8)


def optimizer_kwargs(partial) -> dict:
    kwargs = dict(partial.keywords) if isinstance(partial, functools.partial) else {}
    return {k: v for k, v in kwargs.items() if k in ("lr", "weight_decay", "betas", "eps")}


def build_optimizer(partial, model: torch.nn.Module, head_lr: float | None = None, method=None,
                    state_bits: int = 32) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters: encoder and heads (at `head_lr`) groups,
    which a projecting method splits and tags."""
    if state_bits not in STATE_BITS:
        raise ConfigError(f"optim.state_bits={state_bits!r}; use one of {list(STATE_BITS)}")
    groups = param_groups(model, head_lr)
    if hasattr(method, "param_groups"):
        groups = method.param_groups(model, groups)
    if any("rank" in g for g in groups):
        return GaLoreAdamW(groups, state_bits=state_bits, **optimizer_kwargs(partial))
    if state_bits == 8:
        return AdamW8bit(groups, **optimizer_kwargs(partial))
    return partial(groups)
