"""One experiment run, from a composed Hydra config to `metrics.json`: read the data (failing
early on bad input), build the encoder, apply the PEFT method, attach the task heads, train with
the configured strategy, then score the best state on dev and write leaderboard predictions.
`train.py` is a thin Hydra wrapper around `run`.

`load_run` is the one loader that rebuilds a finished run for every script (export, merge,
predict): the saved config, the task list the run trained (`run.json`), and the weights its
strategy saved."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from minbert.checkpoint import load_tokenizer
from minbert.errors import CheckpointError, ConfigError, MinbertError
from minbert.peft import PeftMethod, param_counts
from tasks import get_tasks
from tasks.base import Task
from tasks.batching import EncodedSplit
from tasks.data import load_task_data, resolve_root
from tasks.model import MultitaskModel
from trainers.loop import RunContext, TaskWeights, evaluate, predict_task, write_predictions
from trainers.memory import PeakMemory, memory_metrics
from trainers.plots import plot_training

log = logging.getLogger(__name__)


def build(node: DictConfig, key: str, **kwargs):
    """`hydra.utils.instantiate`, with errors that name the config key instead of a deep trace."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MinbertError):
            raise type(cause)(f"{key}: {cause}") from cause
        raise ConfigError(f"cannot build `{key}` from its config: {e}") from e


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(name)


RUN_FILE = "run.json"  # what a run is, beside its config: the tasks it trains, in order


def run_tasks(cfg: DictConfig, trainer) -> list[Task]:
    """The tasks a run trains, in order: the trainer's own (`trainer=single`), else `order`."""
    return get_tasks(getattr(trainer, "tasks", None) or list(cfg.order.tasks))


def load_run_config(run_dir: Path) -> DictConfig:
    """The composed config Hydra saved for a finished run (`<run>/.hydra/config.yaml`)."""
    config = Path(run_dir) / ".hydra" / "config.yaml"
    if not config.is_file():
        raise MinbertError(f"{config} not found: pass the folder of a run made by train.py")
    return OmegaConf.load(config)


def build_method(cfg: DictConfig) -> PeftMethod:
    method = build(cfg.peft, "peft")
    if not isinstance(method, PeftMethod):
        raise ConfigError(f"peft: {type(method).__name__} has no apply(encoder) method")
    return method


def build_model(cfg: DictConfig, tasks, method: PeftMethod | None = None,
                encoder: nn.Module | None = None) -> MultitaskModel:
    """The encoder (`cfg.model.encoder`, unless one is given) with the PEFT method applied, and a
    fresh (trainable) head per task."""
    encoder = encoder if encoder is not None else build(cfg.model.encoder, "model.encoder")
    try:
        encoder = (method or build_method(cfg)).apply(encoder)
    except ConfigError as e:
        raise ConfigError(f"peft: {e}") from e
    heads = {t.name: build(cfg.heads[t.name], f"heads.{t.name}", hidden_size=encoder.hidden_size)
             for t in tasks}
    return MultitaskModel(encoder, heads, pooling=cfg.model.pooling)


def encode_data(cfg: DictConfig, model: MultitaskModel, raw: dict) -> dict:
    """split -> task -> EncodedSplit, tokenized once, pairs encoded as each head needs."""
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    out: dict[str, dict[str, EncodedSplit]] = {}
    for task_name, splits in raw.items():
        joint = getattr(model.heads[task_name], "joint", False)
        for split, data in splits.items():
            out.setdefault(split, {})[task_name] = EncodedSplit(data, tokenizer,
                                                                cfg.model.max_length, joint)
    return out


