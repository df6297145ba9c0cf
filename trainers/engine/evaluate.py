"""Scoring a model: predictions for a split (with each task's own weights, merged for speed where
the PEFT method allows), the `task/split/metric` scores and the CS224N `split/overall`, and the
leaderboard prediction files. Shared by the training loop's epoch end, `finish` and the scripts
that score a saved run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.durable import write_text
from minbert.peft import merged
from tasks.base import Task, overall_score
from tasks.batching import EncodedSplit
from trainers.engine.context import RunContext, TaskWeights, autocast, shared_weights


@torch.inference_mode()
def predict(ctx: RunContext, task: Task, data: EncodedSplit) -> np.ndarray:
    """The task's predictions for every example of a split, in file order. The batches are cut
    in order of length (`EncodedSplit.length_order`: 2-2.6x fewer padded tokens on dev, and as
    much faster) and put back in file order. Data-parallel, each rank scores its eval batches
    (`ctx.parallel.mine`) and every rank gets all of them back, so each batch is the one a single
    process scores."""
    ctx.model.eval()
    size = ctx.settings.eval_batch_size
    n = data.num_batches(size)
    mine = {}
    for i in tqdm(ctx.parallel.mine(n), disable=not ctx.settings.progress,
                  desc=f"eval {data.split.name} {task.name}", leave=False, dynamic_ncols=True):
        with autocast(ctx):
            output = ctx.model(task.name, data.sorted_batch(i, size).to(ctx.settings.device))
        mine[i] = task.predict(output.float()).cpu()
    by_length = torch.cat(ctx.parallel.gather(mine, n))
    preds = torch.empty_like(by_length)
    preds[data.length_order()] = by_length
    return preds.numpy()


def predict_task(ctx: RunContext, task: Task, data: EncodedSplit,
                 weights: TaskWeights = shared_weights) -> np.ndarray:
    """`predict` with the task's own weights (`weights`: its expert, if the strategy keeps
    experts: `FitResult.weights`), merged into the base weights unless the method says
    `merge_eval: false`."""
    with weights(task.name), merged(ctx.model, ctx.merge_eval):
        return predict(ctx, task, data)


def evaluate(ctx: RunContext, split: str = "dev", tasks: list[Task] | None = None,
             weights: TaskWeights = shared_weights
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Scores `tasks` (default: the run's) on a labelled split, each with its `weights`:
    `task/split/metric` keys plus `split/overall`."""
    metrics, preds = {}, {}
    tasks = ctx.tasks if tasks is None else tasks
    for task in tasks:
        data = ctx.data[split][task.name]
        preds[task.name] = predict_task(ctx, task, data, weights)
        metrics.update(task.score(preds[task.name], data.labels.numpy(), split))
    if split == "dev":
        metrics["dev/overall"] = overall_score(tasks, metrics)
    return metrics, preds


def write_predictions(run_dir: Path, task: Task, split: str, ids: list[str], preds,
                      name: str | None = None) -> Path:
    """Writes the CS224N leaderboard format, `id \\t Predicted_X` then `id , prediction` lines
    (class ids as integers, scores with six decimals), to `<run_dir>/predictions/<task>-<split>-output.csv`, or to `<run_dir>/<name>` if named;
    atomically, like every file a run writes."""
    default = f"predictions/{task.name}-{split}-output.csv"
    lines = [f"id \t {task.prediction_column} \n"]
    lines += [f"{example_id} , {task.format_prediction(p)} \n" for example_id, p in zip(ids, preds)]
    return write_text(Path(run_dir) / (name or default), "".join(lines))
