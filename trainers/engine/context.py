"""What a run is made of, kept apart: its `Settings` (plain values, frozen: batch sizes, where to
write, checkpoint cadence, the precision) and the collaborators it trains and scores with (the
model, the tasks and their encoded data, the logger, the run's random generator, the PEFT method
and its training hooks, the processes that train it), held by a frozen `RunContext`. Nothing is assigned into either once a
run is built: training returns its result (`trainers.engine.loop.FitResult`), and the weights that
score each task are passed to scoring explicitly. Shared by training (`trainers.engine.run`) and
every script that scores a saved run (`RunContext.for_scoring`)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from minbert.peft.contract import NO_HOOKS, TrainingHooks
from tasks.base import Task
from tasks.batching import EncodedSplit
from tasks.model import MultitaskModel
from trainers.engine.parallel import SINGLE, Replicas
from trainers.engine.precision import PRECISIONS

TaskWeights = Callable[[str], ContextManager]  # task name -> a context holding its weights


def shared_weights(task: str) -> ContextManager:
    """One model for every task: nothing to swap."""
    return nullcontext()


@dataclass(frozen=True)
class Settings:
    """A run's plain settings, fixed once the run is built, each from its checked config key (no
    defaults here: they live in conf/)."""

    run_dir: Path
    batch_size: int  # data.batch_size
    eval_batch_size: int  # data.eval_batch_size
    device: torch.device
    progress: bool  # progress bars
    state_bits: int  # optim.state_bits: 8 stores optimizer moments block-wise in 8 bits
    checkpoint_every: int  # checkpoint.every_n_steps (0: at epoch ends only)
    checkpoint_keep: int  # checkpoint.keep
    precision: str  # fp32 | bf16 | fp16 (auto resolved: trainers.engine.precision)

    def __post_init__(self):
        object.__setattr__(self, "run_dir", Path(self.run_dir))


@dataclass(frozen=True)
class RunContext:
    """The collaborators of a run (their contents change as it trains; which ones they are does
    not) and its settings."""

    model: MultitaskModel
    tasks: list[Task]  # in the configured order
    data: dict[str, dict[str, EncodedSplit]]  # split -> task -> encoded split
    settings: Settings
    logger: object = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    method: object = None  # the PEFT method: its `merge_eval` and config for adapter files
    hooks: TrainingHooks = NO_HOOKS  # the method's hooks (minbert.peft.contract.training_hooks)
    parallel: Replicas = SINGLE  # the processes training the run (trainers.engine.parallel)

    @classmethod
    def for_scoring(cls, model: MultitaskModel, tasks: list[Task], data: dict, run_dir: Path,
                    method=None, *, eval_batch_size: int, progress: bool = False,
                    precision: str = "fp32") -> "RunContext":
        """A context that only scores (the scripts that load a finished run, with the run's own
        `data.eval_batch_size`): on the model's device, no logger, nothing trained or
        checkpointed, no progress bars unless asked for."""
        device = next(model.parameters()).device
        settings = Settings(run_dir, eval_batch_size, eval_batch_size, device, progress, 32, 0, 1,
                            precision)
        return cls(model, tasks, data, settings, method=method)

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    @property
    def merge_eval(self) -> bool:
        """Whether scoring runs on merged weights (the method's `merge_eval`)."""
        return bool(self.method is not None and self.method.merge_eval)


def autocast(ctx: RunContext):
    """The context forwards run in: mixed precision (autocast to the run's precision, the weights,
    gradients and optimizer states staying fp32), or nothing for fp32."""
    dtype = PRECISIONS[ctx.settings.precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(ctx.settings.device.type, dtype=dtype)
