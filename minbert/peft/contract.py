"""The contract between a PEFT method and the training loop, declared once (torchtune's adapter
protocol: a small Protocol plus free functions, capabilities separate and optional).

- `TrainingHooks`: what a method may do during training. `NoHooks` is its no-op default; a method
  with hooks subclasses it and overrides what it needs (AdaLoRA's budget and orthogonality
  penalty, DyLoRA's rank sampling, GaLore's projected parameter groups). `training_hooks(method)`
  adapts any method once, when the run is built; the loop then calls every hook unconditionally.
- `Capabilities`: what a method can do, declared on its class as `capabilities`, read with
  `capabilities(method)`: whether its update folds into the weights (and if not, why), whether it
  exports to peft's format, whether it needs an optimizer of its own (GaLoreAdamW), and which
  encoder seam it uses (`prompt`, `kv_prefix`, `residual`) if it does not wrap Linear layers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainingHooks(Protocol):
    """What the loop calls on a method's hooks (`trainers.engine.loop`), in this order:
    `param_groups` when a phase's optimizer is built, `start_training` when the phase begins,
    `extra_loss` with each step's loss, `after_step` after each optimizer step (the gradients still
    there; `step` counts from 0 within the phase, `generator` is the run's), `state_dict` /
    `load_state_dict` in checkpoints, and after training `variants` (named contexts to score
    besides the trained model: DyLoRA's every rank), `report_variants` and `report` (what the
    method adds to metrics.json, with its figures)."""

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]: ...

    def start_training(self, model: nn.Module, total_steps: int,
                       generator: torch.Generator) -> None: ...

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   generator: torch.Generator) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def variants(self) -> dict[str, ContextManager]: ...

    def report_variants(self, scores: dict[str, float], run_dir: Path) -> None: ...

    def report(self, model: nn.Module, run_dir: Path) -> dict[str, float]: ...


class NoHooks:
    """Every hook, doing nothing: the hooks of a method that has none, and the base a method
    with hooks overrides."""

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        return groups

    def start_training(self, model: nn.Module, total_steps: int,
                       generator: torch.Generator) -> None:
        return None

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   generator: torch.Generator) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def variants(self) -> dict[str, ContextManager]:
        return {}

    def report_variants(self, scores: dict[str, float], run_dir: Path) -> None:
        return None

    def report(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        return {}


NO_HOOKS = NoHooks()


def training_hooks(method) -> TrainingHooks:
    """The method's hooks: the method itself if it declares them (a `NoHooks` subclass), else the
    no-op default. Called once, when a run is built."""
    return method if isinstance(method, NoHooks) else NO_HOOKS


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared once on its class.

    not_mergeable: why its update cannot fold into the weights (None: it can; merged evaluation,
        FedAvg, OrthoAda, TIES/DARE and `merge_and_unload` need that).
    peft_export: it writes peft's `adapter_config.json` + `adapter_model.safetensors`
        (`minbert.peft.io.export_peft`).
    own_optimizer: it trains with an optimizer of its own (GaLore's projecting `GaLoreAdamW`),
        which stands in for the configured AdamW (`trainers.engine.optim`).
    seam: the encoder seam it enters through, for a method that does not wrap Linear layers
        (`prompt`, `kv_prefix`, `residual`), else None.
    """

    not_mergeable: str | None = None
    peft_export: bool = False
    own_optimizer: bool = False
    seam: str | None = None

    @property
    def mergeable(self) -> bool:
        return self.not_mergeable is None


def capabilities(method) -> Capabilities:
    """The capabilities `method`'s class declares (every method declares them)."""
    declared = type(method).capabilities
    if not isinstance(declared, Capabilities):
        raise TypeError(f"{type(method).__name__}.capabilities must be a Capabilities")
    return declared


HOOKS = tuple(n for n in vars(NoHooks) if not n.startswith("_"))  # the hooks' names


def declaration_problems(cls: type) -> list[str]:
    """What a method class fails to declare, as sentences (empty: it keeps the contract). Every
    method declares, on its own class, `name` and `capabilities`, and has `merge_eval`; a method
    with a hook (a method named as one of `TrainingHooks`') subclasses `NoHooks`, or the loop
    would never call it, and keeps the Protocol's parameters; `own_optimizer` needs the
    `param_groups` hook that tags the groups, `peft_export` a `peft_adapter(encoder)`, and a
    method that cannot merge cannot evaluate merged by default."""
    who, own = cls.__name__, vars(cls)
    problems = []
    if not isinstance(own.get("name"), str):
        problems.append(f"{who} declares no `name: ClassVar[str]` of its own")
    declared = own.get("capabilities")
    if not isinstance(declared, Capabilities):
        problems.append(f"{who} declares no `capabilities: ClassVar[Capabilities]` of its own")
        declared = Capabilities()
    if not hasattr(cls, "merge_eval"):
        problems.append(f"{who} has no `merge_eval` (a field, or ClassVar False if it cannot "
                        "merge)")
    elif getattr(cls, "merge_eval") is True and not declared.mergeable:
        problems.append(f"{who} evaluates merged by default, but declares it cannot merge")
    hooks = [n for n in HOOKS if callable(getattr(cls, n, None))]
    if not issubclass(cls, NoHooks):
        if hooks:
            problems.append(f"{who} defines {', '.join(hooks)} without subclassing NoHooks: the "
                            "loop would never call them")
    else:
        for n in HOOKS:
            theirs, ours = inspect.signature(getattr(cls, n)), inspect.signature(getattr(NoHooks, n))
            if list(theirs.parameters) != list(ours.parameters):
                problems.append(f"{who}.{n}{theirs} does not keep the Protocol's {n}{ours}")
    if declared.own_optimizer and getattr(cls, "param_groups", None) in (None, NoHooks.param_groups):
        problems.append(f"{who} declares own_optimizer but no param_groups hook to tag its groups")
    if declared.peft_export and not callable(getattr(cls, "peft_adapter", None)):
        problems.append(f"{who} declares peft_export but has no peft_adapter(encoder)")
    return problems
