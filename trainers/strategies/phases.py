"""Phases: how a strategy splits its tasks into separately trained phases (`trainer.phases`).

- `one`: one phase over every task (sequential, interleaved).
- `per_task`: one phase per task, each an expert that starts from the same initial state (the
  adapters and heads as the run built them), as Ensemble of Experts, FedAvg and OrthoAda train.

Also the small tools for putting named tensors into a model and back that the expert strategies
share: `load_state`, `preserved`, `loaded`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from minbert.peft import adapter_state_dict
from tasks.base import Task

State = dict[str, torch.Tensor]


def tensors_of(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def load_state(model, state: State) -> None:
    tensors = tensors_of(model)
    for name, t in state.items():
        tensors[name].copy_(t)


@contextmanager
def preserved(model, names):
    """`with preserved(model, names):` the named tensors are restored on exit."""
    tensors = tensors_of(model)
    saved = {n: tensors[n].detach().clone() for n in names}
    try:
        yield model
    finally:
        load_state(model, saved)


@contextmanager
def loaded(model, state: State):
    """`with loaded(model, state):` the model holds `state`; on exit, what it held before."""
    with preserved(model, state):
        load_state(model, state)
        yield model


class OnePhase:
    """Every task in one phase."""

    name = "one"

    def phases(self, tasks: list[Task]) -> list[list[Task]]:
        return [list(tasks)]

    def start(self, ctx) -> None:
        return None

    def begin(self, ctx, index: int) -> None:
        return None

    def label(self, tasks: list[Task]) -> dict:
        """What the phase's history records and logs carry: nothing, for the only phase."""
        return {}


class PerTask:
    """A phase per task, each from the same start state (kept when the run starts)."""

    name = "per_task"

    def __init__(self):
        self.initial: State | None = None

    def phases(self, tasks: list[Task]) -> list[list[Task]]:
        return [[task] for task in tasks]

    def start(self, ctx) -> None:
        self.initial = {n: t.clone() for n, t in adapter_state_dict(ctx.model).items()}  # + heads

    def begin(self, ctx, index: int) -> None:
        self.restore(ctx.model)  # every expert starts from the same state

    def label(self, tasks: list[Task]) -> dict:
        """An expert's history records and logs name its task."""
        return {"expert": tasks[0].name}

    def restore(self, model) -> None:
        load_state(model, self.initial)


PHASES = {"one": OnePhase, "per_task": PerTask}
