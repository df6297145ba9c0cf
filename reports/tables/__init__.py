"""Tables 1–3 and Figure 2 of the report, and a generic table for runs on other tasks, from a
folder of Hydra runs: `collect` finds and reads the runs, `layouts` places them in the report's
tables' rows and columns, `task_table` in the generic one's, `build` builds each table, `render`
writes Markdown, CSV and LaTeX, `figure` draws Figure 2, `reference` prints the report's numbers
beside ours, `zoo` lays out and plots every PEFT method side by side, `margins` sets each
against the heads-only baseline. `scripts/make_tables.py` is
the command line."""
from .build import LAYOUTS, build_tables
from .collect import NoRunsError, Run, collect_runs, table_of
from .figure import figure2
from .layouts import Table
from .margins import margins_markdown
from .reference import REFERENCES, ReferenceError, beside, load_reference
from .render import csv_text, latex, markdown, write_table
from .zoo import zoo_pareto, zoo_ranks

__all__ = ["LAYOUTS", "NoRunsError", "REFERENCES", "ReferenceError", "Run", "Table", "beside",
           "build_tables", "collect_runs", "csv_text", "figure2", "latex", "load_reference",
           "margins_markdown", "markdown", "table_of", "write_table", "zoo_pareto", "zoo_ranks"]
