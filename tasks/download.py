"""The data root of a run (placeholder: extended by the download work)."""
from __future__ import annotations

from pathlib import Path

from tasks.data import resolve_root


def data_root(cfg, tasks) -> Path:
    return resolve_root(cfg.data.root)
