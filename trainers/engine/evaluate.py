"""Scoring a model: predictions for a split (with each task's own weights, merged for speed where
the PEFT method allows), the `task/split/metric` scores and the CS224N `split/overall`, and the
leaderboard prediction files. Shared by the training loop's epoch end, `finish` and the scripts
that score a saved run."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from tqdm.auto import tqdm

from common.durable import write_text
from minbert.peft import merged
from tasks.base import Task, overall_score
from tasks.batching import EncodedSplit
from tasks.model import MultitaskModel
from trainers.engine.precision import PRECISIONS

TaskWeights = Callable[[str], ContextManager]  # task name -> a context holding its weights


def shared_weights(task: str) -> ContextManager:
    """One model for every task: nothing to swap."""
    return nullcontext()


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
    method: object = None  # the PEFT method: its `merge_eval`, hooks and config for adapter files
    state_bits: int = 32  # optim.state_bits: 8 stores optimizer moments block-wise in 8 bits
    weights: TaskWeights = shared_weights  # which weights score each task (FitResult.weights)
    checkpoint_every: int = 0  # checkpoint.every_n_steps (0: at epoch ends only)
    checkpoint_keep: int = 2  # checkpoint.keep
    precision: str = "fp32"  # fp32 | bf16 | fp16 (auto resolved: trainers.engine.precision)


def autocast(ctx: "RunContext"):
    """The context forwards run in: mixed precision (autocast to `ctx.precision`, the weights,
    gradients and optimizer states staying fp32), or nothing for fp32."""
    dtype = PRECISIONS[ctx.precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(ctx.device.type, dtype=dtype)


@torch.inference_mode()
def predict(ctx: RunContext, task: Task, data: EncodedSplit) -> np.ndarray:
    """The task's predictions for every example of a split, in file order."""
    ctx.model.eval()
    out = []
    for batch in tqdm(data.batches(ctx.eval_batch_size), total=data.num_batches(ctx.eval_batch_size),
                      disable=not ctx.progress, desc=f"eval {data.split.name} {task.name}",
                      leave=False, dynamic_ncols=True):
        with autocast(ctx):
            output = ctx.model(task.name, batch.to(ctx.device)).float()
        out.append(task.predict(output).cpu())
    return torch.cat(out).numpy()


def predict_task(ctx: RunContext, task: Task, data: EncodedSplit) -> np.ndarray:
    """`predict` with the task's own weights (`ctx.weights`: its expert, if the strategy keeps
    experts), merged into the base weights unless the method says `merge_eval: false`."""
    with ctx.weights(task.name), merged(ctx.model, getattr(ctx.method, "merge_eval", False)):
        return predict(ctx, task, data)


def evaluate(ctx: RunContext, split: str = "dev", tasks: list[Task] | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scores `tasks` (default: the run's) on a labelled split: `task/split/metric` keys plus
    `split/overall`."""
    metrics, preds = {}, {}
    tasks = ctx.tasks if tasks is None else tasks
    for task in tasks:
        data = ctx.data[split][task.name]
        preds[task.name] = predict_task(ctx, task, data)
        metrics.update(task.score(preds[task.name], data.labels.numpy(), split))
    if split == "dev":
        metrics["dev/overall"] = overall_score(tasks, metrics)
    return metrics, preds


def write_predictions(run_dir: Path, task: Task, split: str, ids: list[str], preds,
                      name: str | None = None) -> Path:
    """Writes the CS224N leaderboard format: `id \\t Predicted_X` then `id , prediction` lines
(class ids as integers, scores with six decimals),
    to `<run_dir>/predictions/<task>-<split>-output.csv`, or to `<run_dir>/<name>` if named;
    atomically, like every file a run writes."""
    default = f"predictions/{task.name}-{split}-output.csv"
    lines = [f"id \t {task.prediction_column} \n"]
    lines += [f"{example_id} , {task.format_prediction(p)} \n" for example_id, p in zip(ids, preds)]
    return write_text(Path(run_dir) / (name or default), "".join(lines))
