"""A multi-task strategy, composed rather than inherited: its training options, its phases (one
over every task, or one per task: an expert each, every one from the same start), its schedule
(which task's batch comes next: `trainers.strategies.schedules`), its gradient combiner
(`trainers.strategies.combiners`), an optional per-phase initialiser (OrthoAda's frozen
orthogonal blocks) and its finisher (what the trained phases become: the best state kept, an
ensemble of experts, or experts merged by a method: `trainers.strategies.finishers`,
`trainers.strategies.experts`). `conf/trainer/*.yaml` assemble them:

    sequential   phases=one      schedule=Sequential  combiner=sum  finisher=KeepBest
    single       the same on `trainer.task` alone (the report's Table 2)
    interleaved  phases=one      schedule=Sampled     combiner=sum|pcgrad|gradvac
    eoe          phases=per_task schedule=Sequential  finisher=Experts
    fedavg       phases=per_task schedule=Sequential  finisher=MergeExperts(linear)
    orthoada     phases=per_task init=OrthogonalBlocks finisher=MergeExperts(linear, weights 1)

The loop (`trainers.engine.loop.train`) drives any of them through the `TrainingStrategy`
Protocol this class satisfies.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import torch

from common.errors import ConfigError
from tasks.base import Task
from trainers.engine.context import RunContext
from trainers.engine.loop import FitResult, Step
from trainers.engine.optim import build_optimizer, build_scheduler, check_scheduler
from trainers.engine.state import TrainState
from trainers.strategies.combiners import make_combiner
from trainers.strategies.phases import PHASES
from trainers.strategies.finishers import KeepBest


@dataclass(frozen=True)
class TrainOptions:
    """The options every strategy shares (`trainer.*`)."""

    optimizer: Callable  # a Hydra partial: trainer.optimizer
    epochs: int = 10
    head_lr: float | None = None
    max_grad_norm: float | None = None
    scheduler: str = "constant"
    warmup_ratio: float = 0.0
    eval_every_n_steps: int | None = None
    patience: int | None = None

    def __post_init__(self):
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ConfigError(f"trainer.epochs={self.epochs!r} must be a whole number >= 1")
        if self.head_lr is not None and not (isinstance(self.head_lr, (int, float))
                                             and 0 <= self.head_lr < math.inf):
            raise ConfigError(f"trainer.head_lr={self.head_lr!r} must be a number >= 0 (0 "
                              "freezes the heads), or null: the heads train at optimizer.lr")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and 0 < self.max_grad_norm < math.inf):
            raise ConfigError(f"trainer.max_grad_norm={self.max_grad_norm!r} must be a positive "
                              "number, or null: no clipping")
        for key in ("eval_every_n_steps", "patience"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"trainer.{key}={value!r} must be a whole number >= 1, or null "
                                  "(eval_every_n_steps: at epoch ends only; patience: no early "
                                  "stopping)")
        check_scheduler(self.scheduler, self.warmup_ratio)


class Strategy:
    """`trainer=<name>`: the parts, assembled. `task`: train that task alone (`trainer=single`)."""

    config_options = TrainOptions  # what **options takes (trainers.engine.targets)

    def __init__(self, optimizer: Callable, schedule, finisher=None, phases: str = "one",
                 combiner="sum", init=None, task: str | None = None, **options):
        self.options = TrainOptions(optimizer, **options)
        if phases not in PHASES:
            raise ConfigError(f"trainer.phases={phases!r}; use one of {sorted(PHASES)}")
        if task is not None and (not isinstance(task, str) or not task):
            raise ConfigError(f"trainer.task={task!r} must name a task (a conf/task/<name>.yaml)")
        self.schedule, self.combiner = schedule, make_combiner(combiner)
        self.finisher = finisher if finisher is not None else KeepBest()
        self.split, self.init, self.task = PHASES[phases](), init, task
        self.schedule.check(self.combiner)
        self.finisher.check(phases)

    @property
    def tasks(self) -> list[str] | None:
        """The tasks the strategy itself trains (`trainer.task`), else None: the run's `tasks`."""
        return [self.task] if self.task else None

    def check_tasks(self, names: list[str]) -> None:
        """Before anything is built: the parts that depend on the run's tasks agree with them
        (a merge's weights, one per task)."""
        check = getattr(self.finisher, "check_tasks", None)
        if check is not None:
            check(names)

    @property
    def merges(self) -> str | None:
        """What needs a mergeable PEFT method, if the finisher merges (`trainer=fedavg`)."""
        return self.finisher.merges

    @property
    def load_weights(self):
        """Rebuilds a finished run's weights (`trainers.engine.record.load_run`)."""
        return self.finisher.load_weights

    def phases(self, ctx: RunContext) -> list[list[Task]]:
        return self.split.phases(ctx.tasks)

    def phase_label(self, tasks: list[Task]) -> dict:
        return self.split.label(tasks)

    def start(self, ctx: RunContext, state: TrainState) -> None:
        """Once per process, before any phase begins or any checkpoint is loaded."""
        self.split.start(ctx)
        self.finisher.start(ctx)
        state.register("hooks", ctx.hooks)
        state.register("combiner", self.combiner)

    def steps_per_epoch(self, ctx: RunContext, tasks: list[Task]) -> int:
        size = ctx.settings.batch_size
        return sum(ctx.data["train"][t.name].num_batches(size) for t in tasks)

    def begin_phase(self, ctx: RunContext, state: TrainState, index: int) -> None:
        """The phase's start state and initialiser, then its optimizer, LR schedule (over the
        phase's steps: the whole run, or one expert) and fp16 gradient scaler, the method's
        `start_training`, the data-parallel wrapper (if several processes train the run) and the
        schedule's own start."""
        tasks = self.phases(ctx)[index]
        self.split.begin(ctx, index)
        if self.init is not None:
            self.init.prepare(ctx, index)
        total = self.steps_per_epoch(ctx, tasks) * self.options.epochs
        opt = self.options
        optimizer = build_optimizer(opt.optimizer, ctx.model, opt.head_lr, ctx.method,
                                    ctx.settings.state_bits, ctx.hooks)
        state.register("optimizer", optimizer)
        state.register("scheduler", build_scheduler(opt.scheduler, optimizer, total,
                                                    opt.warmup_ratio))
        state.register("scaler", self._scaler(ctx))
        ctx.hooks.start_training(ctx.model, total, ctx.generator)
        ctx.parallel.begin_phase(ctx.model)  # DDP over the phase's trainable tensors
        self.schedule.begin_phase(ctx, tasks, total)

    def _scaler(self, ctx: RunContext):
        if ctx.settings.precision != "fp16":
            return None
        if self.combiner.every_task:
            raise ConfigError("precision=fp16 with trainer.combiner: a combiner combines "
                              "unscaled task gradients; use precision=bf16 or fp32")
        return torch.amp.GradScaler(ctx.settings.device.type)

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> Step | None:
        return self.schedule.next_step(ctx, state, tasks, self.combiner.every_task,
                                       self.steps_per_epoch(ctx, tasks))

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None:
        self.finisher.save_best(ctx, state, tasks)

    def result(self, ctx: RunContext, state: TrainState) -> FitResult:
        return self.finisher.result(ctx, state, self.split)
