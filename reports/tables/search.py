"""The zoo's defaults search (`scripts/zoo_search.py`): for each PEFT method, dev overall at each
learning rate of its grid over seeds, and whether one is clearly better than the lr it shipped
with; then the same for its one key knob (rank, reduction factor, virtual tokens) at its lr. Runs pair by seed (the same seed draws the same data order and head init), so a verdict
reads the paired differences rather than two noisy means.

A grid point is *clearly better* than the shipped value when both have runs on at least two common
seeds, it is higher on every one of them, and its mean over those seeds is higher by at least
`MIN_GAIN` (half a point of dev overall). `search.md` / `search.csv` list every point, and
`search.png` draws each method's curve (dev overall against lr, log scale; one dot per seed);
`knobs.md` / `knobs.csv` / `knobs.png` the same for the knobs."""
from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .collect import Run
from .zoo import save_figure, settings_of

MIN_GAIN = 0.005
OVERALL = "dev/overall"


@dataclass(frozen=True)
class Point:
    """One grid point of one method (an lr, or a knob's value): dev overall by seed."""

    value: float
    scores: dict[str, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())


@dataclass(frozen=True)
class Verdict:
    method: str
    shipped: float  # the value (lr, rank, ...) the method shipped with when searched
    points: list[Point]  # by lr
    best: Point  # the highest mean over the seeds it shares with the shipped point
    gain: float | None  # best minus shipped, mean over common seeds (None: no shipped point)
    common: int  # seeds the best and the shipped point share
    clearly_better: bool
    setting: str = "lr"  # what the grid varies: lr, or the knob's name (rank, ...)


def lr_of(run: Run) -> float | None:
    """The lr a search run set on the command line (`peft.lr=...`), None for any other run."""
    for setting in settings_of(run):
        name, _, value = setting.partition("=")
        if name == "lr":
            return float(value)
    return None


def _paired(a: Point, b: Point) -> list[tuple[float, float]]:
    return [(a.scores[s], b.scores[s]) for s in sorted(a.scores) if s in b.scores]


def clearly_higher(diffs: list[float]) -> bool:
    """The rule on paired differences (one a seed): at least two, every one above 0, and their
    mean at least MIN_GAIN."""
    return len(diffs) >= 2 and all(d > 0 for d in diffs) and statistics.fmean(diffs) >= MIN_GAIN


def verdict(method: str, shipped: float, points: list[Point], setting: str = "lr") -> Verdict:
    """Which of a method's grid points is best against the shipped value, and whether clearly."""
    base = next((p for p in points if math.isclose(p.value, shipped)), None)
    if base is None:
        best = max(points, key=lambda p: p.mean)
        return Verdict(method, shipped, points, best, None, 0, False, setting)

    def gain(point: Point) -> float:
        pairs = _paired(point, base)
        return statistics.fmean(x - y for x, y in pairs) if pairs else -math.inf

    best = max(points, key=gain)
    pairs = _paired(best, base)
    clear = best is not base and clearly_higher([x - y for x, y in pairs])
    return Verdict(method, shipped, points, best, gain(best), len(pairs), clear, setting)


