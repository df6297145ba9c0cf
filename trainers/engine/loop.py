"""The one training loop every strategy shares: one `train_step`, one dev scoring
(`trainers.engine.scoring.score_dev`: at epoch ends and every `trainer.eval_every_n_steps` steps,
with early stopping after `trainer.patience` evaluations without improvement), one driver
(`train`) that checkpoints, resumes and stops cleanly when asked to.

The loop knows a strategy only by the `TrainingStrategy` Protocol: its options, its phases, the
next step's (task, batch) pairs, what a phase's beginning does, where a phase's best state
is kept, its gradient combiner, and its result. `trainers.strategies.strategy.Strategy` composes
those from parts (phases, schedule, combiner, finisher). `train` returns the strategy's
`FitResult`: the best epoch and score, and `weights(task)`, the context in which the model holds
the weights that score a task.

A PEFT method takes part through its declared `TrainingHooks` (`minbert.peft.contract`), adapted
once when the run is built (`ctx.hooks`) and called unconditionally: `extra_loss` with each
step's loss, `after_step` after each optimizer step (the gradients still there).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from common.durable import fault_point
from common.errors import MinbertError, TrainingError
from minbert.peft import trainable_params
from tasks.base import Task
from trainers.engine.context import RunContext, TaskWeights, autocast, shared_weights
from trainers.engine.scoring import (HISTORY_FILE, evaluates_now, out_of_patience, score_dev)
from trainers.engine.state import Cursor, TrainState, save_checkpoint

log = logging.getLogger(__name__)
ADAPTER_FILE = "adapter.safetensors"
Step = list[tuple[Task, object]]  # the (task, batch) pairs of one optimizer step


@dataclass
class FitResult:
    """What a strategy's run returns: the best epoch and its dev/overall, the weights that score
    each task, and (strategies that train several experts) the parameter counts over all of them."""

    best_epoch: int | None
    score: float
    weights: TaskWeights = shared_weights
    param_counts: dict | None = None


def next_batch(ctx: RunContext, state: TrainState, task: Task, endless: bool = False):
    """The next training batch of `task`, or None at the end of its pass (`endless`: a new pass,
    freshly shuffled, starts instead). A pass draws its order from the run's generator."""
    data, size = ctx.data["train"][task.name], ctx.settings.batch_size
    cursor = state.cursors.get(task.name)
    if cursor is not None and cursor.exhausted():
        del state.cursors[task.name]
        if not endless:
            return None
        cursor = None
    if cursor is None:
        cursor = state.cursors[task.name] = Cursor(torch.randperm(len(data),
                                                                  generator=ctx.generator))
    return data.collate(cursor.take(size)).to(ctx.settings.device)


@runtime_checkable
class TrainingStrategy(Protocol):
    """What the loop asks of a strategy (`trainers.strategies.strategy.Strategy` composes it)."""

    options: object  # its TrainOptions: epochs, max_grad_norm, eval_every_n_steps, patience, ...
    combiner: object  # combines several tasks' gradients (trainers.strategies.combiners)

    def phases(self, ctx: RunContext) -> list[list[Task]]: ...

    def start(self, ctx: RunContext, state: TrainState) -> None: ...

    def phase_label(self, tasks: list[Task]) -> dict:
        """What a phase's history records carry (an expert's: `{"expert": task}`)."""
        ...

    def steps_per_epoch(self, ctx: RunContext, tasks: list[Task]) -> int: ...

    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> Step | None: ...

    def begin_phase(self, ctx: RunContext, state: TrainState, index: int) -> None: ...

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None: ...

    def result(self, ctx: RunContext, state: TrainState) -> FitResult: ...


def share_loss(ctx: RunContext, task: Task, batch, synced: bool = True) -> torch.Tensor:
    """This process's part of the task's mean loss on a (global) batch: its share of the examples
    (`ctx.parallel.share`; one process: the whole batch), the forward in the run's precision
    (through DDP's wrapper when `synced`), the loss in fp32, weighted by the share's fraction of
    the batch, so that the parts summed over the ranks are the batch's mean loss. `Task.loss` is
    a mean over the batch."""
    local, weight = ctx.parallel.share(batch)
    model = ctx.parallel.module(ctx.model) if synced else ctx.model
    with autocast(ctx):
        output = model(task.name, local)
    loss = task.loss(output.float(), local.labels)
    return loss if weight == 1.0 else loss * weight


