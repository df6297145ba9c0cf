"""Figure 2 from Table 1's cells: dev overall for each task order, one line per head design, with
error bars of the std over seeds where a point has several. Drawn on matplotlib's Agg canvas (a
bare `Figure`, no pyplot state), so it works without a display."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .layouts import DESIGNS, OVERALL, Table, order_label

TITLE = "Figure 2: dev overall by task order and head design"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _plot_design(axes: Axes, table: Table, design: str, orders: list[str], shift: float) -> None:
    cells = {row.key[1]: row.cells[OVERALL.key] for row in table.rows if row.key[0] == design}
    means = [cells[o].mean if o in cells and cells[o].mean is not None else math.nan
             for o in orders]
    if all(math.isnan(y) for y in means):
        return
    stds = [cells[o].std if o in cells and cells[o].std is not None else math.nan
            for o in orders]
    errors = None if all(math.isnan(s) for s in stds) else stds
    axes.errorbar([i + shift for i in range(len(orders))], means, yerr=errors, marker="o",
                  capsize=3, label=DESIGNS.get(design, design))


def figure2(table: Table, path: Path) -> Path:
    """Draws Table 1 (`table`) as Figure 2 into the PNG `path`."""
    orders = _unique([row.key[1] for row in table.rows])
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    axes = fig.subplots()
    designs = _unique([row.key[0] for row in table.rows])
    for i, design in enumerate(designs):  # shifted apart a little so error bars don't overlap
        _plot_design(axes, table, design, orders, 0.06 * (i - (len(designs) - 1) / 2))
    axes.set_xticks(range(len(orders)), [order_label(o) for o in orders], rotation=15)
    axes.set_xlabel("task order")
    axes.set_ylabel("dev overall")
    axes.set_title(TITLE)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(title="head design")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
