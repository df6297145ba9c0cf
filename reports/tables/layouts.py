"""The report's table layouts: which run goes in which row and column, display names, canonical row
order, the report's row each row is compared with; and what a layout, a cell, a row and a built
table are (`build` builds a table from runs; `task_table` is the generic layout for other tasks).

Table 1 is the full fine-tuning model the report submitted (one row: joint encoding, the default
order); Figure 2's grid (head design × task order, full fine-tuning) is a layout of its own, drawn
as `figure2.png` and written as `figure2.md/csv/tex`."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .collect import Run

RowKey = tuple[str, ...]
ORDERS = ("sst-para-sts", "sst-sts-para", "para-sst-sts", "para-sts-sst", "sts-sst-para",
          "sts-para-sst")
DESIGNS = {"concat": "Concatenation", "separate": "Projection + aggregation",
           "joint": "Joint encoding"}
TASK_TITLES = {"sst": "SST acc", "para": "Para acc", "sts": "STS corr"}


@dataclass(frozen=True)
class Column:
    """A metric column; `slot` is the runs it reads (a task in Table 2), None: all of the row's;
    `task` the task it scores in the generic layout (None: every row's, Overall, Parameters)."""

    key: str
    title: str
    metric: str
    slot: str | None = ""
    percent: bool = False
    task: str | None = None
    unit: str = ""  # a cost column: "count" (1.2 M), "bytes" (12.3 MiB), "rate" (98.1 / s)


@dataclass(frozen=True)
class Layout:
    """Where each run goes in one table. A row holds one run per seed in each of its `slots`."""

    name: str  # table1 | table2 | table3 | figure2 | tasks: the file stem and the --table choice
    title: str
    label_keys: tuple[str, ...]
    label_titles: tuple[str, ...]
    columns: tuple[Column, ...]
    canonical: tuple[RowKey, ...]
    row_of: Callable[[Run], RowKey]
    labels: Callable[[RowKey], tuple[str, ...]]
    describe: Callable[[RowKey], str]
    slot_of: Callable[[Run], str]
    slots: tuple[str, ...] = ("",)
    shared: tuple[tuple[str, Callable[[Run], str]], ...] = ()
    reference_row: Callable[[RowKey], str | None] = lambda key: None  # the report's `row`
    # False: the column is not the row's (a task its runs did not train): a blank, not a gap
    applies: Callable[[RowKey, Column], bool] = lambda key, column: True
    order: Callable[[RowKey], Any] | None = None  # the sort of rows not in `canonical`; None:
    # natural order of the joined key (run2 before run10)


@dataclass(frozen=True)
class Cell:
    values: tuple[float, ...]
    applies: bool = True  # False: a blank (the row has no such task), not a missing result

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass(frozen=True)
class Row:
    key: RowKey
    labels: tuple[str, ...]
    cells: dict[str, Cell]
    seeds: dict[str, int]  # finished runs in each slot


@dataclass(frozen=True)
class Table:
    layout: Layout
    rows: list[Row]
    notes: list[str]  # missing and failed cells, runs left out, settings the runs don't share


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def order_name(run: Run) -> str:
    """`sst-para-sts`: the run's tasks in training order (`tasks`, an older run's `order.tasks`)."""
    return "-".join(run.tasks)


def order_label(name: str) -> str:
    return " → ".join(name.split("-"))


def peft_targets(run: Run) -> str:
    targets = run.get("peft.targets", "")
    return "+".join(str(t) for t in targets) if isinstance(targets, list) else str(targets)


def describe_peft(run: Run) -> str:
    """`Lora r=64 all_linear bias=all`, or the class name alone for full fine-tuning."""
    parts = [run.target("peft") or "?"]
    if run.get("peft.rank") is not None:
        parts.append(f"r={run.get('peft.rank')}")
    parts += [peft_targets(run)] if run.get("peft.targets") is not None else []
    parts += [f"bias={run.get('peft.bias')}"] if run.get("peft.bias", "none") != "none" else []
    return " ".join(parts)


def model_of(run: Run) -> str:
    return str(run.get("model.name", "?"))


def design_of(run: Run) -> str:
    return str(run.get("heads.design", "?"))


def _one_slot(run: Run) -> str:
    return ""


def score_columns(slot_by_task: bool) -> tuple[Column, ...]:
    """The three dev-score columns (SST acc, Quora acc, STS Pearson), shared by the report tables and
    the zoo; slot_by_task: each reads only the runs in its task's slot (Table 2)."""
    metrics = {"sst": "sst/dev/acc", "para": "para/dev/acc", "sts": "sts/dev/pearson"}
    keys = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_corr"}
    return tuple(Column(keys[t], TASK_TITLES[t], metrics[t], t if slot_by_task else "")
                 for t in metrics)


PARAMS = Column("params_updated_pct", "Parameters updated", "params/updated_pct", None, True)
OVERALL = Column("overall", "Overall", "dev/overall")

TABLE1 = Layout(
    name="table1", title="Table 1: full fine-tuning, the submitted model (dev)",
    label_keys=("model",), label_titles=("Model",),
    columns=(*score_columns(False), OVERALL, PARAMS),
    canonical=(("joint", "sst-para-sts"),),
    row_of=lambda run: (design_of(run), order_name(run)),
    labels=lambda key: (f"Full fine-tuning ({DESIGNS.get(key[0], key[0]).lower()}, "
                        f"{order_label(key[1])})",),
    describe=lambda key: f"Full fine-tuning, {DESIGNS.get(key[0], key[0])}, {order_label(key[1])}",
    slot_of=_one_slot, shared=(("models", model_of), ("PEFT configs", describe_peft)),
    reference_row=lambda key: "full-ft")

FIGURE2 = Layout(
    name="figure2", title="Figure 2: full fine-tuning by head design and task order (dev)",
    label_keys=("design", "order"), label_titles=("Design", "Task order"),
    columns=(*score_columns(False), OVERALL),
    canonical=tuple((d, o) for d in DESIGNS for o in ORDERS),
    row_of=lambda run: (design_of(run), order_name(run)),
    labels=lambda key: (DESIGNS.get(key[0], key[0]), order_label(key[1])),
    describe=lambda key: f"{DESIGNS.get(key[0], key[0])}, {order_label(key[1])}",
    slot_of=_one_slot, shared=(("models", model_of), ("PEFT configs", describe_peft)))

TABLE2_ROWS: dict[RowKey, str] = {
    **{("Lora", "attn_qkv", "none", rank): "LoRA (query & value & key)"
       for rank in ("2", "4", "16", "64")},
    ("Dora", "attn_qkv", "none", "64"): "DoRA (query & value & key)",
    ("Lora", "all_linear", "none", "64"): "LoRA (all linear)",
    ("Lora", "all_linear", "all", "64"): "LoRA (all linear & bias)",
    ("Lora", "all_linear", "none", "128"): "LoRA (all linear)",
}


def _table2_row(run: Run) -> RowKey:
    rank = run.get("peft.rank")
    return (run.target("peft") or "?", peft_targets(run), str(run.get("peft.bias", "none")),
            "" if rank is None else str(rank))


def _table2_method(key: RowKey) -> str:
    if key in TABLE2_ROWS:
        return TABLE2_ROWS[key]
    method, targets, bias, _ = key
    details = [d for d in (targets, "" if bias == "none" else f"bias {bias}") if d]
    return f"{method} ({', '.join(details)})" if details else method


def _table2_reference(key: RowKey) -> str | None:
    method, targets, bias, rank = key
    short = {"attn_qkv": "qkv", "all_linear": "all"}.get(targets)
    if method not in ("Lora", "Dora") or short is None:
        return None
    return f"{method.lower()}-{short}{'-bias' if bias == 'all' else ''}-r{rank}"


TABLE2 = Layout(
    name="table2", title="Table 2: single-task PEFT (dev)",
    label_keys=("method", "rank"), label_titles=("Method", "Rank"),
    columns=(PARAMS, *score_columns(True)),
    canonical=tuple(TABLE2_ROWS),
    row_of=_table2_row,
    labels=lambda key: (_table2_method(key), key[3]),
    describe=lambda key: f"{_table2_method(key)} r={key[3]}" if key[3] else _table2_method(key),
    slot_of=lambda run: str(run.get("trainer.task", "")), slots=("sst", "para", "sts"),
    shared=(("models", model_of), ("head designs", design_of)), reference_row=_table2_reference)


def strategy_of(run: Run) -> RowKey:
    """Table 3's row of a multi-task run, (strategy, detail): ("sequential", "sst-para-sts"), read
    from the parts its trainer was composed of (`trainers.strategies.strategy`)."""
    if run.target("trainer.init") == "OrthogonalBlocks":
        return ("orthoada", "")
    finisher, schedule = run.target("trainer.finisher"), run.target("trainer.schedule")
    if finisher == "MergeExperts":
        return ("merged", str(run.get("trainer.finisher.merge", "linear")))
    if finisher == "Experts":
        return ("eoe", "")
    if schedule == "Sampled":
        combiner = run.get("trainer.combiner", "sum")
        combiner = combiner.get("name", "sum") if isinstance(combiner, dict) else str(combiner)
        extra = {"sum": "", "pcgrad": " + PCGrad", "gradvac": " + GradVac"}.get(
            combiner, f" + {combiner}")
        return ("interleaved", f"{run.get('trainer.schedule.sampler', '?')}{extra}")
    if schedule == "Sequential":
        return ("sequential", order_name(run))
    return (run.target("trainer") or "?", "")


def strategy_label(key: RowKey) -> str:
    """`FedAvg`, `Sequential (sst → para → sts)`, `Interleaved (temperature)`."""
    kind, detail = key
    fixed = {("eoe", ""): "Ensemble of Experts", ("merged", "linear"): "FedAvg",
             ("orthoada", ""): "OrthoAda"}
    if key in fixed:
        return fixed[key]
    names = {"sequential": "Sequential", "merged": "Merged", "interleaved": "Interleaved",
             "single": "Single task"}
    detail = order_label(detail) if kind == "sequential" else detail
    name = names.get(kind, kind)
    return f"{name} ({detail})" if detail else name


def _table3_reference(key: RowKey) -> str | None:
    fixed = {("eoe", ""): "eoe", ("merged", "linear"): "fedavg", ("orthoada", ""): "orthoada"}
    return f"seq-{key[1]}" if key[0] == "sequential" else fixed.get(key)


TABLE3 = Layout(
    name="table3", title="Table 3: multi-task strategies (dev)",
    label_keys=("strategy",), label_titles=("Strategy",),
    columns=(PARAMS, *score_columns(False), OVERALL),
    canonical=(*(("sequential", o) for o in ORDERS), ("eoe", ""), ("merged", "linear"),
               ("orthoada", "")),
    row_of=strategy_of, labels=lambda key: (strategy_label(key),), describe=strategy_label,
    slot_of=_one_slot,
    shared=(("models", model_of), ("PEFT configs", describe_peft), ("head designs", design_of)),
    reference_row=_table3_reference)

REPORT_LAYOUTS = {layout.name: layout for layout in (TABLE1, TABLE2, TABLE3, FIGURE2)}
