"""Finding the runs under sweep folders and reading what each produced, from `run.json`, the one
record a run keeps of itself (trainers.engine.record): its config, its group choices and
overrides, the primary metric of each of its tasks; then its `metrics.json`, or why it has none
(`error.txt`'s first line, or a run still going or killed), and which table it is for: the
report's tables take runs on the report's tasks (sst, para, sts), the generic `tasks` table every
other run. A folder from before run.json kept its config (Hydra's `.hydra/config.yaml`, read
without resolving interpolations) is read from there.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from trainers.engine.sweeps import ERROR_FILE  # what a failed job of train.py writes

Status = Literal["finished", "failed", "incomplete"]
INCOMPLETE = "no metrics.json (still running or killed)"
RUN_FILE = "run.json"  # trainers.engine.record's: the tasks a run trains, each with its config
REPORT_TASKS = ("sst", "para", "sts")  # the tasks of the report's tables
REPORT_TABLES = ("table1", "table2", "table3", "figure2")
DECLARED_TABLES = (*REPORT_TABLES, "zoo")  # the experiment presets' own tables
METRIC_KEYS = {"accuracy": "acc"}  # as tasks.metrics.key: `<task>/dev/acc` for accuracy


class NoRunsError(Exception):
    """No run (no `.hydra/config.yaml`) under the folders asked for, or a folder that is missing."""


@dataclass(frozen=True)
class Run:
    """One run dir: its config as plain containers, and its metrics or the reason it has none."""

    path: Path
    config: dict[str, Any]
    status: Status
    metrics: dict[str, float]
    problem: str = ""  # failed or incomplete: error.txt's first line, or INCOMPLETE
    task_metrics: dict[str, str] = field(default_factory=dict)  # task -> run.json's `metric`
    choices: dict[str, str] = field(default_factory=dict)  # Hydra's group choices: peft -> dora
    overrides: tuple[str, ...] = ()  # the command line's overrides as Hydra recorded them

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def get(self, key: str, default: Any = None) -> Any:
        """The config value at a dotted key (`peft.rank`), or `default` where any part is absent."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return default if node is None else node

    def target(self, group: str) -> str:
        """The class name a group's `_target_` names (`peft` -> `Lora`), or "" without one."""
        return str(self.get(f"{group}._target_", "")).rsplit(".", 1)[-1]

    def metric(self, key: str) -> float | None:
        """metrics.json's value at key; `a+b+c` sums several (None where one is missing)."""
        values = [self.metrics.get(k) for k in key.split("+")]
        return None if None in values else sum(values)

    @property
    def seed(self) -> str:
        return str(self.get("seed", "?"))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the run trained, in order: `trainer.task` (trainer=single), else `tasks`, else
        `order.tasks` (runs made before tasks were config files); none named: the report's."""
        single = self.get("trainer.task")
        names = [single] if single else self.get("tasks", self.get("order.tasks"))
        if names is None:
            return REPORT_TASKS
        return tuple(str(t) for t in names) if isinstance(names, list) else (str(names),)

    def metric_key(self, task: str) -> str | None:
        """The key (`acc`, `macro_f1`, `pearson`) of a task's primary metric in metrics.json:
        run.json's task config says which metric, else metrics.json's first `<task>/dev/*`."""
        if task in self.task_metrics:
            return METRIC_KEYS.get(self.task_metrics[task], self.task_metrics[task])
        prefix = f"{task}/dev/"
        return next((k[len(prefix):] for k in self.metrics if k.startswith(prefix)), None)


def declared_table(run: Run) -> str | None:
    """The table a run's `experiment_name` names (a sweep of `experiment=tableN` or `zoo`), if
    any."""
    name = str(run.get("experiment_name", ""))
    return name if name in DECLARED_TABLES else None


def single_task(run: Run) -> bool:
    """Whether the run's strategy trained one task alone (`trainer=single trainer.task=sts`)."""
    return bool(run.get("trainer.task"))


def plain_sequential(run: Run) -> bool:
    """Whether the run trained one model over its tasks in turn (`trainer=sequential`)."""
    return (run.target("trainer.schedule") == "Sequential" and not single_task(run)
            and run.target("trainer.finisher") == "KeepBest")


def on_report_tasks(run: Run) -> bool:
    """Whether a run trained the report's tasks: all three (in any order), or one of them alone
    (trainer=single)."""
    tasks = run.tasks
    if single_task(run):
        return len(tasks) == 1 and tasks[0] in REPORT_TASKS
    return sorted(tasks) == sorted(REPORT_TASKS)


