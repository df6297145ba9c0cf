"""One experiment run, from a composed Hydra config to `metrics.json`: read the data (failing
early on bad input), build the encoder, apply the PEFT method, attach the task heads, train with
the configured strategy, then score the best state on dev and write leaderboard predictions.
`train.py` is a thin Hydra wrapper around `run`.

A run survives being killed: it holds a lock on its folder, checkpoints its whole `TrainState`
(trainers.engine.state), and, started again in the same folder, continues from the newest checkpoint and
ends bit-identical to an uninterrupted run; a finished run (its `metrics.json` there, same config)
returns its score without training. Every file is written atomically (common.durable), and
`metrics.json` last: it marks a finished run."""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from omegaconf import OmegaConf

from common.durable import RunLock, fault_point, write_json
from common.errors import ConfigError, DamagedFileError
from minbert.peft import param_counts
from tasks.data import load_task_data
from tasks.download import data_root
from trainers.engine.build import build_model, encode_data, seed_everything
from minbert.peft.contract import training_hooks
from trainers.engine.context import RunContext, Settings, TaskWeights
from trainers.engine.evaluate import evaluate, predict_task, write_predictions
from trainers.engine.loggers import NullLogger
from trainers.engine.loop import FitResult, StopSignals, train
from trainers.engine.parallel import Replicas, start as start_processes
from trainers.engine.scoring import write_history
from trainers.engine.memory import PeakMemory, memory_metrics
from trainers.engine.plots import plot_training
from trainers.engine.precision import resolve_precision, run_precision
from trainers.engine.recipe import Checked, checked
from trainers.engine.record import check_same_run, data_record, read_record, write_record
from trainers.engine.state import CHECKPOINTS, TrainState, load_checkpoint, restore_checkpoint
from trainers.engine.sweeps import ERROR_FILE

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def setup(cfg, run_dir: str | Path, precision: str | None = None,
          parallel: Replicas | None = None, device: torch.device | None = None):
    """Everything a run trains with, each part built once, in order, from a checked config
    (`cfg`: a `trainers.engine.recipe.Checked`, or a composed config checked here): the data
    read and checked, the model (encoder, PEFT method, heads), the tokenized data and the
    `RunContext`. Returns (the trainer, the logger, the context). `precision`: the one to compute
    in (None: `precision` resolved here); `parallel`, `device`: the run's processes and this one's
    device (`trainers.engine.parallel.start`; None: started here)."""
    run = checked(cfg)
    cfg, run_dir = run.cfg, Path(run_dir)
    if parallel is None:
        parallel, device = start_processes(run.device)
    check_batch(run.schema.data.batch_size, parallel)
    generator = seed_everything(run.schema.seed)
    data = run.schema.data
    raw = load_task_data(run.tasks, data_root(cfg, run.tasks), data.limit_train, data.limit_eval,
                         data.cache_dir, data.predict_test)
    if precision is None:
        precision, _ = resolve_precision(run.schema.precision, device)
    model = build_model(cfg, run.tasks, run.method).to(device)
    settings = Settings(run_dir, data.batch_size, data.eval_batch_size, device,
                        run.schema.progress and parallel.main, run.schema.optim.state_bits,
                        run.schema.checkpoint.every_n_steps, run.schema.checkpoint.keep,
                        precision)
    logger = run.logger if parallel.main else NullLogger()  # one W&B run: rank 0's
    ctx = RunContext(model, run.tasks, encode_data(cfg, model, raw), settings, logger, generator,
                     run.method, training_hooks(run.method), parallel)
    return run.trainer, logger, ctx


def check_batch(batch_size: int, parallel: Replicas) -> None:
    if batch_size < parallel.world:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch, shared by the run's "
                          f"{parallel.world} processes: give at least one example to each")


def preflight(run: Checked, run_dir: Path) -> dict | None:
    """What a run dir holds, read without writing anything: None for a new run, else its record
    (`run.json`), after checking it is this config's run. A command refused here has changed
    no file."""
    record = read_record(run_dir)
    if record is not None:
        check_same_run(run_dir, record, run.cfg, run.tasks)
    return record


