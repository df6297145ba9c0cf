"""Building a run's optimizer and its learning-rate schedule, the one place that does: the
trainer's optimizer (a Hydra
`_partial_`, `trainer.optimizer`), unless the PEFT method projects gradients (GaLore,
GradNormLoRP: `minbert.optim.GaLoreAdamW`) or `optim.state_bits=8` asks for block-wise 8-bit
moments (Dettmers et al., 2022: `minbert.optim.AdamW8bit`, or GaLore's low-rank moments in 8 bits).

Those optimizers are AdamW, so they stand in only for a configured `torch.optim.AdamW`, with its
lr, weight_decay, betas and eps; any other optimizer, or an AdamW option they lack (amsgrad, ...),
is a conflict between config keys and stops the run naming both, never a silent swap.
"""
from __future__ import annotations

import functools

import torch

from common.errors import ConfigError
from minbert.optim import AdamW8bit, GaLoreAdamW
from trainers.engine.loop import param_groups

STATE_BITS = (32, 8)
CARRIED = ("lr", "weight_decay", "betas", "eps")  # what AdamW8bit and GaLoreAdamW take of AdamW's


def _target(partial) -> str:
    func = partial.func if isinstance(partial, functools.partial) else partial
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', func)}"


def adamw_kwargs(partial, reason: str) -> dict:
    """The configured AdamW's options, for an AdamW variant chosen because of `reason` (the config
    key that asks for it); a conflict if the optimizer is not AdamW or has options it cannot take."""
    func = partial.func if isinstance(partial, functools.partial) else partial
    if func is not torch.optim.AdamW:
        raise ConfigError(f"trainer.optimizer._target_={_target(partial)} conflicts with {reason}, "
                          "which trains with an AdamW of its own; set trainer.optimizer._target_="
                          "torch.optim.AdamW, or drop " + reason.split(" (")[0])
    kwargs = dict(partial.keywords) if isinstance(partial, functools.partial) else {}
    ignored = sorted(k for k, v in kwargs.items() if k not in CARRIED and v is not None)
    if ignored:
        raise ConfigError(f"trainer.optimizer.{ignored[0]} is an option {reason} cannot honour "
                          f"(its AdamW takes {', '.join(CARRIED)}); remove it")
    return {k: v for k, v in kwargs.items() if k in CARRIED}


SCHEDULES = ("constant", "linear", "cosine")


def check_scheduler(name: str, warmup_ratio: float) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"trainer.scheduler={name!r}; use one of {list(SCHEDULES)}")
    if not 0 <= warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={warmup_ratio!r} must be in [0, 1)")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float = 0.0):
    """The learning-rate schedule over `total_steps` optimizer steps (transformers'
    `get_scheduler`): `constant` (with `warmup_ratio` of the steps of linear warm-up, if any),
    `linear` or `cosine` decay to zero after the warm-up."""
    from transformers import get_scheduler

    check_scheduler(name, warmup_ratio)
    warmup = round(warmup_ratio * total_steps)
    kind = "constant_with_warmup" if name == "constant" and warmup else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def build_optimizer(partial, model: torch.nn.Module, head_lr: float | None = None, method=None,
                    state_bits: int = 32) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters: encoder and heads (at `head_lr`) groups,
    which a projecting method splits and tags."""
    if state_bits not in STATE_BITS:
        raise ConfigError(f"optim.state_bits={state_bits!r}; use one of {list(STATE_BITS)}")
    groups = param_groups(model, head_lr)
    if hasattr(method, "param_groups"):
        groups = method.param_groups(model, groups)
    bits = f"optim.state_bits={state_bits}" if state_bits != 32 else ""
    if any("rank" in g for g in groups):
        name = getattr(method, "name", type(method).__name__)
        reason = f"peft={name} (GaLoreAdamW projects its gradients)" + (f" with {bits}" if bits else "")
        return GaLoreAdamW(groups, state_bits=state_bits, **adamw_kwargs(partial, reason))
    if state_bits == 8:
        return AdamW8bit(groups, **adamw_kwargs(partial, f"{bits} (8-bit AdamW states)"))
    return partial(groups)
