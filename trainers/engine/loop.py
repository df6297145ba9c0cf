"""The one training loop every strategy shares: one `train_step`, one dev scoring
(`trainers.engine.scoring.score_dev`: at epoch ends and every `trainer.eval_every_n_steps` steps, with
early stopping after `trainer.patience` evaluations without improvement), one driver (`train`)
that checkpoints, resumes and stops cleanly when asked to.

A strategy (`Strategy`: sequential, interleaved, the expert ones) is a schedule: it says which
phases the run has (one, or one per expert), what happens when a phase begins and ends, which
task's batch comes next (`next_step`, from the task streams' cursors in the `TrainState`, so a
resumed run draws exactly the batches an uninterrupted one would), and where the best state of a
phase is kept. `train` returns the strategy's `FitResult`: the best epoch and score, and
`weights(task)`, the context in which the model holds the weights that score a task.

A PEFT method may hook into training with optional methods (torchtune's capabilities): an extra
loss term `extra_loss(model)` (AdaLoRA's orthogonality penalty), `start_training(model,
total_steps, generator)` when a phase begins (AdaLoRA's fresh budget, DyLoRA's first rank),
`after_step(model, step, total_steps, generator)` after each optimizer step, the gradients still
there (AdaLoRA's rank allocation, DyLoRA's rank sampling; `step` counts from 0 within the phase,
`generator` is the run's), `param_groups(model, groups)` for its optimizer groups
(trainers.engine.optim), and `state_dict()` / `load_state_dict()` for its own state in checkpoints.
"""
from __future__ import annotations

import logging
import os
import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from common.errors import ConfigError, MinbertError, TrainingError
from minbert.peft import trainable_params
from minbert.peft.io import load_adapter, method_metadata, save_adapter
from tasks.base import Task
from tasks.model import MultitaskModel
from common.durable import fault_point
from trainers.engine.evaluate import RunContext, TaskWeights, autocast, shared_weights
from trainers.strategies.pcgrad import pcgrad, task_gradients
from trainers.engine.scoring import (HISTORY_FILE, evaluates_now, out_of_patience, score_dev,
                              write_history)
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


def param_groups(model: MultitaskModel, head_lr: float | None = None) -> list[dict]:
    """The optimizer's groups: encoder parameters at the optimizer's lr, and the freshly
    initialised task heads at `head_lr` (None: the same lr, the report's single-lr recipe)."""
    encoder = [p for _, p in trainable_params(model.encoder)]
    heads = [p for _, p in trainable_params(model.heads)]
    groups = [g for g in ({"params": encoder}, {"params": heads}) if g["params"]]
    if head_lr is not None and heads:
        groups[-1]["lr"] = head_lr
    return groups


def saved_weights(model: torch.nn.Module, run_dir: Path, tasks: list[str]) -> TaskWeights:
    """The weights a one-model strategy saved: its best state, in `adapter.safetensors`."""
    load_adapter(model, Path(run_dir) / ADAPTER_FILE)
    return shared_weights


def next_batch(ctx: RunContext, state: TrainState, task: Task, endless: bool = False):
    """The next training batch of `task`, or None at the end of its pass (`endless`: a new pass,
    freshly shuffled, starts instead). A pass draws its order from the run's generator."""
    data = ctx.data["train"][task.name]
    cursor = state.cursors.get(task.name)
    if cursor is not None and cursor.exhausted():
        del state.cursors[task.name]
        if not endless:
            return None
        cursor = None
    if cursor is None:
        cursor = state.cursors[task.name] = Cursor(torch.randperm(len(data),
                                                                  generator=ctx.generator))
    return data.collate(cursor.take(ctx.batch_size)).to(ctx.device)


