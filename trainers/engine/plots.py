"""The run's training curves as `training.png` in the run dir: the train loss of each task per
step (with a moving average) and the dev metrics per epoch (per evaluation, against the step, where
the run also scored dev inside epochs), so a run can be judged at a glance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.durable import atomic_write


def _moving_average(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    window = max(1, min(window, len(v)))
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _dev_series(history: list[dict], x: str = "epoch") -> dict[str, list[tuple[int, float]]]:
    """label -> (x, score) points, x the record's `epoch` or `step`; per-task experts' records
    get their own labelled lines; events (an early stop) are no points."""
    series: dict[str, list] = {}
    for h in (h for h in history if "event" not in h):
        expert = h.get("expert")
        for key, value in h.items():
            if "/dev/" in key or (key == "dev/overall" and expert is None):
                label = f"{expert} expert: {key}" if expert else key
                series.setdefault(label, []).append((h[x], value))
    return series


def plot_training(run_dir: Path, losses: list[tuple[int, str, float]]) -> Path:
    """Writes `training.png` from the per-step losses and `history.jsonl`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history_file = run_dir / "history.jsonl"
    lines = history_file.read_text().splitlines() if history_file.exists() else []
    history = [json.loads(line) for line in lines]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    for task in dict.fromkeys(t for _, t, _ in losses):
        steps = [s for s, t, _ in losses if t == task]
        vals = [v for _, t, v in losses if t == task]
        window = max(1, len(vals) // 20)
        ax_loss.plot(steps, vals, alpha=0.25)
        ax_loss.plot(steps[window - 1:], _moving_average(vals, window), label=task,
                     color=ax_loss.lines[-1].get_color())
    ax_loss.set(xlabel="step", ylabel="train loss", title="train loss per task", yscale="log")
    ax_loss.legend()
    by_step = any("epoch_step" in h for h in history)  # dev scored inside epochs too
    series = _dev_series(history, "step" if by_step else "epoch")
    for label, points in series.items():
        ax_dev.plot(*zip(*points), marker="o", label=label)
    for h in (h for h in history if h.get("event") == "early_stop"):
        ax_dev.axvline(h["step" if by_step else "epoch"], color="grey", linestyle=":",
                       label="early stop")
    epochs = sorted({h["epoch"] for h in history})
    ax_dev.set(xlabel="step" if by_step else "epoch", ylabel="score",
               title="dev scores per evaluation" if by_step else "dev scores per epoch")
    if 0 < len(epochs) <= 20 and not by_step:
        ax_dev.set_xticks(epochs)
    if series:
        ax_dev.legend()
    fig.tight_layout()
    out = atomic_write(run_dir / "training.png", lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return out
