"""The loop every trainer strategy shares: train one task for one pass over its data, evaluate
on a split, keep the best state on disk, write predictions. A strategy decides which task trains
when and which weights score each task: its `fit` returns a `FitResult` whose `weights(task)`
puts that task's weights in the model for the duration of a `with` (one shared model for the
sequential and interleaved strategies; an expert, or a merge of experts, for the expert ones).
"""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm.auto import tqdm

from minbert.errors import TrainingError
from minbert.peft import merged, trainable_params
from minbert.peft.io import load_adapter, method_metadata, save_adapter
from tasks.base import Task, overall_score
from tasks.batching import EncodedSplit
from tasks.model import MultitaskModel

log = logging.getLogger(__name__)


TaskWeights = Callable[[str], ContextManager]  # task name -> a context holding its weights


def shared_weights(task: str) -> ContextManager:
    """One model for every task: nothing to swap."""
    return nullcontext()


@dataclass
class FitResult:
    """What a strategy's `fit` returns: the best epoch and its dev/overall, the weights that score
    each task, and (strategies that train several experts) the parameter counts over all of them."""

    best_epoch: int | None
    score: float
    weights: TaskWeights = shared_weights
    param_counts: dict | None = None


@dataclass
class RunContext:
    """Everything a trainer needs from the run: model, data, where to write, how to log."""

    model: MultitaskModel
    tasks: list[Task]  # in the configured order
    data: dict[str, dict[str, EncodedSplit]]  # split -> task -> encoded split
    run_dir: Path
    logger: object
    batch_size: int = 32
    eval_batch_size: int = 128
    device: torch.device = torch.device("cpu")
    progress: bool = True
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    method: object = None  # the PEFT method: its `merge_eval` and its config for adapter files
    state_bits: int = 32  # optim.state_bits: 8 stores optimizer moments block-wise in 8 bits
    optimizer: object = None  # set by the trainer, read for memory accounting
    weights: TaskWeights = shared_weights  # which weights score each task (FitResult.weights)
    step: int = 0
    losses: list = field(default_factory=list)  # (step, task, loss) for the plots


def param_groups(model: MultitaskModel, head_lr: float | None = None) -> list[dict]:
    """The optimizer's groups: encoder parameters at the optimizer's lr, and the freshly
    initialised task heads at `head_lr` (None: the same lr, the report's single-lr recipe)."""
    encoder = [p for _, p in trainable_params(model.encoder)]
    heads = [p for _, p in trainable_params(model.heads)]
    groups = [g for g in ({"params": encoder}, {"params": heads}) if g["params"]]
    if head_lr is not None and heads:
        groups[-1]["lr"] = head_lr
    return groups


def checked_loss(ctx: RunContext, task: Task, batch, epoch: int) -> torch.Tensor:
    """The task's loss on one batch; a non-finite loss stops the run with what to do."""
    loss = task.loss(ctx.model(task.name, batch), batch.labels)
    if not torch.isfinite(loss):
        raise TrainingError(_non_finite_message(ctx, task, epoch, loss.item()))
    return loss


def optimizer_step(ctx: RunContext, optimizer, max_grad_norm: float | None) -> None:
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable_params(ctx.model)], max_grad_norm)
    optimizer.step()
    ctx.step += 1


def record_loss(ctx: RunContext, task: Task, value: float, epoch: int) -> None:
    ctx.losses.append((ctx.step, task.name, value))
    ctx.logger.log({f"{task.name}/train/loss": value, "epoch": epoch}, step=ctx.step)