class Strategy(ABC):
    """The options every strategy shares (the optimizer as a Hydra partial, epochs, the heads' lr,
    gradient clipping, the LR schedule, dev scoring every n steps and early stopping) and the
    defaults of a one-model, one-phase schedule."""

    load_weights = staticmethod(saved_weights)  # rebuilds a finished run (trainers.engine.record.load_run)
    pcgrad = False  # one batch of every task per step, gradients combined by PCGrad

    def __init__(self, optimizer: Callable, epochs: int = 10, head_lr: float | None = None,
                 max_grad_norm: float | None = None, scheduler: str = "constant",
                 warmup_ratio: float = 0.0, eval_every_n_steps: int | None = None,
                 patience: int | None = None):
        from trainers.engine.optim import check_scheduler

        if epochs < 1:
            raise ConfigError(f"trainer.epochs={epochs} must be at least 1")
        for key, value in (("eval_every_n_steps", eval_every_n_steps), ("patience", patience)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"trainer.{key}={value!r} must be a whole number >= 1, or null "
                                  "(eval_every_n_steps: at epoch ends only; patience: no early "
                                  "stopping)")
        check_scheduler(scheduler, warmup_ratio)
        self.optimizer, self.epochs, self.head_lr = optimizer, epochs, head_lr
        self.max_grad_norm, self.scheduler, self.warmup_ratio = max_grad_norm, scheduler, warmup_ratio
        self.eval_every_n_steps, self.patience = eval_every_n_steps, patience

    def phases(self, ctx: RunContext) -> list[list[Task]]:
        """The tasks each phase trains and scores: one phase over every task."""
        return [list(ctx.tasks)]

    def start(self, ctx: RunContext) -> None:
        """Once per process, before any phase begins or any checkpoint is loaded."""

    def begin_phase(self, ctx: RunContext, state: TrainState, index: int) -> None:
        """Builds the phase's optimizer, LR schedule (over the phase's steps: the whole run, or
        one expert) and fp16 gradient scaler, and tells the method a phase of training begins."""
        from trainers.engine.optim import build_optimizer, build_scheduler
        total = self.steps_per_epoch(ctx, self.phases(ctx)[index]) * self.epochs
        state.optimizer = build_optimizer(self.optimizer, ctx.model, self.head_lr, ctx.method,
                                          ctx.state_bits)
        state.scheduler = build_scheduler(self.scheduler, state.optimizer, total,
                                          self.warmup_ratio)
        if ctx.precision == "fp16":
            if self.pcgrad:
                raise ConfigError("precision=fp16 with trainer.pcgrad=true: PCGrad combines "
                                  "unscaled task gradients; use precision=bf16 or fp32")
            state.scaler = torch.amp.GradScaler(ctx.device.type)
        start = getattr(ctx.method, "start_training", None)
        if start:
            start(ctx.model, total, ctx.generator)

    def steps_per_epoch(self, ctx: RunContext, tasks: list[Task]) -> int:
        return sum(ctx.data["train"][t.name].num_batches(ctx.batch_size) for t in tasks)

    @abstractmethod
    def next_step(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> Step | None:
        """The next step's (task, batch) pairs, or None when the epoch is over."""

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None:
        """Keeps the model's state as the phase's best (the adapter file)."""
        save_adapter(ctx.model, ctx.run_dir / ADAPTER_FILE,
                     {**method_metadata(ctx.method), "score": state.best_score,
                      "epoch": state.best_epoch, "step": state.best_step})

    def end_phase(self, ctx: RunContext, state: TrainState, index: int) -> None:
        """After a phase's last epoch."""

    def fit(self, ctx: RunContext) -> FitResult:
        """Trains from the start in this process (`trainers.engine.run.run` adds resuming and the run's
        files of record)."""
        state = TrainState(ctx.model, ctx.generator, ctx.method)
        self.start(ctx)
        self.begin_phase(ctx, state, 0)
        with StopSignals() as stop:
            return train(self, ctx, state, stop)

    def result(self, ctx: RunContext, state: TrainState) -> FitResult:
        """The best state back in the model, once every phase has trained."""
        if state.best_epoch is not None:
            load_adapter(ctx.model, ctx.run_dir / ADAPTER_FILE)
            log.info("restored the best state (epoch %d, dev/overall %.4f)", state.best_epoch,
                     state.best_score)
        return FitResult(state.best_epoch, state.best_score)


def checked_loss(ctx: RunContext, state: TrainState, task: Task, batch) -> torch.Tensor:
    """The task's loss on one batch (the forward in the run's precision, the loss in fp32); a
    non-finite loss stops the run with what to do."""
    with autocast(ctx):
        output = ctx.model(task.name, batch)
    loss = task.loss(output.float(), batch.labels)
    if not torch.isfinite(loss):
        raise TrainingError(_non_finite_message(ctx, state, task, loss.item()))
    return loss


def _non_finite_message(ctx: RunContext, state: TrainState, task: Task, value: float) -> str:
    best, history = ctx.run_dir / ADAPTER_FILE, ctx.run_dir / HISTORY_FILE
    kept = (f"The best state so far is kept in {best} and the per-epoch scores in {history}. "
            if best.exists() else "No epoch had finished, so there is no best state yet. ")
    return (f"the {task.name} loss became {value} at epoch {state.epoch}, step {state.step + 1}. "
            f"{kept}Try a lower trainer.optimizer.lr or trainer.head_lr, or set "
            "trainer.max_grad_norm=1.0.")


def _backward(ctx: RunContext, state: TrainState, step: Step) -> list[tuple[Task, float]]:
    """Gradients for one step: one task's loss, or several tasks' combined by PCGrad; plus the
    method's extra loss term. Returns each task's loss."""
    losses = [(task, checked_loss(ctx, state, task, batch)) for task, batch in step]
    extra = getattr(ctx.method, "extra_loss", None)
    state.optimizer.zero_grad(set_to_none=True)
    if len(losses) == 1:
        total = losses[0][1] + (extra(ctx.model) if extra else 0)
        (state.scaler.scale(total) if state.scaler is not None else total).backward()
    else:
        params = [p for _, p in trainable_params(ctx.model)]
        combined = pcgrad(task_gradients([l for _, l in losses], params), ctx.generator)
        for p, g in zip(params, combined):
            p.grad = g
        if extra:
            extra(ctx.model).backward()
    return [(task, loss.item()) for task, loss in losses]


def train_step(ctx: RunContext, state: TrainState, step: Step, max_grad_norm: float | None,
               total_steps: int) -> None:
    """One optimizer step: forward, backward, clip, step, the LR schedule and the method's hook,
    then the losses recorded for the history, the plots and the logger."""
    losses = _backward(ctx, state, step)
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)  # clipping sees the true gradients
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable_params(ctx.model)], max_grad_norm)
    if state.scaler is not None:
        state.scaler.step(state.optimizer)  # skipped where fp16 overflowed
        state.scaler.update()
    else:
        state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    state.step, state.phase_step, state.epoch_step = (state.step + 1, state.phase_step + 1,
                                                      state.epoch_step + 1)
    after = getattr(ctx.method, "after_step", None)
    if after:
        after(ctx.model, state.phase_step - 1, total_steps, ctx.generator)
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

    def hand_on(self, run_dir: Path) -> None:
        signum, handler = self.received, self.previous.get(self.received)
        self.__exit__()
        if callable(handler):
            handler(signum, None)  # submitit: requeue this job, then exit
        raise Preempted(f"stopped by {signal.Signals(signum).name} after a checkpoint; continue "
                        f"with: python train.py <the same overrides> resume={run_dir}")


