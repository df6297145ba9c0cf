"""Joint multi-task training with a task sampler: one loop mixes batches of every task, one
optimizer. `trainer.sampler` picks the task of each step (`trainers.samplers`: round_robin,
proportional (T5's examples-proportional mixing, Raffel et al., 2020), temperature (p_i ∝
n_i^(1/T), Arivazhagan et al., 2019), annealed (BERT and PALs, Stickland & Murray, 2019)).
With `trainer.pcgrad=true` every step takes one batch of each task and combines their gradients by
PCGrad's gradient surgery (Yu et al., 2020). An epoch is as many steps as the tasks have batches
together; dev is scored after each and the best state kept, as in the sequential trainer.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from tqdm.auto import tqdm

from minbert.errors import ConfigError
from minbert.peft import trainable_params
from trainers.loop import (ADAPTER_FILE, BestCheckpoint, FitResult, RunContext, append_history,
                           checked_loss, evaluate, optimizer_step, record_loss, saved_weights)
from trainers.optim import build_optimizer
from trainers.pcgrad import pcgrad, task_gradients
from trainers.samplers import OPTIONS, make_sampler

log = logging.getLogger(__name__)


def endless_batches(ctx: RunContext, task) -> Iterator:
    """The task's training batches, reshuffled on every pass, forever."""
    data = ctx.data["train"][task.name]
    while True:
        yield from data.batches(ctx.batch_size, shuffle=True, generator=ctx.generator)


class InterleavedTrainer:
    load_weights = staticmethod(saved_weights)  # rebuilds a finished run (trainers.run.load_run)

    def __init__(self, optimizer: Callable, epochs: int = 10, head_lr: float | None = None,
                 max_grad_norm: float | None = None, sampler: str = "temperature",
                 temperature: float = 2.0, alpha_end: float = 0.2, pcgrad: bool = False):
        if epochs < 1:
            raise ConfigError(f"trainer.epochs={epochs} must be at least 1")
        if sampler not in OPTIONS:
            raise ConfigError(f"trainer.sampler={sampler!r}; use one of {sorted(OPTIONS)}")
        self.optimizer, self.epochs, self.head_lr = optimizer, epochs, head_lr
        self.max_grad_norm, self.sampler, self.pcgrad = max_grad_norm, sampler, pcgrad
        given = {"temperature": temperature, "alpha_end": alpha_end}
        self.options = {k: given[k] for k in OPTIONS[sampler]}

    def fit(self, ctx: RunContext) -> FitResult:
        optimizer = build_optimizer(self.optimizer, ctx.model, self.head_lr, ctx.method,
                                    ctx.state_bits)
        ctx.optimizer = optimizer
        sizes = {t.name: ctx.data["train"][t.name].num_batches(ctx.batch_size) for t in ctx.tasks}
        per_epoch = sum(sizes.values())
        sampler = make_sampler(self.sampler, sizes, self.epochs * per_epoch, ctx.generator,
                               **self.options)
        batches = {t.name: endless_batches(ctx, t) for t in ctx.tasks}
        by_name = {t.name: t for t in ctx.tasks}
        best = BestCheckpoint(ctx.run_dir / ADAPTER_FILE, ctx.method)
        for epoch in range(1, self.epochs + 1):
            ctx.model.train()
            for _ in tqdm(range(per_epoch), disable=not ctx.progress, leave=False,
                          desc=f"epoch {epoch}", dynamic_ncols=True):
                if self.pcgrad:
                    self.surgery_step(ctx, optimizer, batches, epoch)
                else:
                    task = by_name[sampler.sample(ctx.step)]
                    self.plain_step(ctx, optimizer, task, next(batches[task.name]), epoch)
            metrics, _ = evaluate(ctx, "dev")
            improved = best.update(ctx.model, metrics["dev/overall"], epoch)
            append_history(ctx.run_dir, {"epoch": epoch, "step": ctx.step, **metrics})
            ctx.logger.log({**metrics, "epoch": epoch}, step=ctx.step)
            log.info("epoch %d/%d: %s%s", epoch, self.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                     " (best so far)" if improved else "")
        best.restore(ctx.model)
        return FitResult(best.epoch, best.score)

    def plain_step(self, ctx: RunContext, optimizer, task, batch, epoch: int) -> None:
        loss = checked_loss(ctx, task, batch.to(ctx.device), epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(ctx, optimizer, self.max_grad_norm)
        record_loss(ctx, task, loss.item(), epoch)

    def surgery_step(self, ctx: RunContext, optimizer, batches: dict, epoch: int) -> None:
        """One batch of every task; their gradients combined by PCGrad."""
        params = [p for _, p in trainable_params(ctx.model)]
        losses = [checked_loss(ctx, t, next(batches[t.name]).to(ctx.device), epoch)
                  for t in ctx.tasks]
        combined = pcgrad(task_gradients(losses, params), ctx.generator)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, combined):
            p.grad = g
        optimizer_step(ctx, optimizer, self.max_grad_norm)
        for task, loss in zip(ctx.tasks, losses):
            record_loss(ctx, task, loss.item(), epoch)
