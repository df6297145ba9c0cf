"""The report's Tables 1–3 and Figure 2 from folders of Hydra runs, optionally beside the report's
own numbers, and a generic table (`tasks`) for runs on other tasks.

    python scripts/make_tables.py outputs/multirun/<date>/<time>       # every table with runs
    python scripts/make_tables.py <sweep> <another sweep> --table 2 3 --out report/tables
    python scripts/make_tables.py <table3 sweep> --reference report    # ours beside the report's
    python scripts/make_tables.py <sweep with tasks=[sst,para,sts,cfimdb]> --table tasks
    python scripts/make_tables.py <experiment=zoo sweep> --table zoo        # and zoo-pareto.png

A run is any folder below the given ones with `run.json` (older runs: `.hydra/config.yaml`). A
run on the report's tasks (sst, para and sts: `tasks`, or an older run's `order.tasks`; or one of
them alone, trainer=single) goes in a report table: its `experiment_name` (or, for an ad-hoc run, its trainer and PEFT method)
says which, the rest of its config which row and column. Every other run goes in the `tasks`
table: a row per task list, strategy, PEFT config and head design, a column per task with its
primary metric (`reports/tables/task_table.py`). Finished runs have `metrics.json`; a cell is the
mean ± sample std over its runs (seeds). Each table is printed as Markdown and written as
`table{N}.md`, `.csv` and `.tex` (tasks.md, .csv and .tex for the tasks table) into --out (default:
`<first folder>/tables`); Figure 2's grid (`experiment=figure2`) as `figure2.md/csv/tex` and
`figure2.png`; the zoo (`experiment=zoo`: every PEFT method, its scores and costs) as
`zoo.md/csv/tex` and its Pareto plot `zoo-pareto.png` (a run that overrides `peft.*` or `optim.*`
settings on the command line is a row of its own: `lora targets=all_linear rank=4`), and where
the zoo has a rank ladder (`peft.rank=1,2,...`) or DyLoRA curves, `zoo-ranks.png`. A missing,
failed (`error.txt`) or unfinished run leaves a gap, and a note under the table names it. `--reference report` prints,
under each table, the report's published dev numbers (bert-base, 10 epochs) beside ours, cell for
cell, with the difference, and writes it as `<table>-vs-report.md`; `--reference FILE.csv` uses
other numbers.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reports.tables import (LAYOUTS, REFERENCES, NoRunsError, ReferenceError, beside,
                            build_tables, collect_runs, figure2, load_reference,
                            margins_markdown, markdown, table_of, write_table, zoo_pareto,
                            zoo_ranks)


def table_name(value: str) -> str:
    """`2` or `table2` -> `table2`; `figure2` and `tasks` stay."""
    name = f"table{value}" if value.isdigit() else value
    if name not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"{value!r}: use 1, 2, 3, figure2, tasks or zoo")
    return name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tables 1-3 and Figure 2 from Hydra runs, the tasks table for runs on "
                    "other tasks, and the zoo of PEFT methods.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="sweep or run folders, searched recursively for run.json (or, "
                             "older runs, .hydra/config.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the tables (default: <first DIR>/tables)")
    parser.add_argument("--table", type=table_name, nargs="+", action="extend",
                        help="only these tables: 1, 2, 3, figure2, tasks, zoo (default: every "
                             "one with runs)")
    parser.add_argument("--reference", metavar="NAME|CSV",
                        help=f"print published numbers beside ours: {', '.join(REFERENCES)} "
                             "(the report's), or a CSV of the same columns")
    return parser.parse_args(argv)


def _names(names: Sequence[str]) -> str:
    return ", ".join("the tasks table" if n == "tasks" else
                     n.replace("table", "Table ").replace("figure", "Figure ") for n in names)


def _write_margins(runs: list, path: Path) -> list[Path]:
    """`zoo-margins.md` (printed too) where the heads-only baseline ran, else nothing."""
    text = margins_markdown(runs)
    if text is None:
        return []
    print(text)
    path.write_text(text, encoding="utf-8")
    return [path]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folders = ", ".join(str(d) for d in args.dirs)
    try:
        reference = load_reference(args.reference) if args.reference else None
        runs, warnings = collect_runs(args.dirs)
    except (NoRunsError, ReferenceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not runs:
        print(f"error: no readable run under {folders}", file=sys.stderr)
        return 2
    wanted = args.table or list(LAYOUTS)
    tables = build_tables(runs, wanted)
    if not tables:
        found = [n for n in LAYOUTS if n in {table_of(run) for run in runs}]
        print(f"error: no runs for {_names([n for n in LAYOUTS if n in wanted])} under "
              f"{folders} (its runs are for {_names(found)})", file=sys.stderr)
        return 2
    out_dir = args.out or args.dirs[0] / "tables"
    written: list[Path] = []
    for table in tables:
        print(markdown(table))
        written += write_table(table, out_dir)
        if table.layout.name == "figure2":
            written.append(figure2(table, out_dir / "figure2.png"))
        if table.layout.name == "zoo":
            written.append(zoo_pareto(table, out_dir / "zoo-pareto.png"))
            zoo_runs = [run for run in runs if table_of(run) == "zoo"]
            ranks = zoo_ranks(table, zoo_runs, out_dir / "zoo-ranks.png")
            written += [ranks] if ranks else []
            written += _write_margins(zoo_runs, out_dir / "zoo-margins.md")
        side = beside(table, reference) if reference else None
        if side:
            print(side)
            path = out_dir / f"{table.layout.name}-vs-{Path(reference.name).stem}.md"
            path.write_text(side, encoding="utf-8")
            written.append(path)
    print(f"wrote {', '.join(p.name for p in written)} to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
