"""Multirun plumbing: what makes a sweep of many runs (Hydra's `-m`, any launcher or sweeper)
safe and easy to read back, following the run/sweep split of Hydra (Yadan, 2019) and the
group-and-tags layout W&B recommends for sweeps (Biewald, 2020).

- `label_run` gives every run of one sweep the same W&B group, tags for its experiment, method,
  trainer, order, head design, row and seed, and a name made of its overrides.
- `record_failure` turns a failed job into `error.txt` in its run dir and the worst objective
  for the sweep's direction, so that one bad job never takes the other jobs' results with it:
  the launcher goes on, and an Optuna study counts the trial as its worst and keeps searching.
- `SweepReport` is a Hydra callback that, when a multirun ends, lists the runs that failed.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, open_dict

from common.distributed import is_main
from common.durable import write_text
from common.errors import MinbertError

log = logging.getLogger(__name__)
ERROR_FILE = "error.txt"
# Config groups whose choice names a run in W&B (`peft:lora`, `order:sts-sst-para`, ...).
TAGGED_GROUPS = ("peft", "trainer", "order", "heads", "scale", "table2", "table3", "sweep")
FAILED_RUNS: list[tuple[Path, str]] = []  # filled by SweepReport for train.py's exit code
REFUSED: list[tuple[Path, str]] = []  # jobs refused in a finished run's dir (left as it was)


def run_task_names(cfg: DictConfig) -> list[str]:
    """The names of the tasks a run trains: `trainer.task` (trainer=single), else `tasks`."""
    single = cfg.trainer.get("task")
    return [str(single)] if single else [str(t) for t in cfg.get("tasks") or []]


def label_run(cfg: DictConfig, choices: dict[str, Any], sweep_dir: str | None,
              override_dirname: str = "") -> None:
    """Sets `logger.group`, `logger.tags` and `logger.name` where the user left them empty.
    `choices` is Hydra's runtime group choices; `sweep_dir` is None outside a multirun."""
    if not isinstance(cfg.get("logger"), DictConfig) or "tags" not in cfg.logger \
            or not isinstance(cfg.logger.tags, (ListConfig, type(None))):
        return  # a logger without W&B-style identity (logger=none), or one the schema refuses
    tags = [f"{group}:{choices[group]}" for group in TAGGED_GROUPS if choices.get(group)]
    tags += [f"task:{t}" for t in run_task_names(cfg)]
    tags.append(f"seed:{cfg.seed}")
    if cfg.get("experiment_name"):
        tags.insert(0, str(cfg.experiment_name))
    own = list(cfg.logger.tags or [])
    with open_dict(cfg):
        if not cfg.logger.group and sweep_dir:
            sweep, name = Path(sweep_dir), cfg.get("experiment_name") or "multirun"
            cfg.logger.group = f"{name}@{sweep.parent.name}_{sweep.name}"
        cfg.logger.tags = own + [t for t in tags if t not in own]
        if not cfg.logger.name and override_dirname:
            cfg.logger.name = override_dirname


def record_failure(run_dir: str | Path, error: BaseException, direction: str = "maximize") -> float:
    """Writes the error to `<run_dir>/error.txt` (its first line is the message; a bug's traceback
    follows) and returns the objective of a failed job: the worst value for `direction` (-inf when
    maximising). Not NaN: Optuna rejects a NaN objective by failing the whole search."""
    run_dir = Path(run_dir)
    bad_input = isinstance(error, MinbertError)
    message = str(error) if bad_input else f"{type(error).__name__}: {error}"
    text = message.splitlines()[0] if message else type(error).__name__
    if not bad_input:
        text += "\n\n" + "".join(traceback.format_exception(error))
        log.exception("run failed: %s", message)
    else:
        log.error("run failed: %s", message)
    if (run_dir / "metrics.json").is_file():  # a finished run is never touched
        REFUSED.append((run_dir, text.splitlines()[0]))
    elif is_main():  # a data-parallel run's rank 0 writes its files
        write_text(run_dir / ERROR_FILE, text + "\n")
    return float("inf") if direction == "minimize" else float("-inf")


def failed_runs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """(run dir, first line of its error) for every failed run under a sweep dir."""
    found = []
    for error in sorted(Path(sweep_dir).rglob(ERROR_FILE)):
        if not (error.parent / "metrics.json").is_file():
            lines = error.read_text().splitlines()
            found.append((error.parent, lines[0] if lines else "(empty error.txt)"))
    return found


class SweepReport(Callback):
    """Logs, at the end of a multirun, how many runs finished and which failed (and why)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        finished = len(list(sweep_dir.rglob("metrics.json")))
        failed = failed_runs(sweep_dir) + REFUSED
        FAILED_RUNS.extend(failed)
        if not failed:
            log.info("multirun finished: %d runs in %s", finished, sweep_dir)
            return
        log.error("multirun: %d of %d runs failed (the others' results are kept in %s):",
                  len(failed), finished + len(failed), sweep_dir)
        for run_dir, message in failed:
            log.error("  %s: %s", run_dir, message)
