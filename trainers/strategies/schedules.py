"""Schedules: which task's batch each step of a phase trains.

- `Sequential` (`trainer=sequential`, the multi-task minBERT report's baseline): each epoch, one
  pass over each task's training data in the configured order (shuffled anew each epoch).
- `Sampled` (`trainer=interleaved`): each step trains the task a sampler draws
  (`trainers.strategies.samplers`: round_robin, proportional, temperature, annealed); an epoch is
  as many steps as the tasks have batches together, and each task's stream reshuffles when it
  runs out. With a combiner that needs every task's gradient (`pcgrad`, `gradvac`), each step
  takes one batch of every task instead.

Batches come from the task streams' cursors in the `TrainState`, so a resumed run draws exactly
the batches an uninterrupted one would.
"""
from __future__ import annotations

from common.errors import ConfigError
from tasks.base import Task
from trainers.engine.context import RunContext
from trainers.engine.loop import Step, next_batch
from trainers.engine.state import TrainState
from trainers.strategies.samplers import OPTIONS, TaskSampler, make_sampler


class Sequential:
    """The tasks one after another, a full pass each, every epoch."""

    def check(self, combiner) -> None:
        if combiner.every_task:
            raise ConfigError("trainer.combiner combines several tasks' gradients per step, and a "
                              "sequential schedule trains one task at a time; use "
                              "trainer=interleaved")

    def begin_phase(self, ctx: RunContext, tasks: list[Task], total_steps: int) -> None:
        return None

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task],
                  every_task: bool, per_epoch: int) -> Step | None:
        while state.slot < len(tasks):
            task = tasks[state.slot]
            batch = next_batch(ctx, state, task)
            if batch is not None:
                return [(task, batch)]
            state.slot += 1  # this task's pass is over: the next task's begins
        return None


class Sampled:
    """A sampler's task each step (`sampler`; `temperature` and `alpha_end` as it takes them)."""

    def __init__(self, sampler: str = "temperature", temperature: float = 2.0,
                 alpha_end: float = 0.2):
        if sampler not in OPTIONS:
            raise ConfigError(f"trainer.schedule.sampler={sampler!r}; use one of "
                              f"{sorted(OPTIONS)}")
        given = {"temperature": temperature, "alpha_end": alpha_end}
        self.sampler, self.options = sampler, {k: given[k] for k in OPTIONS[sampler]}
        self._sampler: TaskSampler | None = None

    def check(self, combiner) -> None:
        return None

    def begin_phase(self, ctx: RunContext, tasks: list[Task], total_steps: int) -> None:
        size = ctx.settings.batch_size
        sizes = {t.name: ctx.data["train"][t.name].num_batches(size) for t in tasks}
        self._sampler = make_sampler(self.sampler, sizes, total_steps, ctx.generator,
                                     **self.options)

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task],
                  every_task: bool, per_epoch: int) -> Step | None:
        if state.epoch_step >= per_epoch:
            return None
        if every_task:
            return [(t, next_batch(ctx, state, t, endless=True)) for t in tasks]
        name = self._sampler.sample(state.step)
        task = next(t for t in tasks if t.name == name)
        return [(task, next_batch(ctx, state, task, endless=True))]
