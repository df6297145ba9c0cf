"""Sequential multi-task training, the multi-task minBERT report's baseline strategy: for each
epoch, train on each task in the configured order (`order=sts-sst-para`), one batch loop per
task, with a single AdamW whose state persists across tasks. Dev is scored after every epoch and
the best state by the overall score is kept."""
from __future__ import annotations

import logging
from typing import Callable

from minbert.errors import ConfigError
from tasks import TASKS
from trainers.loop import (ADAPTER_FILE, BestCheckpoint, FitResult, RunContext, append_history,
                           evaluate, saved_weights, train_task_epoch)
from trainers.optim import build_optimizer

log = logging.getLogger(__name__)


class SequentialTrainer:
    load_weights = staticmethod(saved_weights)  # rebuilds a finished run (trainers.run.load_run)

    def __init__(self, optimizer: Callable, epochs: int = 10, head_lr: float | None = None,
                 max_grad_norm: float | None = None):
        if epochs < 1:
            raise ConfigError(f"trainer.epochs={epochs} must be at least 1")
        self.optimizer, self.epochs, self.head_lr = optimizer, epochs, head_lr
        self.max_grad_norm = max_grad_norm

    def fit(self, ctx: RunContext) -> FitResult:
        optimizer = build_optimizer(self.optimizer, ctx.model, self.head_lr, ctx.method,
                                    ctx.state_bits)
        ctx.optimizer = optimizer  # for the run's memory accounting
        best = BestCheckpoint(ctx.run_dir / ADAPTER_FILE, ctx.method)
        for epoch in range(1, self.epochs + 1):
            losses = {t.name: train_task_epoch(ctx, t, optimizer, epoch, self.max_grad_norm)
                      for t in ctx.tasks}
            metrics, _ = evaluate(ctx, "dev")
            improved = best.update(ctx.model, metrics["dev/overall"], epoch)
            append_history(ctx.run_dir, {"epoch": epoch, "step": ctx.step, **metrics,
                                         **{f"{k}/train/loss": v for k, v in losses.items()}})
            ctx.logger.log({**metrics, "epoch": epoch}, step=ctx.step)
            log.info("epoch %d/%d: %s%s", epoch, self.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                     " (best so far)" if improved else "")
        best.restore(ctx.model)
        return FitResult(best.epoch, best.score)


class SingleTaskTrainer(SequentialTrainer):
    """`trainer=single trainer.task=sst`: one task alone (the report's Table 2 rows); the run
    reads, trains and scores only that task."""

    def __init__(self, optimizer: Callable, task: str = "sst", **kwargs):
        super().__init__(optimizer, **kwargs)
        if task not in TASKS:
            raise ConfigError(f"trainer.task={task!r}; use one of {sorted(TASKS)}")
        self.tasks = [task]
