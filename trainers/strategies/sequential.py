"""Sequential multi-task training, the multi-task minBERT report's baseline strategy: for each
epoch, train on each task in the configured order (`order=sts-sst-para`), one pass over its data
(shuffled anew each epoch), with a single AdamW whose state persists across tasks. Dev is scored
after every epoch and the best state by the overall score is kept. `SingleTaskTrainer` is the same
on one task (the report's Table 2)."""
from __future__ import annotations

from typing import Callable

from common.errors import ConfigError
from tasks.base import Task
from trainers.engine.evaluate import RunContext
from trainers.engine.loop import Step, Strategy, next_batch
from trainers.engine.state import TrainState


class SequentialTrainer(Strategy):
    """`trainer=sequential`: the tasks in `order`, one after another, every epoch."""

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> Step | None:
        while state.slot < len(tasks):
            task = tasks[state.slot]
            batch = next_batch(ctx, state, task)
            if batch is not None:
                return [(task, batch)]
            state.slot += 1  # this task's pass is over: the next task's begins
        return None


class SingleTaskTrainer(SequentialTrainer):
    """`trainer=single trainer.task=sst`: one task alone (the report's Table 2 rows); the run
    reads, trains and scores only that task."""

    def __init__(self, optimizer: Callable, task: str = "sst", **kwargs):
        super().__init__(optimizer, **kwargs)
        if not isinstance(task, str) or not task:
            raise ConfigError(f"trainer.task={task!r} must name a task (a conf/task/<name>.yaml)")
        self.tasks = [task]
