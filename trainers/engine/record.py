"""What a run records about itself, and the one loader that rebuilds a finished run for every
script (export, merge, predict).

`run.json` is written when a run starts: the tasks it trains, in order, each with its resolved
task config (the one list of a run's tasks; a finished run is rebuilt from it, not from the task
files, which may have changed since), its resolved config, the precision it computes in and why (`precision=auto` resolved),
torch's version and thread count, and the W&B run id. A run started
again in the same folder (`resume=<dir>`, or a sweep relaunched with the same `hydra.sweep.dir`)
is checked against it: a different config is refused, naming the keys that differ, except keys
that cannot change results (`MAY_DIFFER`)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from common.durable import write_json
from common.errors import CheckpointError, ConfigError, DamagedFileError, MinbertError
from minbert.peft import PeftMethod
from tasks.registry import get_tasks, task_from_config, to_config
from tasks.base import SPLITS, Task
from tasks.data import chosen_root
from tasks.model import MultitaskModel
from trainers.engine.build import build_model, resolve_device, run_tasks, seed_everything
from trainers.engine.context import TaskWeights
from trainers.engine.recipe import build_parts

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
# Keys a resumed run may change: where the data (and its cache) lives, display, checkpoint cadence,
# the logger.
MAY_DIFFER = ("resume", "progress", "data.root", "data.cache_dir", "data.download",
              "data.allow_changed", "checkpoint", "logger")


def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is unreadable ({e}); move it away to start the run "
                              "afresh") from e


def write_record(run_dir: Path, cfg: DictConfig, tasks: list[Task], wandb_id: str | None,
                 precision: tuple[str, str], data: dict | None = None,
                 hydra: dict | None = None) -> None:
    """`precision`: (the one the run computes in, why: `trainers.engine.precision.run_precision`);
    `data`: `data_record`'s (with the changes a resume was allowed to make); `hydra`: the
    group choices and command-line overrides the run was composed from (what tables label it
    by), kept from the run's first invocation."""
    chosen, why = precision
    previous = read_record(run_dir) or {}
    write_json(Path(run_dir) / RUN_FILE, {
        "tasks": [to_config(t) for t in tasks], "config": OmegaConf.to_container(cfg, resolve=True),
        "precision": {"requested": cfg.precision, "chosen": chosen, "why": why},
        "torch": str(torch.__version__), "threads": torch.get_num_threads(), "wandb_id": wandb_id,
        "hydra": previous.get("hydra") or hydra or {},
        **(data or {k: previous[k] for k in ("data", "data_changed") if k in previous})})


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_data(cfg: DictConfig, tasks: list[Task]) -> dict[str, dict]:
    """`<task>/<split>` -> the file's name and SHA-256, for every file the run's tasks list that
    exists under the data root (a hub task: its data set's name)."""
    root, out = chosen_root(cfg.data.root), {}
    for task in tasks:
        if task.format == "hub":
            out[f"{task.name}/hub"] = {"file": str(task.source.get("path")),
                                       "sha256": str(task.source.get("name"))}
            continue
        for split in SPLITS:
            path = task.path(root, split)
            if path is not None and path.is_file():
                out[f"{task.name}/{split}"] = {"file": path.name, "sha256": sha256(path)}
    return out


def data_changes(saved: dict, now: dict) -> list[str]:
    return [f"{key} ({(saved.get(key) or now.get(key))['file']}"
            + (", now missing)" if key not in now else ", new)" if key not in saved
               else ", changed)") for key in sorted(saved.keys() | now.keys())
            if saved.get(key) != now.get(key)]