def _non_finite_message(ctx: RunContext, state: TrainState, task: Task, value: float) -> str:
    best, history = ctx.run_dir / ADAPTER_FILE, ctx.run_dir / HISTORY_FILE
    kept = (f"The best state so far is kept in {best} and the per-epoch scores in {history}. "
            if best.exists() else "No epoch had finished, so there is no best state yet. ")
    return (f"the {task.name} loss became {value} at epoch {state.epoch}, step {state.step + 1}. "
            f"{kept}Try a lower trainer.optimizer.lr or trainer.head_lr, or set "
            "trainer.max_grad_norm=1.0.")


def _backward(ctx: RunContext, state: TrainState, step: Step,
              combiner) -> list[tuple[Task, float]]:
    """Gradients for one step: one task's loss, or several tasks' combined by the strategy's
    combiner (PCGrad, GradVac, ...); plus the method's extra loss term. Returns each task's
    loss on the whole batch (summed over the ranks); a non-finite one stops the run with what to
    do. Data-parallel: one task's backward runs through DDP, which averages the ranks' gradients
    (so each rank's part is scaled by the number of ranks); several tasks' gradients are summed
    over the ranks before the combiner sees them."""
    synced = len(step) == 1
    losses = [(task, share_loss(ctx, task, batch, synced)) for task, batch in step]
    values = ctx.parallel.sum([loss for _, loss in losses])
    for (task, _), value in zip(losses, values):
        if not math.isfinite(value):
            raise TrainingError(_non_finite_message(ctx, state, task, value))
    state.optimizer.zero_grad(set_to_none=True)
    world = ctx.parallel.world
    if synced:
        extra = ctx.hooks.extra_loss(ctx.model)
        total = losses[0][1] * world if world > 1 else losses[0][1]
        total = total + (extra if extra is not None else 0)
        (state.scaler.scale(total) if state.scaler is not None else total).backward()
    else:
        params = [p for _, p in trainable_params(ctx.model)]
        grads = ctx.parallel.sum_gradients(task_gradients([l for _, l in losses], params))
        combined = combiner.combine(grads, ctx.generator)
        for p, g in zip(params, combined):
            p.grad = g
        extra = ctx.hooks.extra_loss(ctx.model)
        if extra is not None:
            extra.backward()
    return [(task, value) for (task, _), value in zip(losses, values)]


def task_gradients(losses: list[torch.Tensor],
                   params: list[torch.Tensor]) -> list[list[torch.Tensor | None]]:
    """Per-task gradients of `losses` w.r.t. `params` (None where a loss does not reach a
    parameter), for a combiner. The graph is kept until the last loss, so losses may share a
    forward pass."""
    return [list(torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1,
                                     allow_unused=True))
            for i, loss in enumerate(losses)]


def train_step(ctx: RunContext, state: TrainState, step: Step, strategy: TrainingStrategy,
               total_steps: int) -> None:
    """One optimizer step: forward, backward, clip, step, the LR schedule and the method's hook,
    then the losses recorded for the history, the plots and the logger."""
    losses = _backward(ctx, state, step, strategy.combiner)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)  # clipping sees the true gradients
    if strategy.options.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable_params(ctx.model)],
                                       strategy.options.max_grad_norm)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)  # skipped where fp16 overflowed
        state.scaler.update()
    else:
        state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    state.step, state.phase_step, state.epoch_step = (state.step + 1, state.phase_step + 1,
                                                      state.epoch_step + 1)
    ctx.hooks.after_step(ctx.model, state.phase_step - 1, total_steps, ctx.generator)
    lr = state.optimizer.param_groups[0]["lr"]  # the encoder's, after this step's schedule
    for task, value in losses:
        total, count = state.epoch_losses.get(task.name, (0.0, 0))
        state.epoch_losses[task.name] = [total + value, count + 1]
        state.losses.append((state.step, task.name, value))
        ctx.logger.log({f"{task.name}/train/loss": value, "train/lr": lr, "epoch": state.epoch},
                       step=state.step)
    fault_point("step")


class Preempted(MinbertError):
    """The run was asked to stop (a cluster's preemption signal, SIGTERM) and stopped at a step
    boundary after writing a checkpoint."""