def finished_score(run_dir: Path) -> float | None:
    """dev/overall of a finished run (its metrics.json), else None."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text())["dev/overall"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {e}); the run finished "
                               "but its scores cannot be read: delete metrics.json and run the "
                               "same command again to score its saved weights anew") from None


def run(cfg, run_dir: str | Path, parallel: Replicas | None = None,
        device: torch.device | None = None, invocation: Callable[[bool], dict] | None = None
        ) -> float:
    """Trains and evaluates one configuration (`cfg`: a `Checked` run, or a composed config,
    checked here), or continues it from its newest checkpoint; returns dev/overall, the sweep
    objective. Everything is checked, read and built before the first file is written; a
    finished run returns its score having written nothing. `invocation(resumed)`: called once
    all is built and checked, before training (`train.py` writes its Hydra files and opens
    train.log there); it returns the group choices and overrides that run.json keeps."""
    run, run_dir = checked(cfg), Path(run_dir)
    if parallel is None:
        parallel, device = start_processes(run.device)
    record = preflight(run, run_dir)
    score = finished_score(run_dir) if record is not None else None
    if score is not None:
        log.info("%s has finished already (dev/overall %.4f): nothing to do", run_dir, score)
        return score
    data = data_record(run_dir, record, run.cfg, run.tasks)  # changed data: refused here
    precision = run_precision(run.schema.precision, device, record)
    log.info("%s", precision[1])
    trainer, logger, ctx = setup(run, run_dir, precision[0], parallel, device)
    with RunLock(run_dir) if parallel.main else nullcontext():  # rank 0 holds the run
        record = preflight(run, run_dir)  # again, now that no other process can change it
        hydra = invocation(record is not None) if invocation is not None else None
        parallel.barrier()  # every rank has read the run's files before rank 0 writes any
        if parallel.main:
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a failed attempt's, now stale
        state = TrainState()
        resumed = restore(trainer, ctx, state, record is not None)
        wandb_id = logger.start(OmegaConf.to_container(run.cfg, resolve=True), run_dir,
                                (record or {}).get("wandb_id") if resumed else None)
        write_record(run_dir, run.cfg, ctx.tasks, wandb_id, precision, data, hydra)
        return train_and_finish(trainer, logger, ctx, state)


def restore(trainer, ctx: RunContext, state: TrainState, started: bool = False) -> bool:
    """Begins the run's phase: the first, or (from the newest readable checkpoint) the one the
    run was in, with every tensor, counter and generator as the checkpoint has them. Returns
    whether a checkpoint was loaded. `started`: the run dir holds a started run (its run.json),
    whose missing checkpoints are said before it starts again from step 0."""
    trainer.start(ctx, state)
    sd = load_checkpoint(ctx.run_dir)
    if sd is None and started:
        log.warning("%s holds a started run but no checkpoint (%s/ is empty or missing): it "
                    "starts again from step 0, and its history is written anew", ctx.run_dir,
                    CHECKPOINTS)
    if sd is not None:
        state.load_counters(sd["state"])
    trainer.begin_phase(ctx, state, min(state.phase, len(trainer.phases(ctx)) - 1))
    if sd is None:
        return False
    restore_checkpoint(sd, state, ctx.model, ctx.generator, ctx.parallel)
    write_history(ctx.run_dir, state.history)  # back to what the checkpoint knew
    return True


def train_and_finish(trainer, logger, ctx: RunContext, state: TrainState) -> float:
    counts = param_counts(ctx.model)
    log.info("parameters: %d trainable of %d (%.3f%%)", counts["params/trainable"],
             counts["params/total"], counts["params/updated_pct"])
    ok = False
    try:
        logger.log(counts, step=state.step)
        with PeakMemory(ctx.settings.device) as peak, StopSignals() as stop:
            result = train(trainer, ctx, state, stop)
        counts = result.param_counts or counts  # experts: every expert's tensors count
        memory = memory_metrics(ctx.model, state.optimizer, peak.bytes)
        measured = {**counts, **memory, **cost_metrics(ctx.run_dir, state)}
        metrics = finish(ctx, result, measured, state.losses)
        logger.summary(metrics)
        ok = True
    finally:
        logger.finish(ok)
    if ctx.parallel.main:  # finished: metrics.json says so
        shutil.rmtree(ctx.run_dir / CHECKPOINTS, ignore_errors=True)
    return metrics["dev/overall"]


def cost_metrics(run_dir: Path, state: TrainState) -> dict[str, float]:
    """What a run costs beside its parameters and memory: `train/examples_per_s`, training
    examples per second of optimizer steps (forward, backward, step; not evaluation or
    checkpoints), measured over the steps this process trained (a resumed run: since it resumed;
    absent if it trained none), and `adapter/file_bytes`, the size of the weights it saved
    (adapter.safetensors, or the experts' and merged files)."""
    examples, seconds = state.throughput
    out = {"train/examples_per_s": examples / seconds} if seconds > 0 else {}
    out["adapter/file_bytes"] = sum(p.stat().st_size for p in run_dir.rglob("*.safetensors"))
    return out


def method_reports(ctx: RunContext, weights: TaskWeights) -> dict[str, float]:
    """What the PEFT method adds to metrics.json through its hooks: dev scores of its variants
    (`variants()`: say DyLoRA's every rank, keys `<variant>/<metric>`) and its own numbers
    (`report(model, run_dir)`: say AdaLoRA's final ranks), each with its figures."""
    hooks, out = ctx.hooks, {}
    for label, context in hooks.variants().items():
        with context:
            scores, _ = evaluate(ctx, "dev", weights=weights)
        out.update({f"{label}/{k}": v for k, v in scores.items()})
    if out:
        hooks.report_variants(out, ctx.run_dir)
    out.update(hooks.report(ctx.model, ctx.run_dir))
    return out


def finish(ctx: RunContext, result: FitResult, counts: dict, losses: list) -> dict:
    """Scores the best state (each task with `result.weights`) on dev, writes predictions for dev
    and test, and `metrics.json` (dev scores, then `counts`: parameter and memory accounting),
    last."""
    weights = result.weights
    metrics, dev_preds = evaluate(ctx, "dev", weights=weights)
    for task in ctx.tasks:
        write_predictions(ctx.run_dir, task, "dev", ctx.data["dev"][task.name].split.ids,
                          dev_preds[task.name])
        test = ctx.data.get("test", {}).get(task.name)
        if test is not None:
            write_predictions(ctx.run_dir, task, "test", test.split.ids,
                              predict_task(ctx, task, test, weights))
    metrics.update(counts)
    metrics.update(method_reports(ctx, weights))
    fault_point("before-metrics")
    write_json(ctx.run_dir / METRICS_FILE, metrics)
    plot_training(ctx.run_dir, losses)  # after metrics.json: a plotting failure loses nothing
    log.info("dev: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "dev" in k))
    return metrics
