"""Figures of what a PEFT method learned, written beside a run's training.png: AdaLoRA's final rank
per layer (`adalora_ranks.png`) and DyLoRA's dev score at every rank (`dylora_ranks.png`). Drawn on
matplotlib's Agg canvas (a bare `Figure`), written atomically (common.durable)."""
from __future__ import annotations

from pathlib import Path

from common.durable import atomic_write


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def plot_ranks(ranks: dict[str, int], init_r: int, path: Path) -> Path:
    """A heatmap: layers down, module types across, the final rank in each cell."""
    import numpy as np
    from matplotlib.figure import Figure

    layers = sorted({n.split(".")[1] for n in ranks}, key=int)
    kinds = list(dict.fromkeys(".".join(n.split(".")[2:]) for n in ranks))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for name, rank in ranks.items():
        parts = name.split(".")
        grid[layers.index(parts[1]), kinds.index(".".join(parts[2:]))] = rank
    fig = Figure(figsize=(1.2 * len(kinds) + 2, 0.4 * len(layers) + 1.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0, vmax=init_r, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, int(value), ha="center", va="center", color="white")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
    ax.set_title(f"AdaLoRA: final rank per layer (from {init_r})")
    fig.colorbar(image, ax=ax, label="rank")
    return _save(fig, path)


def plot_rank_curve(scores: dict[int, float], path: Path, label: str = "dev overall") -> Path:
    """DyLoRA: the dev score of one trained adapter evaluated at every rank."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ranks = sorted(scores)
    ax.plot(ranks, [scores[r] for r in ranks], marker="o")
    ax.set(xlabel="rank used at evaluation", ylabel=label, title="DyLoRA: one adapter, every rank")
    ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    return _save(fig, path)