def verdicts(runs: list[Run], shipped: dict[str, float]) -> list[Verdict]:
    """One verdict per method with finished search runs, by method name. `shipped`: method ->
    the lr it shipped with when searched (a method missing from it is left out)."""
    grid: dict[str, dict[float, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        lr, method = lr_of(run), run.choices.get("peft")
        if run.finished and lr is not None and method in shipped and OVERALL in run.metrics:
            grid[method][lr][run.seed] = run.metrics[OVERALL]
    return [verdict(m, shipped[m], [Point(lr, dict(s)) for lr, s in sorted(grid[m].items())])
            for m in sorted(grid)]


def knob_value(run: Run, knob: dict) -> float | None:
    """The value of `knob` ({name, default, lr}) a run trained with, where it ran at the knob's lr
    and set nothing else: the default where it set only the lr (a grid run), None otherwise."""
    settings = dict(s.partition("=")[::2] for s in settings_of(run))
    lr = settings.pop("lr", None)
    if lr is None or not math.isclose(float(lr), knob["lr"]):
        return None
    if not settings:
        return float(knob["default"])
    return float(settings[knob["name"]]) if set(settings) == {knob["name"]} else None


def knob_verdicts(runs: list[Run], knobs: dict[str, dict]) -> list[Verdict]:
    """A verdict per method on its knob: each value against the default, all at the knob's lr
    (the default's runs are the lr grid's at that lr). `knobs`: method -> {name, default, lr}."""
    grid: dict[str, dict[float, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        method = run.choices.get("peft")
        if method in knobs and run.finished and OVERALL in run.metrics:
            value = knob_value(run, knobs[method])
            if value is not None:
                grid[method][value][run.seed] = run.metrics[OVERALL]
    return [verdict(m, float(knobs[m]["default"]),
                    [Point(v, dict(s)) for v, s in sorted(grid[m].items())], knobs[m]["name"])
            for m in sorted(grid)]


def _cell(point: Point) -> str:
    values = list(point.scores.values())
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) >= 2 else ""
    return f"{point.mean:.3f}{spread} (n={len(values)})"


def choice_of(v: Verdict) -> str:
    if v.gain is None:
        return f"no run at the shipped {v.setting}"
    if len(v.points) == 1:  # a search under way: nothing to compare with yet
        return f"only the shipped {v.setting} has run"
    if v.clearly_better:
        return f"**{v.best.value:g}** (+{v.gain:.3f} on {v.common} seeds)"
    if math.isclose(v.best.value, v.shipped):
        return f"keep (the shipped {v.setting} is best)"
    return f"keep ({v.best.value:g} is +{v.gain:.3f} on {v.common} seed(s): not clearly better)"


def search_markdown(found: list[Verdict]) -> str:
    """A row per method: the shipped value, every grid point's dev overall, the choice."""
    width = max((len(v.points) for v in found), default=0)
    head = ["method", "shipped", *[f"point {i + 1}" for i in range(width)], "choice"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in found:
        cells = [f"{p.value:g}: {_cell(p)}" + (" *" if math.isclose(p.value, v.shipped) else "")
                 for p in v.points]
        cells += [""] * (width - len(cells))
        lines.append("| " + " | ".join([v.method, f"{v.setting} {v.shipped:g}", *cells,
                                        choice_of(v)]) + " |")
    lines.append("")
    lines.append(f"`*` the shipped value. Dev overall, mean ± std over seeds (n seeds). Clearly "
                 f"better: higher on every common seed (at least two) and by at least "
                 f"{MIN_GAIN} on their mean.")
    return "\n".join(lines) + "\n"


def search_csv(found: list[Verdict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "setting", "shipped", "value", "seed", "dev_overall", "chosen"])
    for v in found:
        chosen = v.best.value if v.clearly_better else v.shipped
        for p in v.points:
            for seed, score in sorted(p.scores.items()):
                writer.writerow([v.method, v.setting, v.shipped, p.value, seed, score,
                                 math.isclose(p.value, chosen)])
    return out.getvalue()


def search_plot(found: list[Verdict], path: Path) -> Path:
    """Small multiples: each method's dev overall against its setting (log), a dot per seed, the
    mean as a line, the shipped value dashed."""
    cols = 4
    rows = max(1, math.ceil(len(found) / cols))
    figure = Figure(figsize=(3.4 * cols, 2.6 * rows))
    for i, v in enumerate(found):
        axes = figure.add_subplot(rows, cols, i + 1)
        for p in v.points:
            axes.scatter([p.value] * len(p.scores), list(p.scores.values()), s=10,
                         color="tab:gray")
        axes.plot([p.value for p in v.points], [p.mean for p in v.points], marker="o",
                  color="tab:red" if v.clearly_better else "tab:blue")
        axes.axvline(v.shipped, linestyle="--", color="black", linewidth=0.8)
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())  # no crowded 2x10^-4 labels
        axes.set_title(f"{v.method} ({v.setting})", fontsize=9)
        axes.tick_params(labelsize=7)
    figure.suptitle("dev overall against each setting (dashed: the shipped value; red: a "
                    "clearly better one)")
    return save_figure(figure, path, dpi=110)
