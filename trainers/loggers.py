"""Experiment loggers. `WandbLogger` logs to Weights & Biases (Biewald, 2020), offline unless the
user opts into `logger.mode=online`, so a run never waits for a login; `NullLogger` logs nothing.
Both write under the run directory and share one four-method interface."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from minbert.errors import ConfigError

log = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    def start(self, config: dict, run_dir: Path) -> None:
        """Nothing to open."""

    def log(self, metrics: dict, step: int) -> None:
        """Drops the metrics: `metrics.json` and `history.jsonl` in the run dir keep them."""

    def summary(self, metrics: dict) -> None:
        """Nothing to summarise into."""

    def finish(self, ok: bool = True) -> None:
        """Nothing to close."""


class WandbLogger:
    def __init__(self, project: str = "minbert-mt", mode: str = "offline", entity: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, name: str | None = None):
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={mode!r} is not one of {list(WANDB_MODES)}")
        self.kwargs = dict(project=project, mode=mode, entity=entity, group=group,
                           tags=list(tags or []), name=name)
        self.run = None

    def start(self, config: dict, run_dir: Path) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(dir=str(run_dir), config=config, **self.kwargs,
                              settings=wandb.Settings(console="off"))
        log.info("W&B run %s (%s) in %s", self.run.id, self.kwargs["mode"], run_dir / "wandb")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
