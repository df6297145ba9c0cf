"""Gradient combiners: how one optimizer step's gradient is made from several tasks' gradients
(`trainer.combiner`, with `trainer=interleaved`; the loop calls `combine` when a step holds more
than one task's batch).

- `sum`: the plain sum, one task per step as the sampler draws it (no combining needed).
- `pcgrad`: PCGrad's gradient surgery (Yu et al., 2020; `trainers.strategies.pcgrad`).
- `gradvac`: Gradient Vaccine (Wang et al., 2021; `trainers.strategies.gradvac`).

A combiner declares `every_task`: whether a step takes one batch of every task (the combiners
that need several gradients), and may keep state across steps (`state_dict`), which checkpoints
save as `combiner`. `trainer.combiner=pcgrad` picks one with its defaults;
`trainer.combiner={name:gradvac,beta:0.02}` sets its options. Adding one is a class here or in its
own module, and an entry in `COMBINERS`.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

from common.errors import ConfigError
from trainers.strategies.gradvac import GradVac
from trainers.strategies.pcgrad import pcgrad

Grads = Sequence[Sequence[torch.Tensor | None]]  # grads[i][k]: task i's gradient of parameter k


class Combiner(Protocol):
    every_task: bool  # each step takes one batch of every task of the phase

    def combine(self, grads: Grads, generator: torch.Generator) -> list[torch.Tensor | None]:
        """One gradient per parameter (None: no task touches it) from every task's."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Sum:
    """The tasks' gradients summed: what one backward of the summed losses gives."""

    every_task = False

    def combine(self, grads: Grads, generator: torch.Generator) -> list[torch.Tensor | None]:
        out = []
        for per_task in zip(*grads):
            given = [g for g in per_task if g is not None]
            out.append(torch.stack(given).sum(0) if given else None)
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class PCGrad(Sum):
    """PCGrad: each task's gradient projected off the others' it conflicts with, then summed."""

    every_task = True

    def combine(self, grads: Grads, generator: torch.Generator) -> list[torch.Tensor | None]:
        return pcgrad(grads, generator)


COMBINERS = {"sum": Sum, "pcgrad": PCGrad, "gradvac": GradVac}


def make_combiner(spec) -> Combiner:
    """The combiner `trainer.combiner` names: a name, or a mapping with `name` and options."""
    options = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = options.pop("name", None)
    if name not in COMBINERS:
        raise ConfigError(f"trainer.combiner={name!r}; use one of {sorted(COMBINERS)} (options: "
                          "trainer.combiner={name:gradvac,beta:0.01})")
    try:
        return COMBINERS[name](**options)
    except TypeError as e:
        raise ConfigError(f"trainer.combiner={name}: {e}") from e
