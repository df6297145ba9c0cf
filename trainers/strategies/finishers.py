"""Finishers: what a strategy's trained phases become, and where a phase's best state is kept.

`KeepBest` (one phase): the best dev/overall state is kept in `adapter.safetensors` and put back
in the model at the end. The expert finishers (`trainers.strategies.experts`): `Experts`, each
task scored with its own expert (Ensemble of Experts), and `MergeExperts`, the experts merged in
weight space by a method (FedAvg's linear merge, task arithmetic, TIES, DARE).

A finisher declares `phases` (the `trainer.phases` it needs), `merges` (what needs a mergeable
PEFT method, or None) and `load_weights(model, run_dir, tasks)` (a finished run's weights, for
`trainers.engine.record.load_run`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from common.errors import ConfigError
from minbert.peft.io import load_adapter, method_metadata, save_adapter
from tasks.base import Task
from trainers.engine.context import RunContext, TaskWeights, shared_weights
from trainers.engine.loop import ADAPTER_FILE, FitResult
from trainers.engine.state import TrainState

log = logging.getLogger(__name__)


def check_phases(finisher, phases: str) -> None:
    if phases != finisher.phases:
        raise ConfigError(f"trainer.finisher {type(finisher).__name__} needs "
                          f"trainer.phases={finisher.phases}, not {phases}")


class KeepBest:
    """One model: its best state by dev/overall."""

    phases, merges = "one", None

    def check(self, phases: str) -> None:
        check_phases(self, phases)

    def start(self, ctx: RunContext) -> None:
        return None

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None:
        """Keeps the model's state as the phase's best (the adapter file)."""
        save_adapter(ctx.model, ctx.run_dir / ADAPTER_FILE,
                     {**method_metadata(ctx.method), "score": state.best_score,
                      "epoch": state.best_epoch, "step": state.best_step})

    def result(self, ctx: RunContext, state: TrainState, phases) -> FitResult:
        """The best state back in the model; the last state if no evaluation had a defined (not
        NaN) dev/overall, with a warning."""
        if state.best_epoch is not None:
            load_adapter(ctx.model, ctx.run_dir / ADAPTER_FILE)
            log.info("restored the best state (epoch %d, dev/overall %.4f)", state.best_epoch,
                     state.best_score)
        else:
            log.warning("no dev evaluation had a defined dev/overall (each was NaN: a primary "
                        "metric undefined, see the warnings above), so there is no best state; "
                        "the run keeps its last state")
        return FitResult(state.best_epoch, state.best_score)

    @staticmethod
    def load_weights(model, run_dir: Path, tasks: list[str]) -> TaskWeights:
        """The weights a one-model strategy saved: its best state, in `adapter.safetensors`."""
        load_adapter(model, Path(run_dir) / ADAPTER_FILE)
        return shared_weights
