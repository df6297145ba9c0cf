"""The report's Tables 1–3 and Figure 2 from folders of Hydra runs.

    python scripts/make_tables.py outputs/multirun/<date>/<time>       # every table with runs
    python scripts/make_tables.py <sweep> <another sweep> --table 2 3 --out report/tables

A run is any folder below the given ones with `.hydra/config.yaml`; its `experiment_name` (or, for
an ad-hoc run, its trainer and PEFT method) says which table it belongs to, the rest of its config
which row and column. Finished runs have `metrics.json`; a cell is the mean ± sample std over its
runs (seeds). Each table is printed as Markdown and written as `table{N}.md`, `.csv` and `.tex`
into --out (default: `<first folder>/tables`), with `figure2.png` from Table 1's runs. A missing,
failed (`error.txt`) or unfinished run leaves a gap, and a note under the table names it.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from report_tables import (NoRunsError, build_tables, collect_runs, figure2,  # noqa: E402
                           markdown, table_of, write_table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tables 1-3 and Figure 2 from Hydra runs.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="sweep or run folders, searched recursively for .hydra/config.yaml")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the tables (default: <first DIR>/tables)")
    parser.add_argument("--table", type=int, choices=(1, 2, 3), nargs="+", action="extend",
                        help="only these tables (default: every table with runs)")
    return parser.parse_args(argv)


def _names(numbers: Sequence[int]) -> str:
    return ("Table " if len(numbers) == 1 else "Tables ") + ", ".join(map(str, numbers))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folders = ", ".join(str(d) for d in args.dirs)
    try:
        runs, warnings = collect_runs(args.dirs)
    except NoRunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not runs:
        print(f"error: no readable run under {folders}", file=sys.stderr)
        return 2
    wanted = sorted(set(args.table or (1, 2, 3)))
    tables = build_tables(runs, wanted)
    if not tables:
        found = sorted({table_of(run) for run in runs})
        print(f"error: no runs for {_names(wanted)} under {folders} (its runs are for "
              f"{_names(found)})", file=sys.stderr)
        return 2
    out_dir = args.out or args.dirs[0] / "tables"
    written: list[Path] = []
    for table in tables:
        print(markdown(table))
        written += write_table(table, out_dir)
        if table.layout.number == 1:
            written.append(figure2(table, out_dir / "figure2.png"))
    print(f"wrote {', '.join(p.name for p in written)} to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