def train_task_epoch(ctx: RunContext, task: Task, optimizer, epoch: int,
                     max_grad_norm: float | None = None) -> float:
    """One pass over `task`'s training data; returns the mean loss. Stops on a non-finite loss."""
    model, data = ctx.model, ctx.data["train"][task.name]
    model.train()
    total, bar = 0.0, tqdm(data.batches(ctx.batch_size, shuffle=True, generator=ctx.generator),
                           total=data.num_batches(ctx.batch_size), disable=not ctx.progress,
                           desc=f"epoch {epoch} {task.name}", leave=False, dynamic_ncols=True)
    for n, batch in enumerate(bar, 1):
        loss = checked_loss(ctx, task, batch.to(ctx.device), epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(ctx, optimizer, max_grad_norm)
        total += loss.item()
        record_loss(ctx, task, loss.item(), epoch)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(1, data.num_batches(ctx.batch_size))


def _non_finite_message(ctx: RunContext, task: Task, epoch: int, value: float) -> str:
    best, history = ctx.run_dir / ADAPTER_FILE, ctx.run_dir / "history.jsonl"
    kept = (f"The best state so far is kept in {best} and the per-epoch scores in {history}. "
            if best.exists() else "No epoch had finished, so there is no checkpoint yet. ")
    return (f"the {task.name} loss became {value} at epoch {epoch}, step {ctx.step + 1}. {kept}"
            "Try a lower trainer.optimizer.lr or trainer.head_lr, or set trainer.max_grad_norm=1.0.")


@torch.inference_mode()
def predict(ctx: RunContext, task: Task, data: EncodedSplit) -> np.ndarray:
    """The task's predictions for every example of a split, in file order."""
    ctx.model.eval()
    out = []
    for batch in tqdm(data.batches(ctx.eval_batch_size), total=data.num_batches(ctx.eval_batch_size),
                      disable=not ctx.progress, desc=f"eval {data.split.name} {task.name}",
                      leave=False, dynamic_ncols=True):
        out.append(task.predict(ctx.model(task.name, batch.to(ctx.device))).float().cpu())
    return torch.cat(out).numpy()


def predict_task(ctx: RunContext, task: Task, data: EncodedSplit) -> np.ndarray:
    """`predict` with the task's own weights (`ctx.weights`: its expert, if the strategy keeps
    experts), merged into the base weights unless the method says `merge_eval: false`."""
    with ctx.weights(task.name), merged(ctx.model, getattr(ctx.method, "merge_eval", False)):
        return predict(ctx, task, data)


def evaluate(ctx: RunContext, split: str = "dev") -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scores every task on a labelled split: `task/split/metric` keys plus `split/overall`."""
    metrics, preds = {}, {}
    for task in ctx.tasks:
        data = ctx.data[split][task.name]
        preds[task.name] = predict_task(ctx, task, data)
        gold = data.labels.numpy()
        metrics[f"{task.name}/{split}/{task.metric}"] = task.score(preds[task.name], gold)
    if split == "dev":
        metrics["dev/overall"] = overall_score(ctx.tasks, metrics)
    return metrics, preds


ADAPTER_FILE = "adapter.safetensors"


def saved_weights(model: torch.nn.Module, run_dir: Path, tasks: list[str]) -> TaskWeights:
    """The weights a one-model strategy saved: its best state, in `adapter.safetensors`."""
    load_adapter(model, Path(run_dir) / ADAPTER_FILE)
    return shared_weights


class BestCheckpoint:
    """Keeps the state with the best dev score as the run's adapter file: every trainable
    parameter (heads included) plus the frozen tensors the method drew. The base weights never
    change, so with the base checkpoint that file is the whole model."""

    def __init__(self, path: Path, method=None):
        self.path, self.score, self.epoch = path, float("-inf"), None
        self.metadata = method_metadata(method) if method is not None else {}

    def update(self, model: torch.nn.Module, score: float, epoch: int) -> bool:
        if not score > self.score:
            return False
        save_adapter(model, self.path, {**self.metadata, "score": score, "epoch": epoch})
        self.score, self.epoch = score, epoch
        return True

    def restore(self, model: torch.nn.Module) -> None:
        if self.epoch is None:
            return
        load_adapter(model, self.path)
        log.info("restored the best state (epoch %d, dev/overall %.4f)", self.epoch, self.score)


def append_history(run_dir: Path, record: dict) -> None:
    with open(run_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def write_predictions(run_dir: Path, task: Task, split: str, ids: list[str], preds,
                      name: str | None = None) -> Path:
    """Writes the CS224N leaderboard format: `id \\t Predicted_X` then `id , prediction` lines,
    to `<run_dir>/predictions/<task>-<split>-output.csv`, or to `<run_dir>/<name>` if named."""
    default = f"predictions/{task.name}-{split.removesuffix('-student')}-output.csv"
    out = Path(run_dir) / (name or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = (lambda v: f"{v:.6f}") if task.metric == "pearson" else (lambda v: f"{int(v)}")
    with open(out, "w") as f:
        f.write(f"id \t {task.prediction_column} \n")
        for example_id, p in zip(ids, preds):
            f.write(f"{example_id} , {fmt(p)} \n")
    return out