def table_of(run: Run) -> str:
    """The table a run belongs to: `tasks` (the generic one) for a run on other tasks than the
    report's; else its `experiment_name`, else inferred from its config (full fine-tuning,
    sequential: Table 1's model; one task: Table 2; the rest: Table 3)."""
    if not on_report_tasks(run):
        return "tasks"
    declared = declared_table(run)
    if declared is not None:
        return declared
    if single_task(run):
        return "table2"
    if run.target("peft") == "FullFinetune" and plain_sequential(run):
        return "table1"
    return "table3"


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key that puts `run2` before `run10` (Hydra numbers a sweep's jobs 0, 1, ..., 10)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text))


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds a run: its `run.json`, or (runs
    made before run.json kept the config) `.hydra/config.yaml`."""
    found = {p.parent for p in root.rglob(RUN_FILE) if p.is_file()}
    found |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")
              if p.is_file() and p.parent.name == ".hydra"}
    return sorted(found)


def _numbers(data: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _first_line(path: Path) -> str:
    text = path.read_text(errors="replace").strip()
    return text.splitlines()[0].strip() if text else "(empty error.txt)"


def read_outcome(run_dir: Path) -> tuple[Status, dict[str, float], str]:
    """A run's status, its numeric metrics, and the reason it has none."""
    metrics_file, error_file = run_dir / "metrics.json", run_dir / ERROR_FILE
    if metrics_file.is_file():
        try:
            data = json.loads(metrics_file.read_text())
        except (OSError, ValueError) as e:
            return "failed", {}, f"unreadable metrics.json ({e})"
        if not isinstance(data, dict):
            return "failed", {}, "metrics.json is not a JSON object"
        return "finished", _numbers(data), ""
    if error_file.is_file():
        return "failed", {}, _first_line(error_file)
    return "incomplete", {}, INCOMPLETE


def read_task_metrics(run_dir: Path) -> dict[str, str]:
    """Each task's primary metric name as `run.json`'s task configs have it; {} for a run without
    one, an unreadable one, or one from before tasks were config files (a list of names)."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        saved = record["tasks"]
        return {str(t["name"]): str(t["metric"]) for t in saved
                if isinstance(t, dict) and "name" in t and "metric" in t}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def read_record(run_dir: Path) -> dict:
    """`run.json` as a dict ({} where there is none or it is unreadable)."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_hydra(run_dir: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """The config group choices the run was composed from (`.hydra/hydra.yaml`'s
    `hydra.runtime.choices`: `peft` -> `pissa`) and its command line's overrides
    (`hydra.overrides.task`: `peft.lr=0.0015`, `seed=2`), as run.json keeps them (older runs:
    from `.hydra/hydra.yaml`); nothing where neither has them."""
    hydra = read_record(run_dir).get("hydra")
    if isinstance(hydra, dict) and "choices" in hydra:
        return ({str(k): str(v) for k, v in (hydra.get("choices") or {}).items()},
                tuple(str(o) for o in hydra.get("overrides") or ()))
    try:
        hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices, resolve=False)
        overrides = OmegaConf.to_container(hydra_cfg.overrides, resolve=False).get("task") or []
    except Exception:  # an old or hand-made run without Hydra's own record: no choices
        return {}, ()
    return ({str(k): str(v) for k, v in choices.items() if v is not None},
            tuple(str(o) for o in overrides))


def load_run(run_dir: Path) -> Run:
    """Reads one run dir; raises ValueError (with the reason) where its config cannot be read."""
    config = read_record(run_dir).get("config")
    if not (isinstance(config, dict) and config):  # none recorded: an older run's Hydra file
        config = read_hydra_config(run_dir)
    status, metrics, problem = read_outcome(run_dir)
    return Run(run_dir, {str(k): v for k, v in config.items()}, status, metrics, problem,
               read_task_metrics(run_dir), *read_hydra(run_dir))


def read_hydra_config(run_dir: Path) -> dict:
    """The config of a run from before run.json kept it: `.hydra/config.yaml`."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ValueError(f"no config: neither {RUN_FILE} nor .hydra/config.yaml holds one")
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # a broken YAML file must not stop the other runs' tables
        raise ValueError(f"unreadable .hydra/config.yaml ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise ValueError(".hydra/config.yaml is not a mapping")
    return config


def collect_runs(roots: Iterable[Path]) -> tuple[list[Run], list[str]]:
    """All runs under the folders, and a warning for each run dir that could not be read.

    Raises NoRunsError, naming the folders, when one is missing or none holds a run."""
    roots = list(roots)
    for root in roots:
        if not root.is_dir():
            raise NoRunsError(f"{root} is not a folder")
    runs: list[Run] = []
    warnings: list[str] = []
    found = {d for root in roots for d in find_run_dirs(root)}
    for run_dir in sorted(found, key=lambda d: natural_key(str(d))):
        try:
            runs.append(load_run(run_dir))
        except ValueError as e:
            warnings.append(f"skipped {run_dir}: {e}")
    if not runs and not warnings:
        names = ", ".join(str(r) for r in roots)
        raise NoRunsError(f"no runs (no {RUN_FILE} or .hydra/config.yaml) under {names}")
    return runs, warnings
