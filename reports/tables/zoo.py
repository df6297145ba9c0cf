"""The zoo: every PEFT method side by side (`python train.py -m experiment=zoo`, then
`make_tables.py <sweep> --table zoo`). One row per method, the run's `peft=` choice (`none` is
full fine-tuning): its dev score on each report task and overall (mean ± std over seeds), and its
price: parameters updated (% and absolute), training examples per second, optimizer-state bytes,
the training state counted from the tensors (weights, gradients and optimizer states: the same in
any process), peak memory (measured: on the CPU the growth of the process's RSS, so in a multirun
it depends on what ran before) and the size of the weights it saves (each the mean over seeds).

`zoo_pareto` draws the trade-off as `zoo-pareto.png`: dev overall against trainable parameters
(log scale) and against milliseconds of training per example, each with its Pareto frontier: the
methods no other beats on both axes (fewer parameters or less time, and a higher score)."""
from __future__ import annotations

import statistics
from pathlib import Path

from adjustText import adjust_text
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .collect import Run
from .layouts import (OVERALL, PARAMS, Column, Layout, RowKey, Table, score_columns,
                      describe_peft, design_of, model_of)
from .task_table import strategy, strategy_label

TRAINABLE = Column("trainable", "Trainable", "params/trainable", unit="count")
SPEED = Column("examples_per_s", "Train examples", "train/examples_per_s", unit="rate")
OPTIMIZER = Column("optimizer_state", "Optimizer state", "memory/optimizer_state_bytes",
                   unit="bytes")
# counted from the tensors, the same in any process: what QLoRA's 4-bit base and 8-bit states cut
STATE = Column("training_state", "Weights + grads + states",
               "memory/param_bytes+memory/grad_bytes+memory/optimizer_state_bytes", unit="bytes")
PEAK = Column("peak_memory", "Peak memory", "memory/peak_bytes", unit="bytes")
SAVED = Column("saved", "Saved weights", "adapter/file_bytes", unit="bytes")


SETTING_GROUPS = ("peft.", "optim.")  # overrides that make a run another row of the zoo


def settings_of(run: Run) -> tuple[str, ...]:
    """The run's command-line overrides of its PEFT method's and optimizer's settings, without
    the group (`peft.lr=0.0015` -> `lr=0.0015`): a search or a rank ladder swept them. Words
    come before numbers (`targets=all_linear rank=4`), each kind by name."""
    found = []
    for override in run.overrides:
        key, _, value = override.lstrip("+~").partition("=")
        group = next((g for g in SETTING_GROUPS if key.startswith(g)), None)
        if group is not None:
            name = key[len(group):] if group == "peft." else key
            found.append((_number_or_text(value)[0] == 0, name, f"{name}={value}"))
    return tuple(text for *_, text in sorted(found))


def method_of(run: Run) -> RowKey:
    """(the run's `peft=` choice, its overridden settings...), or its PEFT config described where
    Hydra's choices are not recorded: `("lora",)` at the shipped defaults, `("lora", "rank=4",
    "targets=all_linear")` in a rank ladder."""
    return (run.choices.get("peft") or describe_peft(run), *settings_of(run))