def setup(cfg: DictConfig, run_dir: str | Path):
    """Everything a run trains with, built before any training so that bad input fails early:
    (the trainer, the logger, the RunContext: model, tasks, encoded data, ...)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(cfg.seed)
    trainer, logger = build(cfg.trainer, "trainer"), build(cfg.logger, "logger")  # fail fast
    tasks = run_tasks(cfg, trainer)
    (run_dir / RUN_FILE).write_text(json.dumps({"tasks": [t.name for t in tasks]}) + "\n")
    method = build_method(cfg)
    raw = load_task_data(tasks, resolve_root(cfg.data.root), cfg.data.limit_train,
                         cfg.data.limit_eval)
    device = resolve_device(cfg.device)
    model = build_model(cfg, tasks, method).to(device)
    ctx = RunContext(model, tasks, encode_data(cfg, model, raw), run_dir, logger,
                     cfg.data.batch_size, cfg.data.eval_batch_size, device, cfg.progress,
                     generator, method, cfg.optim.state_bits)
    return trainer, logger, ctx


def run(cfg: DictConfig, run_dir: str | Path) -> float:
    """Trains and evaluates one configuration; returns dev/overall (the sweep objective)."""
    trainer, logger, ctx = setup(cfg, run_dir)
    counts = param_counts(ctx.model)
    log.info("parameters: %d trainable of %d (%.3f%%)", counts["params/trainable"],
             counts["params/total"], counts["params/updated_pct"])
    logger.start(OmegaConf.to_container(cfg, resolve=True), ctx.run_dir)
    ok = False
    try:
        logger.log(counts, step=0)
        with PeakMemory(ctx.device) as peak:
            result = trainer.fit(ctx)
        ctx.weights = result.weights
        counts = result.param_counts or counts  # experts: every expert's tensors count
        metrics = finish(ctx, {**counts, **memory_metrics(ctx.model, ctx.optimizer, peak.bytes)})
        logger.summary(metrics)
        ok = True
    finally:
        logger.finish(ok)
    return metrics["dev/overall"]


@dataclass
class SavedRun:
    """A finished run rebuilt: its config, tasks, PEFT method, model (the run's weights loaded)
    and `weights(task)`, the context in which the model holds that task's weights."""

    run_dir: Path
    cfg: DictConfig
    tasks: list[Task]
    method: PeftMethod
    model: MultitaskModel
    weights: TaskWeights


def saved_tasks(run_dir: Path, cfg: DictConfig, trainer) -> list[Task]:
    """The task list a run saved in `run.json` (runs made before it existed: from the config)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return run_tasks(cfg, trainer)
    try:
        return get_tasks(json.loads(path.read_text())["tasks"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); it should hold "
                              '{"tasks": [...]}, the tasks the run trained') from e


def load_run(run_dir: str | Path, device: str = "cpu") -> SavedRun:
    """Rebuilds a finished run from its folder: the saved config and task list, the model built as
    the run built it, and the weights its strategy saved (adapter file, experts or a merge)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    trainer = build(cfg.trainer, "trainer")
    tasks = saved_tasks(run_dir, cfg, trainer)
    seed_everything(cfg.seed)  # frozen random tensors come out as the run drew them
    method = build_method(cfg)
    model = build_model(cfg, tasks, method).to(resolve_device(device)).eval()
    weights = trainer.load_weights(model, run_dir, [t.name for t in tasks])
    return SavedRun(run_dir, cfg, tasks, method, model, weights)


def finish(ctx: RunContext, counts: dict) -> dict:
    """Scores the best state on dev, writes predictions for dev and test, and `metrics.json`
    (dev scores, then `counts`: parameter and memory accounting)."""
    metrics, dev_preds = evaluate(ctx, "dev")
    for task in ctx.tasks:
        write_predictions(ctx.run_dir, task, "dev", ctx.data["dev"][task.name].split.ids,
                          dev_preds[task.name])
        test = ctx.data.get("test-student", {}).get(task.name)
        if test is not None:
            write_predictions(ctx.run_dir, task, "test-student", test.split.ids,
                              predict_task(ctx, task, test))
    metrics.update(counts)
    (ctx.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_training(ctx.run_dir, ctx.losses)  # after metrics.json: a plotting failure loses nothing
    log.info("dev: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "dev" in k))
    return metrics
