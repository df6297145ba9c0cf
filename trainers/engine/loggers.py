"""Experiment loggers. `WandbLogger` logs to Weights & Biases (Biewald, 2020), offline unless the
user opts into `logger.mode=online`, so a run never waits for a login; `NullLogger` logs nothing.
Both write under the run directory and share one four-method interface. `start` returns the
logger's run id (W&B's), which the run keeps in `run.json` so that a resumed run logs into the same
W&B run."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from common.errors import ConfigError

log = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")


class NullLogger:
    def start(self, config: dict, run_dir: Path, run_id: str | None = None) -> None:
        """Nothing to open, no id."""

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

    def start(self, config: dict, run_dir: Path, run_id: str | None = None) -> str:
        """Opens the W&B run; with `run_id` (a resumed run), the same W&B run again."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        resume = {"id": run_id, "resume": "allow"} if run_id else {}
        self.run = wandb.init(dir=str(run_dir), config=config, **self.kwargs, **resume,
                              settings=wandb.Settings(console="off"))
        log.info("W&B run %s (%s%s) in %s", self.run.id, self.kwargs["mode"],
                 ", resumed" if run_id else "", run_dir / "wandb")
        return self.run.id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