def _number_or_text(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def row_order(key: RowKey) -> tuple:
    """Methods by name, each at its defaults first, then by setting with numbers in numeric order
    (lr=0.00015 before lr=0.0005, rank=4 before rank=16)."""
    settings = tuple((name, *_number_or_text(value))
                     for name, _, value in (s.partition("=") for s in key[1:]))
    return (key[0], len(key) > 1, settings)


def _label(key: RowKey) -> tuple[str, ...]:
    name = "none (full fine-tuning)" if key[0] == "none" else key[0]
    return (" ".join((name, *key[1:])),)


ZOO = Layout(
    name="zoo", title="The zoo: PEFT methods side by side (dev, and what each costs)",
    label_keys=("peft",), label_titles=("PEFT method",),
    columns=(*score_columns(False), OVERALL, PARAMS, TRAINABLE, SPEED, OPTIMIZER, STATE, PEAK,
             SAVED),
    canonical=(), row_of=method_of, labels=_label, order=row_order,
    describe=lambda key: " ".join((f"peft={key[0]}", *key[1:])),
    slot_of=lambda run: "",
    shared=(("models", model_of), ("strategies", lambda run: strategy_label(strategy(run))),
            ("head designs", design_of)))


def save_figure(figure: Figure, path: Path, dpi: int = 120) -> Path:
    """Lays the figure out and writes it as `path` (its folder made if missing)."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """The indices of the Pareto-optimal points, by ascending x: no other point has an x as low
    or lower and a higher y (x: a cost, lower is better; y: a score, higher is better)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    best, out = float("-inf"), []
    for i in order:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


def _panel(axes, names: list[str], xs: list[float], ys: list[float], errs: list[float],
           xlabel: str, log: bool) -> None:
    """One Pareto panel: points with their std over seeds, the frontier, the heads-only baseline
    (`frozen`, dashed) where it ran, and labels pushed apart by adjustText."""
    axes.errorbar(xs, ys, yerr=errs, fmt="o", color="tab:blue", ecolor="tab:gray", elinewidth=1,
                  capsize=2, zorder=2)
    best = frontier(list(zip(xs, ys)))
    axes.step([xs[i] for i in best], [ys[i] for i in best], where="post", color="tab:red",
              label="Pareto frontier", zorder=1)
    if "frozen" in names:
        axes.axhline(ys[names.index("frozen")], color="tab:gray", linestyle="--", linewidth=1,
                     label="heads only (frozen encoder)", zorder=0)
    if log:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("dev overall (mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    texts = [axes.text(x, y, name, fontsize=7) for name, x, y in zip(names, xs, ys)]
    adjust_text(texts, x=xs, y=ys, ax=axes, arrowprops={"arrowstyle": "-", "color": "tab:gray",
                                                        "lw": 0.5})


def zoo_pareto(table: Table, path: Path) -> Path:
    """`zoo-pareto.png`: dev overall against trainable parameters and against milliseconds of
    training per example, one point per method with both numbers, and each panel's frontier."""
    rows = [r for r in table.rows if r.cells[OVERALL.key].mean is not None]
    figure = Figure(figsize=(13, 6))
    FigureCanvasAgg(figure)  # adjustText measures the labels with the canvas's renderer
    for axes, column, xlabel, cost, log in (
            (figure.add_subplot(1, 2, 1), TRAINABLE, "trainable parameters (log scale)",
             lambda v: v, True),
            (figure.add_subplot(1, 2, 2), SPEED, "milliseconds of training per example",
             lambda v: 1e3 / v, False)):
        have = [r for r in rows if r.cells[column.key].mean]
        _panel(axes, [" ".join(r.key) for r in have],
               [cost(r.cells[column.key].mean) for r in have],
               [r.cells[OVERALL.key].mean for r in have],
               [r.cells[OVERALL.key].std or 0.0 for r in have], xlabel, log)
    figure.suptitle(table.layout.title)
    return save_figure(figure, path)


def _rank_of(settings: tuple[str, ...]) -> tuple[float | None, str]:
    """(the rank a row's settings set, its other settings joined): a rank ladder's line."""
    rank, rest = None, []
    for s in settings:
        name, _, value = s.partition("=")
        if name == "rank":
            rank = float(value)
        else:
            rest.append(s)
    return rank, " ".join(rest)


def rank_curves(table: Table, runs: list[Run]) -> dict[str, list[tuple[float, float, float]]]:
    """Each line of the rank plot as (rank, mean, std) points: every method with rows at swept
    ranks (`peft.rank=...`), one line per its other settings; and each DyLoRA setting's one-run
    curve (its runs' `dylora/r<b>/dev/overall`, the mean over seeds)."""
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for row in table.rows:
        rank, rest = _rank_of(row.key[1:])
        cell = row.cells[OVERALL.key]
        if rank is not None and cell.mean is not None:
            name = " ".join(p for p in (row.key[0], rest) if p)
            curves.setdefault(name, []).append((rank, cell.mean, cell.std or 0.0))
    dylora: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        scores = {int(k.split("/")[1][1:]): v for k, v in run.metrics.items()
                  if k.startswith("dylora/r") and k.endswith("/dev/overall")}
        name = " ".join(("dylora curve", *(setting for setting in method_of(run)[1:]
                                            if not setting.startswith("curve_ranks="))))
        for b, v in scores.items():
            dylora.setdefault(name, {}).setdefault(b, []).append(v)
    for name, by_rank in dylora.items():
        curves[name] = [(b, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                        for b, v in sorted(by_rank.items())]
    return {name: sorted(points) for name, points in curves.items()}


def zoo_ranks(table: Table, runs: list[Run], path: Path) -> Path | None:
    """`zoo-ranks.png`: dev overall against rank (log 2), a line per method and target set of a
    rank ladder and a dashed one per DyLoRA curve; None where the runs have neither."""
    curves = rank_curves(table, runs)
    if not curves:
        return None
    figure = Figure(figsize=(8, 6.5))
    axes = figure.add_subplot(1, 1, 1)
    for name, points in curves.items():
        xs, ys, errs = zip(*points)
        axes.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name,
                      linestyle="--" if name.startswith("dylora curve") else "-")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("rank")
    axes.set_ylabel("dev overall")
    axes.grid(True, alpha=0.3)
    # below the axes: the curves fill the plot, and a legend inside covers some of their points
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axes.set_title("The rank ladder: dev overall against rank (mean ± std over seeds)")
    return save_figure(figure, path)