def data_record(run_dir: Path, record: dict | None, cfg: DictConfig, tasks: list[Task]) -> dict:
    """What run.json keeps of the data, each file hashed once: `data` (the fingerprints the run
    started with) and `data_changed` (every resume that was allowed to change them). A run
    resumes on the data it started with: a changed file is refused, naming it, unless
    `data.allow_changed=true` (then the log says which changed)."""
    now = current_data(cfg, tasks)
    if record is None or record.get("data") is None:  # a new run, or one from before fingerprints
        return {"data": now, "data_changed": list((record or {}).get("data_changed") or [])}
    changed = data_changes(record["data"], now)
    if changed and not cfg.data.allow_changed:
        raise ConfigError(f"{run_dir} started on other data: {'; '.join(changed[:6])} under "
                          f"{chosen_root(cfg.data.root)} differ from the files it trained on. "
                          "Resume it with the data it started with (data.root=...), start a new "
                          "run, or pass data.allow_changed=true to continue on the changed files "
                          "(run.json records it)")
    history = list(record.get("data_changed") or [])
    if changed:
        log.warning("%s continues on changed data (data.allow_changed=true): %s", run_dir,
                    "; ".join(changed))
        history.append({"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": changed})
    return {"data": record["data"], "data_changed": history}


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items()
                for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_changes(saved: dict, cfg: DictConfig) -> list[str]:
    """`key: saved -> now` for every key whose value differs, except the MAY_DIFFER ones."""
    before, now = _flatten(saved), _flatten(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)
                  and not any(k == m or k.startswith(m + ".") for m in MAY_DIFFER))
    return [f"{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in keys]


def check_same_run(run_dir: Path, record: dict, cfg: DictConfig, tasks: list[Task]) -> None:
    changes = config_changes(record.get("config", {}), cfg)
    saved = {t.get("name"): t for t in record.get("tasks", []) if isinstance(t, dict)}
    changes += [f"task {t.name} ({t.file}) changed since the run started" for t in tasks
                if t.name in saved and saved[t.name] != to_config(t)]
    if changes:
        raise ConfigError(f"{run_dir} holds a run with another config, which it will not resume: "
                          + "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")
                          + ". Run it with its own config, or use a new run dir.")


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


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a run ran with: `run.json`'s, else (older runs) what Hydra saved."""
    record = read_record(run_dir)
    if record and "config" in record:
        return OmegaConf.create(record["config"])
    config = Path(run_dir) / ".hydra" / "config.yaml"
    if not config.is_file():
        raise MinbertError(f"{config} not found: pass the folder of a run made by train.py")
    try:
        return OmegaConf.load(config)
    except Exception as e:  # a damaged YAML file
        raise DamagedFileError(f"{config} is damaged ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}); the run's config cannot be "
                               "read: restore it from a copy of the run folder") from None


def saved_tasks(run_dir: Path, cfg: DictConfig, trainer) -> list[Task]:
    """The tasks a run saved in `run.json`, each with the config it trained with (runs made
    before task configs were saved: read from the task files by name)."""
    record = read_record(run_dir)
    if record is None:
        return run_tasks(cfg, trainer)
    path = Path(run_dir) / RUN_FILE
    try:
        saved = record["tasks"]
        if all(isinstance(t, str) for t in saved):
            return get_tasks(saved)
        return [task_from_config(t, f"{path} (task {t.get('name')})") for t in saved]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{Path(run_dir) / RUN_FILE} has no task list ({e}); it should hold "
                              '{"tasks": [...]}, the tasks the run trained') from e


def load_run(run_dir: str | Path, device: str = "cpu") -> SavedRun:
    """Rebuilds a finished run from its folder: the saved config and task list, the model built as
    the run built it, and the weights its strategy saved (adapter file, experts or a merge)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    trainer, method = build_parts(cfg)  # as the run built them (its config was checked then)
    tasks = saved_tasks(run_dir, cfg, trainer)
    seed_everything(cfg.seed)  # frozen random tensors come out as the run drew them
    model = build_model(cfg, tasks, method).to(resolve_device(device)).eval()
    weights = trainer.load_weights(model, run_dir, [t.name for t in tasks])
    return SavedRun(run_dir, cfg, tasks, method, model, weights)
