"""Building a table from its runs: each run placed in its layout's row and slot, each cell the mean
and sample std over the row's finished runs (one a seed), with notes naming every missing or
failed cell, runs left out, and settings the runs should share but don't. `LAYOUTS` is every
table by name: the report's four, the generic `tasks` one, whose columns fit its runs' tasks, and
the zoo of every PEFT method (`experiment=zoo`)."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from .collect import Run, declared_table, natural_key, table_of
from .layouts import REPORT_LAYOUTS, TASK_TITLES, Cell, Layout, Row, RowKey, Table, plural
from .task_table import TASKS, tasks_layout
from .zoo import ZOO

LAYOUTS: dict[str, Layout] = {**REPORT_LAYOUTS, TASKS.name: TASKS, ZOO.name: ZOO}

Groups = dict[RowKey, dict[str, list[Run]]]


def _build_row(layout: Layout, key: RowKey, slots: dict[str, list[Run]]) -> Row:
    finished = {s: [r for r in slots.get(s, []) if r.finished] for s in layout.slots}
    cells = {}
    for col in layout.columns:
        if not layout.applies(key, col):
            cells[col.key] = Cell((), applies=False)
            continue
        feeding = [r for s in layout.slots if col.slot in (None, s) for r in finished[s]]
        values = (r.metric(col.metric) for r in feeding)
        cells[col.key] = Cell(tuple(v for v in values if v is not None))
    return Row(key, layout.labels(key), cells, {s: len(runs) for s, runs in finished.items()})


def _slot_notes(layout: Layout, key: RowKey, place: str, slot: str, runs: list[Run]) -> list[str]:
    if not runs:
        return [f"{place}: missing (no run)"]
    done = [r for r in runs if r.finished]
    rest = f"; the mean is over the other {plural(len(done), 'run')}" if done else ""
    notes = [f"{place} (seed {r.seed}): {r.status} in `{r.path}`: {r.problem}{rest}"
             for r in runs if not r.finished]
    for seed, count in Counter(r.seed for r in done).items():
        if count > 1:
            paths = ", ".join(f"`{r.path}`" for r in done if r.seed == seed)
            notes.append(f"{place}: seed {seed} has {count} finished runs ({paths}); "
                         "the mean is over them all")
    for col in layout.columns:
        if (done and col.slot == slot and layout.applies(key, col)
                and all(r.metric(col.metric) is None for r in done)):
            notes.append(f"{place}: no `{col.metric}` in the metrics.json of "
                         + ", ".join(f"`{r.path}`" for r in done))
    return notes


def _gap_notes(layout: Layout, key: RowKey, slots: dict[str, list[Run]]) -> list[str]:
    where = layout.describe(key)
    if not any(slots.values()):
        return [f"{where}: missing (no run)"]
    notes: list[str] = []
    for slot in layout.slots:
        place = f"{where}, {TASK_TITLES.get(slot, slot)}" if slot else where
        notes += _slot_notes(layout, key, place, slot, slots.get(slot, []))
    return notes


def _shared_notes(layout: Layout, runs: list[Run]) -> list[str]:
    notes = []
    for what, describe in layout.shared:
        counts = Counter(describe(run) for run in runs)
        if len(counts) > 1:
            found = ", ".join(f"{value} ({plural(n, 'run')})"
                              for value, n in sorted(counts.items()))
            notes.append(f"the runs use several {what}: {found}; a row pools them")
    return notes


def build_table(layout: Layout, runs: list[Run], full_grid: bool,
                extra_notes: Iterable[str] = ()) -> Table:
    """One table from its runs. `full_grid`: every canonical row shows, with or without runs;
    otherwise only rows that have runs (an ad-hoc run is not a sweep that left cells out)."""
    groups: Groups = defaultdict(lambda: defaultdict(list))
    left_out = []
    for run in runs:
        slot = layout.slot_of(run)
        if slot in layout.slots:
            groups[layout.row_of(run)][slot].append(run)
        else:
            left_out.append(f"left out `{run.path}`: its trainer.task is {slot or 'not set'}")
    keys = [k for k in layout.canonical if full_grid or k in groups]
    keys += sorted((k for k in groups if k not in layout.canonical),
                   key=layout.order or (lambda k: natural_key("\0".join(k))))
    rows = [_build_row(layout, key, groups.get(key, {})) for key in keys]
    notes = [note for key in keys for note in _gap_notes(layout, key, groups.get(key, {}))]
    return Table(layout, rows, notes + left_out + _shared_notes(layout, runs) + list(extra_notes))


def build_tables(runs: Iterable[Run], names: Iterable[str] = tuple(LAYOUTS)) -> list[Table]:
    """The tables among `names` (keys of LAYOUTS) that have runs, in LAYOUTS' order."""
    by_table: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_table[table_of(run)].append(run)
    tables = []
    for name in (n for n in LAYOUTS if n in set(names)):
        table_runs = by_table.get(name, [])
        if not table_runs:
            continue
        if name == TASKS.name:
            layout, metric_notes = tasks_layout(table_runs)
            tables.append(build_table(layout, table_runs, False, metric_notes))
        else:
            full_grid = any(declared_table(run) == name for run in table_runs)
            tables.append(build_table(LAYOUTS[name], table_runs, full_grid))
    return tables
