"""Joint multi-task training with a task sampler: one loop mixes batches of every task, one
optimizer. `trainer.sampler` picks the task of each step (`trainers.strategies.samplers`: round_robin,
proportional (T5's examples-proportional mixing, Raffel et al., 2020), temperature (p_i ∝
n_i^(1/T), Arivazhagan et al., 2019), annealed (BERT and PALs, Stickland & Murray, 2019)).
With `trainer.pcgrad=true` every step takes one batch of each task and combines their gradients by
PCGrad's gradient surgery (Yu et al., 2020). An epoch is as many steps as the tasks have batches
together; each task's stream reshuffles when it runs out; dev is scored after each epoch and the
best state kept, as in the sequential trainer.
"""
from __future__ import annotations

from typing import Callable

from common.errors import ConfigError
from tasks.base import Task
from trainers.engine.evaluate import RunContext
from trainers.engine.loop import Step, Strategy, next_batch
from trainers.strategies.samplers import OPTIONS, TaskSampler, make_sampler
from trainers.engine.state import TrainState


class InterleavedTrainer(Strategy):
    def __init__(self, optimizer: Callable, sampler: str = "temperature",
                 temperature: float = 2.0, alpha_end: float = 0.2, pcgrad: bool = False,
                 **options):
        super().__init__(optimizer, **options)
        if sampler not in OPTIONS:
            raise ConfigError(f"trainer.sampler={sampler!r}; use one of {sorted(OPTIONS)}")
        self.sampler, self.pcgrad = sampler, pcgrad
        given = {"temperature": temperature, "alpha_end": alpha_end}
        self.options = {k: given[k] for k in OPTIONS[sampler]}
        self._sampler: TaskSampler | None = None

    def begin_phase(self, ctx: RunContext, state: TrainState, index: int) -> None:
        super().begin_phase(ctx, state, index)
        sizes = {t.name: ctx.data["train"][t.name].num_batches(ctx.batch_size) for t in ctx.tasks}
        self._sampler = make_sampler(self.sampler, sizes, self.epochs * sum(sizes.values()),
                                     ctx.generator, **self.options)

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> Step | None:
        if state.epoch_step >= self.steps_per_epoch(ctx, tasks):
            return None
        if self.pcgrad:
            return [(t, next_batch(ctx, state, t, endless=True)) for t in tasks]
        name = self._sampler.sample(state.step)
        task = next(t for t in tasks if t.name == name)
        return [(task, next_batch(ctx, state, task, endless=True))]
