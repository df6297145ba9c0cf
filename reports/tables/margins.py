"""Each row of the zoo against the heads-only baseline (`peft=frozen`: the encoder frozen, only the
task heads train): the zoo issue's target is that every PEFT method's default beats it.

Runs pair by seed, as in the defaults search (`reports/tables/search.py`): the same seed draws the
same data order and head init, so a margin is the mean of the paired differences, and a row
*clearly beats* the baseline by the search's rule: at least two common seeds, higher on every one,
and by at least `MIN_GAIN` on their mean. `make_tables --table zoo` writes it as `zoo-margins.md`.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from .collect import Run
from .layouts import RowKey
from .search import MIN_GAIN, OVERALL, clearly_higher
from .zoo import method_of, row_order

BASELINE: RowKey = ("frozen",)


@dataclass(frozen=True)
class Margin:
    """One row's dev overall by seed, and its difference from the baseline's on each seed both ran."""

    key: RowKey
    scores: dict[int, float]
    diffs: dict[int, float]

    @property
    def gain(self) -> float | None:
        return statistics.fmean(self.diffs.values()) if self.diffs else None

    @property
    def clearly_beats(self) -> bool:
        return clearly_higher(list(self.diffs.values()))

    @property
    def verdict(self) -> str:
        if not self.diffs:
            return "no common seed with the baseline"
        if self.clearly_beats:
            return "clearly beats it"
        if all(d < 0 for d in self.diffs.values()):
            return "below it on every seed"
        if all(d > 0 for d in self.diffs.values()):
            return "above it, not clearly" if len(self.diffs) >= 2 else "above it (one seed)"
        return "level: above on some seeds, below on others"


def _scores(runs: list[Run]) -> dict[RowKey, dict[int, float]]:
    """Dev overall by zoo row (`method_of`) and seed, over the finished runs that have it (the
    mean where folders given twice hold two runs of one row and seed)."""
    found: dict[RowKey, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.finished and OVERALL in run.metrics:
            found[method_of(run)][int(run.get("seed"))].append(run.metrics[OVERALL])
    return {key: {s: statistics.fmean(v) for s, v in by_seed.items()}
            for key, by_seed in found.items()}


def margins(runs: list[Run]) -> list[Margin] | None:
    """A Margin per zoo row, in the zoo's row order; None where no run is the baseline."""
    return _margins(_scores(runs))


def _margins(by_row: dict[RowKey, dict[int, float]]) -> list[Margin] | None:
    base = by_row.get(BASELINE)
    if not base:
        return None
    return [Margin(key, scores, {s: v - base[s] for s, v in scores.items() if s in base})
            for key, scores in sorted(by_row.items(), key=lambda item: row_order(item[0]))
            if key != BASELINE]


def margins_markdown(runs: list[Run]) -> str | None:
    """`zoo-margins.md`: every row's margin over the baseline, whose own scores head it; None
    where the baseline did not run."""
    by_row = _scores(runs)
    rows = _margins(by_row)
    if rows is None:
        return None
    base = ", ".join(f"seed {s}: {v:.3f}" for s, v in sorted(by_row[BASELINE].items()))
    lines = [f"**Against the heads-only baseline** (`peft=frozen`, dev overall {base}), paired "
             f"by seed; *clearly*: higher on at least two seeds, every one, and by {MIN_GAIN} "
             "or more on the mean", "",
             "| PEFT method | seeds | dev overall | margin (paired mean) | by seed | verdict |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for m in rows:
        gain = "-" if m.gain is None else f"{m.gain:+.3f}"
        seeds = ", ".join(f"{s}: {d:+.3f}" for s, d in sorted(m.diffs.items())) or "-"
        lines.append(f"| {' '.join(m.key)} | {len(m.scores)} | "
                     f"{statistics.fmean(m.scores.values()):.3f} | {gain} | {seeds} | {m.verdict} |")
    return "\n".join(lines) + "\n"