def train(strategy: Strategy, ctx: RunContext, state: TrainState, stop: StopSignals) -> FitResult:
    """Runs the strategy's phases from wherever `state` is, checkpointing every
    `ctx.checkpoint_every` steps and at every epoch end, scoring dev at epoch ends and every
    `strategy.eval_every_n_steps` steps, and ending a phase early when out of patience."""
    phases = strategy.phases(ctx)
    while not state.done:
        tasks = phases[state.phase]
        per_epoch = strategy.steps_per_epoch(ctx, tasks)
        label = {"expert": tasks[0].name} if len(phases) > 1 else {}
        bar = tqdm(total=per_epoch, initial=state.epoch_step, disable=not ctx.progress,
                   leave=False, dynamic_ncols=True, desc=f"epoch {state.epoch}")
        ctx.model.train()
        early = False
        while (step := strategy.next_step(ctx, state, tasks)) is not None:
            train_step(ctx, state, step, strategy.max_grad_norm, per_epoch * strategy.epochs)
            bar.update(1)
            if evaluates_now(strategy, state, per_epoch):
                score_dev(ctx, state, strategy, tasks, label, mid_epoch=True)
                ctx.model.train()  # evaluation left it in eval mode
                if early := out_of_patience(ctx, state, strategy, label):
                    break
            if (ctx.checkpoint_every and state.step % ctx.checkpoint_every == 0) or stop.pending():
                save_checkpoint(state, ctx.run_dir, ctx.checkpoint_keep)
                if stop.pending():
                    stop.hand_on(ctx.run_dir)
        bar.close()
        if not early:
            score_dev(ctx, state, strategy, tasks, label)
            early = out_of_patience(ctx, state, strategy, label)
        _advance(strategy, ctx, state, len(phases), early)
        save_checkpoint(state, ctx.run_dir, ctx.checkpoint_keep)
        if stop.pending():
            stop.hand_on(ctx.run_dir)
    return strategy.result(ctx, state)


def _advance(strategy: Strategy, ctx: RunContext, state: TrainState, n_phases: int,
             early: bool = False) -> None:
    """To the next epoch, or past the phase's last one (or out of patience: `early`) to the next
    phase (or the end)."""
    state.epoch, state.slot, state.epoch_step, state.epoch_losses = state.epoch + 1, 0, 0, {}
    if state.epoch <= strategy.epochs and not early:
        return
    strategy.end_phase(ctx, state, state.phase)
    state.phase, state.epoch, state.phase_step = state.phase + 1, 1, 0
    if state.phase < n_phases:  # a new phase keeps its own best (an expert's)
        state.best_score, state.best_epoch, state.best_step = float("-inf"), None, None
        state.evals_since_best, state.cursors = 0, {}
        strategy.begin_phase(ctx, state, state.phase)
    else:
        state.done = True
