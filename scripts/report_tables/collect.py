"""Finding the Hydra runs under sweep folders and reading what each produced: its composed config
(`.hydra/config.yaml`, read without resolving interpolations), its `metrics.json`, or why it has
none (`error.txt`'s first line, or a run still going or killed), and which report table it is for.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from trainers.sweeps import ERROR_FILE  # what a failed job of train.py writes

Status = Literal["finished", "failed", "incomplete"]
INCOMPLETE = "no metrics.json (still running or killed)"


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
        return self.metrics.get(key)

    @property
    def seed(self) -> str:
        return str(self.get("seed", "?"))


def declared_table(run: Run) -> str | None:
    """The report table a run's `experiment_name` names (a sweep of `experiment=tableN`), if any."""
    name = str(run.get("experiment_name", ""))
    return name if name in ("table1", "table2", "table3", "figure2") else None


def table_of(run: Run) -> str:
    """The report table a run belongs to: its `experiment_name`, else inferred from its config
    (full fine-tuning, sequential: Table 1's model; one task: Table 2; the rest: Table 3)."""
    declared = declared_table(run)
    if declared is not None:
        return declared
    trainer, peft = run.target("trainer"), run.target("peft")
    if trainer == "SingleTaskTrainer":
        return "table2"
    if peft == "FullFinetune" and trainer == "SequentialTrainer":
        return "table1"
    return "table3"


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key that puts `run2` before `run10` (Hydra numbers a sweep's jobs 0, 1, ..., 10)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text))


def find_run_dirs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds `.hydra/config.yaml`."""
    return [p.parent.parent for p in root.rglob(".hydra/config.yaml") if p.is_file()]


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


def load_run(run_dir: Path) -> Run:
    """Reads one run dir; raises ValueError (with the reason) where its config cannot be read."""
    try:
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config = OmegaConf.to_container(cfg, resolve=False)
    except Exception as e:  # a broken YAML file must not stop the other runs' tables
        raise ValueError(f"unreadable .hydra/config.yaml ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise ValueError(".hydra/config.yaml is not a mapping")
    status, metrics, problem = read_outcome(run_dir)
    return Run(run_dir, {str(k): v for k, v in config.items()}, status, metrics, problem)


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
        raise NoRunsError(f"no Hydra runs (no .hydra/config.yaml) under {names}")
    return runs, warnings
