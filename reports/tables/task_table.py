"""The generic `tasks` table, for runs on other tasks than the report's (its tables take runs on
sst, para and sts, or on one of them alone): `tasks=[sst,para,sts,cfimdb]`, `tasks=[sst,mytask]`,
`trainer=single trainer.task=cfimdb`.

A row is one task list (in training order), strategy (Table 3's, or the single-task trainer), PEFT
config and head design: runs pool into a row (a cell is the mean ± std over its seeds) only where
all four are the same, so runs on different task lists are different rows of one table. The
columns are every task of any row, in the order the runs name them, each scoring the task's
primary metric (`cfimdb acc`, `mnli macro_f1`, `sts pearson`), then Overall and Parameters
updated; a row's cell under a task its runs did not train is blank (a gap, "—", is a missing
result). A task's primary metric is the one its task config in `run.json` names (accuracy is
metrics.json's `acc`), else the first `<task>/dev/*` key of metrics.json; where runs disagree, the
column shows the metric most of them use, and a note says so."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from .collect import Run, plain_sequential, single_task
from .layouts import (DESIGNS, OVERALL, PARAMS, Column, Layout, RowKey, describe_peft, design_of,
                      model_of, plural, strategy_label, strategy_of)


def strategy(run: Run) -> RowKey:
    """(strategy, detail) as Table 3's rows, with the single-task trainer's, and no order for
    sequential training: the task list, in its order, is a column of its own."""
    if single_task(run):
        return ("single", "")
    if plain_sequential(run):
        return ("sequential", "")
    return strategy_of(run)


def row_of(run: Run) -> RowKey:
    """(tasks joined by commas, strategy, detail, PEFT config, head design)."""
    return (",".join(run.tasks), *strategy(run), describe_peft(run), design_of(run))


def _labels(key: RowKey) -> tuple[str, ...]:
    tasks, kind, detail, peft, design = key
    return (tasks.replace(",", ", "), strategy_label((kind, detail)), peft,
            DESIGNS.get(design, design))


def _describe(key: RowKey) -> str:
    tasks, strat, peft, design = _labels(key)
    return f"{strat} on [{tasks}], {peft}, {design}"


def _applies(key: RowKey, column: Column) -> bool:
    return column.task is None or column.task in key[0].split(",")


TASKS = Layout(
    name="tasks", title="Tasks: runs on other tasks than the report's, by strategy (dev)",
    label_keys=("tasks", "strategy", "peft", "heads"),
    label_titles=("Tasks", "Strategy", "PEFT", "Head design"),
    columns=(OVERALL, PARAMS),  # a task's column each before these: `tasks_layout`
    canonical=(), row_of=row_of, labels=_labels, describe=_describe,
    slot_of=lambda run: "", shared=(("models", model_of),), applies=_applies)


def task_order(runs: Iterable[Run]) -> list[str]:
    """Every task of the runs, in the order they first name them."""
    return list(dict.fromkeys(task for run in runs for task in run.tasks))


def primary_metric(task: str, runs: list[Run]) -> tuple[str | None, list[str]]:
    """The metrics.json key (`acc`, `macro_f1`) of a task's primary metric, the one most of the
    runs on it use, and a note where they use several or none says it."""
    counts = Counter(key for run in runs if task in run.tasks
                     if (key := run.metric_key(task)) is not None)
    if not counts:
        return None, [f"{task}: no run says its primary metric (no task config in run.json, no "
                      f"`{task}/dev/*` in metrics.json); its column is empty"]
    chosen = counts.most_common(1)[0][0]  # a tie: the one named first
    if len(counts) == 1:
        return chosen, []
    found = ", ".join(f"{key} ({plural(n, 'run')})" for key, n in counts.items())
    return chosen, [f"the runs score {task} by several primary metrics: {found}; its column "
                    f"is each run's `{task}/dev/{chosen}`"]


def task_column(task: str, key: str | None) -> Column:
    if key is None:
        return Column(task, task, f"{task}/dev/*", task=task)
    return Column(f"{task}_{key}", f"{task} {key}", f"{task}/dev/{key}", task=task)


def tasks_layout(runs: list[Run]) -> tuple[Layout, list[str]]:
    """TASKS with a column for each of the runs' tasks, and the notes on their primary metrics."""
    columns, notes = [], []
    for task in task_order(runs):
        key, note = primary_metric(task, runs)
        columns.append(task_column(task, key))
        notes += note
    return replace(TASKS, columns=(*columns, *TASKS.columns)), notes