class StopSignals:
    """`with StopSignals() as stop:` records SIGTERM and the preemption signal (submitit's, USR2
    unless SUBMITIT_PREEMPT_SIGNAL says otherwise) instead of dying mid-step; `stop.check()` at a
    step boundary, after a checkpoint, hands the signal on: to the handler that was there before
    (submitit's, which requeues the job) or, if none, ends the run with `Preempted`."""

    def __init__(self):
        name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        self.signals = {signal.SIGTERM, getattr(signal, name, signal.SIGUSR2)}
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _record(self, signum, frame) -> None:
        log.warning("caught %s: stopping at the next step boundary, after a checkpoint",
                    signal.Signals(signum).name)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def pending(self) -> bool:
        return self.received is not None

    def hand_on(self, run_dir: Path, parallel=None) -> None:
        """After the checkpoint: to the handler that was there (submitit's requeues the job from
        rank 0 and exits), then `Preempted`. A rank that got no signal of its own stops because
        another did; every rank waits for the others first (a barrier that ends when all reach
        it, or when rank 0 has exited)."""
        signum = self.received if self.received is not None else signal.SIGTERM
        handler = self.previous.get(signum)
        self.__exit__()
        if callable(handler):
            handler(signum, None)  # submitit: requeue this job, then exit
        if parallel is not None:
            with contextlib.suppress(Exception):  # rank 0 exited (requeued): the group is gone
                parallel.barrier()
        raise Preempted(f"stopped by {signal.Signals(signum).name} after a checkpoint; continue "
                        f"with: python train.py <the same overrides> resume={run_dir}")


def train(strategy: TrainingStrategy, ctx: RunContext, state: TrainState,
          stop: StopSignals) -> FitResult:
    """Runs the strategy's phases from wherever `state` is, checkpointing every
    `checkpoint.every_n_steps` steps and at every epoch end, scoring dev at epoch ends and every
    `trainer.eval_every_n_steps` steps, and ending a phase early when out of patience."""
    phases, epochs = strategy.phases(ctx), strategy.options.epochs
    while not state.done:
        tasks = phases[state.phase]
        per_epoch = strategy.steps_per_epoch(ctx, tasks)
        label = strategy.phase_label(tasks)
        bar = tqdm(total=per_epoch, initial=state.epoch_step, disable=not ctx.settings.progress,
                   leave=False, dynamic_ncols=True, desc=f"epoch {state.epoch}")
        ctx.model.train()
        early = False
        while (step := strategy.next_step(ctx, state, tasks)) is not None:
            start = time.perf_counter()
            train_step(ctx, state, step, strategy, per_epoch * epochs)
            state.throughput[0] += sum(len(batch) for _, batch in step)  # the global batch
            state.throughput[1] += time.perf_counter() - start
            bar.update(1)
            if evaluates_now(strategy.options, state, per_epoch):
                score_dev(ctx, state, strategy, tasks, label, mid_epoch=True)
                ctx.model.train()  # evaluation left it in eval mode
                if early := out_of_patience(ctx, state, strategy.options, label):
                    break
            every = ctx.settings.checkpoint_every
            stopping = ctx.parallel.any(stop.pending())  # a signal to any rank stops them all
            if (every and state.step % every == 0) or stopping:
                _checkpoint(ctx, state, stop, stopping)
        bar.close()
        if not early:
            score_dev(ctx, state, strategy, tasks, label)
            early = out_of_patience(ctx, state, strategy.options, label)
        _advance(strategy, ctx, state, len(phases), early)
        _checkpoint(ctx, state, stop)
    return strategy.result(ctx, state)


def fit(strategy: TrainingStrategy, ctx: RunContext) -> FitResult:
    """Trains from the start in this process and returns the result (`trainers.engine.run.run`
    adds resuming and the run's files of record)."""
    state = TrainState()
    strategy.start(ctx, state)
    strategy.begin_phase(ctx, state, 0)
    with StopSignals() as stop:
        return train(strategy, ctx, state, stop)


def _checkpoint(ctx: RunContext, state: TrainState, stop: StopSignals,
                stopping: bool | None = None) -> None:
    """Checks that the ranks agree, writes a checkpoint (every rank's generators in it), then
    hands on a stop signal if one came (to any rank: `stopping`)."""
    ctx.parallel.check_in_sync(ctx.model, state)
    save_checkpoint(state, ctx.model, ctx.generator, ctx.run_dir, ctx.settings.checkpoint_keep,
                    ctx.parallel)
    if ctx.parallel.any(stop.pending()) if stopping is None else stopping:
        stop.hand_on(ctx.run_dir, ctx.parallel)


def _advance(strategy: TrainingStrategy, ctx: RunContext, state: TrainState, n_phases: int,
             early: bool = False) -> None:
    """To the next epoch, or past the phase's last one (or out of patience: `early`) to the next
    phase (or the end)."""
    state.epoch, state.slot, state.epoch_step, state.epoch_losses = state.epoch + 1, 0, 0, {}
    if state.epoch <= strategy.options.epochs and not early:
        return
    state.phase, state.epoch, state.phase_step = state.phase + 1, 1, 0
    if state.phase < n_phases:  # a new phase keeps its own best (an expert's)
        state.best_score, state.best_epoch, state.best_step = float("-inf"), None, None
        state.evals_since_best, state.cursors = 0, {}
        strategy.begin_phase(ctx, state, state.phase)
    else:
        state.done = True
