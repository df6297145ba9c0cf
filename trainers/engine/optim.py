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
import math

import torch
from transformers import get_scheduler

from common.errors import ConfigError
from minbert.optim import AdamW8bit, GaLoreAdamW
from minbert.peft import trainable_params
from minbert.peft.contract import capabilities, training_hooks

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


def param_groups(model: torch.nn.Module, head_lr: float | None = None) -> list[dict]:
    """The optimizer's groups: encoder parameters at the optimizer's lr, and the freshly
    initialised task heads at `head_lr` (None: the same lr, the report's single-lr recipe)."""
    encoder = [p for _, p in trainable_params(model.encoder)]
    heads = [p for _, p in trainable_params(model.heads)]
    groups = [g for g in ({"params": encoder}, {"params": heads}) if g["params"]]
    if head_lr is not None and heads:
        groups[-1]["lr"] = head_lr
    return groups


def check_heads_only_lr(partial, model: torch.nn.Module, head_lr: float | None, method) -> None:
    """Where only the task heads train (`peft=frozen`), trainer.head_lr is their lr and the
    optimizer's lr (`peft.lr`) would set nothing: two different values are a conflict."""
    lr = partial.keywords.get("lr") if isinstance(partial, functools.partial) else None
    if (head_lr is None or lr is None or math.isclose(head_lr, lr)
            or any(True for _ in trainable_params(model.encoder))):
        return
    name = f"peft={method.name}" if method is not None else "a frozen encoder"
    raise ConfigError(
        f"only the task heads train ({name}): they learn at trainer.head_lr={head_lr}, so "
        f"trainer.optimizer.lr={lr} (peft.lr) would set nothing; give both the same value, or "
        "trainer.head_lr=null to train the heads at peft.lr")


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
    check_scheduler(name, warmup_ratio)
    warmup = round(warmup_ratio * total_steps)
    kind = "constant_with_warmup" if name == "constant" and warmup else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def optimizer_choice(partial, method=None, state_bits: int = 32) -> tuple[str, dict]:
    """Which optimizer a run trains with, decided from the config alone (checked before anything
    is built): ("galore", AdamW's options) where the method projects gradients, ("8bit", ...)
    for 8-bit states, else ("configured", {}): the trainer's optimizer as configured. A conflict
    between those keys is a ConfigError naming both."""
    if state_bits not in STATE_BITS:
        raise ConfigError(f"optim.state_bits={state_bits!r}; use one of {list(STATE_BITS)}")
    bits = f"optim.state_bits={state_bits}" if state_bits != 32 else ""
    if method is not None and capabilities(method).own_optimizer:
        reason = (f"peft={method.name} (GaLoreAdamW projects its gradients)"
                  + (f" with {bits}" if bits else ""))
        return "galore", adamw_kwargs(partial, reason)
    if state_bits == 8:
        return "8bit", adamw_kwargs(partial, f"{bits} (8-bit AdamW states)")
    return "configured", {}


def build_optimizer(partial, model: torch.nn.Module, head_lr: float | None = None, method=None,
                    state_bits: int = 32, hooks=None) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters: encoder and heads (at `head_lr`) groups,
    which the method's hooks may split and tag (`param_groups`); a method that declares
    `own_optimizer` (GaLore's projection) trains with GaLoreAdamW. `hooks`: the method's, as the
    run adapted them (None: adapted here)."""
    kind, kwargs = optimizer_choice(partial, method, state_bits)
    hooks = training_hooks(method) if hooks is None else hooks
    check_heads_only_lr(partial, model, head_lr, method)
    groups = hooks.param_groups(model, param_groups(model, head_lr))
    if kind == "galore":
        return GaLoreAdamW(groups, state_bits=state_bits, **kwargs)
    if kind == "8bit":
        return AdamW8bit(groups, **kwargs)
    return partial(groups)
