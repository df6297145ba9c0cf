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

import torch

from omegaconf import DictConfig, OmegaConf

from common.durable import RunLock, fault_point, write_json
from common.errors import ConfigError
from minbert.peft import check_mergeable, param_counts
from tasks.data import load_task_data
from tasks.download import data_root
from trainers.engine.build import (build, build_method, build_model, encode_data, resolve_device,
                            run_tasks, seed_everything)
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
from trainers.engine.record import check_same_run, read_record, write_record
from trainers.engine.state import CHECKPOINTS, TrainState, load_checkpoint, restore_checkpoint
from trainers.engine.sweeps import ERROR_FILE

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def setup(cfg: DictConfig, run_dir: str | Path, precision: str | None = None,
          tasks: list | None = None, parallel: Replicas | None = None,
          device: torch.device | None = None):
    """Everything a run trains with, built before any training so that bad input fails early:
    (the trainer, the logger, the RunContext: model, tasks, encoded data, ...). `precision`: the
    one to compute in (`run` passes the resolved one; None: `cfg.precision` resolved here).
    `parallel`, `device`: the run's processes and this one's device (`trainers.engine.parallel.
    start`; None: started here)."""
    run_dir = Path(run_dir)
    if parallel is None:
        parallel, device = start_processes(resolve_device(cfg.device))
    if parallel.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(cfg.seed)
    trainer, logger = build(cfg.trainer, "trainer"), build(cfg.logger, "logger")  # fail fast
    logger = logger if parallel.main else NullLogger()  # one W&B run: rank 0's
    check_batch(cfg.data.batch_size, parallel)
    tasks = run_tasks(cfg, trainer) if tasks is None else tasks
    method = build_method(cfg)
    if trainer.merges:
        check_mergeable(method, trainer.merges)  # before any data is read or a step is taken
    raw = load_task_data(tasks, data_root(cfg, tasks), cfg.data.limit_train, cfg.data.limit_eval,
                         cfg.data.get("cache_dir"), cfg.data.get("predict_test", True))
    if precision is None:
        precision, _ = resolve_precision(cfg.get("precision", "fp32"), device)
    model = build_model(cfg, tasks, method).to(device)
    checkpoint = cfg.get("checkpoint") or {}
    settings = Settings(run_dir, cfg.data.batch_size, cfg.data.eval_batch_size, device,
                        cfg.progress and parallel.main, cfg.optim.state_bits,
                        checkpoint_every=int(checkpoint.get("every_n_steps", 0) or 0),
                        checkpoint_keep=int(checkpoint.get("keep", 2)), precision=precision)
    ctx = RunContext(model, tasks, encode_data(cfg, model, raw), settings, logger, generator,
                     method, training_hooks(method), parallel)
    return trainer, logger, ctx


def check_batch(batch_size: int, parallel: Replicas) -> None:
    if batch_size < parallel.world:
        raise ConfigError(f"data.batch_size={batch_size} is the global batch, shared by the run's "
                          f"{parallel.world} processes: give at least one example to each")


def run(cfg: DictConfig, run_dir: str | Path) -> float:
    """Trains and evaluates one configuration (or continues it from its newest checkpoint);
    returns dev/overall, the sweep objective."""
    run_dir = Path(run_dir)
    parallel, device = start_processes(resolve_device(cfg.device))
    with RunLock(run_dir) if parallel.main else nullcontext():  # rank 0 holds the run
        record = read_record(run_dir)
        tasks = run_tasks(cfg, build(cfg.trainer, "trainer"))
        if record is not None:
            check_same_run(run_dir, record, cfg, tasks)
            if (run_dir / METRICS_FILE).is_file():
                score = json.loads((run_dir / METRICS_FILE).read_text())["dev/overall"]
                log.info("%s has finished already (dev/overall %.4f): nothing to do", run_dir,
                         score)
                return score
        parallel.barrier()  # every rank has read the run's files before rank 0 writes any
        if parallel.main:
            (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a failed attempt's, now stale
        precision = run_precision(cfg.get("precision", "fp32"), device, record)
        log.info("%s", precision[1])
        trainer, logger, ctx = setup(cfg, run_dir, precision[0], tasks, parallel, device)
        state = TrainState()
        resumed = restore(trainer, ctx, state)
        wandb_id = logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir,
                                (record or {}).get("wandb_id") if resumed else None)
        write_record(run_dir, cfg, ctx.tasks, wandb_id, precision)
        return train_and_finish(trainer, logger, ctx, state)


def restore(trainer, ctx: RunContext, state: TrainState) -> bool:
    """Begins the run's phase: the first, or (from the newest readable checkpoint) the one the
    run was in, with every tensor, counter and generator as the checkpoint has them. Returns
    whether a checkpoint was loaded."""
    trainer.start(ctx, state)
    sd = load_checkpoint(ctx.run_dir)
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
