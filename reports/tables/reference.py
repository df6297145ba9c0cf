"""Published numbers beside reproduced ones: the multi-task minBERT PEFT report's dev numbers for
its Tables 1–3 (bert-base-uncased, 10 epochs; `report-numbers.csv`, one row per cell, copied from
the report), or any CSV of the same columns, printed cell for cell next to a built table with the
difference (ours − theirs)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .layouts import Cell, Column, Table
from .render import GAP, cell_text

REFERENCES = {"report": Path(__file__).with_name("report-numbers.csv")}
KEYS = ("table", "row")  # what identifies a reference row
VALUES = ("sst_acc", "para_acc", "sts_corr", "overall", "params_updated_pct")  # Column.key's


class ReferenceError(Exception):
    """A reference that cannot be read: an unknown name, a missing file, a bad row."""


@dataclass(frozen=True)
class Reference:
    name: str
    path: Path
    rows: dict[tuple[str, str], dict[str, float]]  # (table, row) -> column key -> value
    description: str  # the file's leading comment lines


def load_reference(name_or_path: str) -> Reference:
    """`report` (the shipped report numbers) or the path of a CSV with `table,row` and any of
    `sst_acc, para_acc, sts_corr, overall, params_updated_pct`; `#` lines are comments."""
    path = REFERENCES.get(name_or_path, Path(name_or_path))
    if not path.is_file():
        raise ReferenceError(f"no reference {name_or_path!r}: use one of {sorted(REFERENCES)} or "
                             "the path of a CSV with columns table,row,sst_acc,...")
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = [l.lstrip("# ").strip() for l in lines if l.startswith("#")]
    header = next((c for c in comments if c.startswith(KEYS[0] + ",")), None)
    body = [l for l in lines if l.strip() and not l.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(([header] if header else []) + body)))
    if not reader.fieldnames or not set(KEYS) <= set(reader.fieldnames):
        raise ReferenceError(f"{path}: needs a header with columns {list(KEYS)} and values")
    rows = {}
    for n, row in enumerate(reader, start=2):
        try:
            rows[(row["table"], row["row"])] = {k: float(row[k]) for k in VALUES
                                                if row.get(k) not in (None, "")}
        except ValueError as e:
            raise ReferenceError(f"{path}, row {n}: {e}") from e
    described = " ".join(c for c in comments if c != header)
    return Reference(name_or_path, path, rows, described)


def _compare(column: Column, ours: Cell, theirs: float | None) -> str:
    mine = cell_text(column, ours)
    if theirs is None:
        return mine or GAP
    shown = f"{theirs:.2f} %" if column.percent else f"{theirs:.3f}"
    if mine is None:
        return f"{GAP} / {shown}"
    delta = ours.mean - theirs
    return f"{mine} / {shown} ({delta:+.2f})" if column.percent else f"{mine} / {shown} ({delta:+.3f})"



def beside(table: Table, reference: Reference) -> str | None:
    """Markdown: each row of `table` that the reference has, every metric as `ours / theirs (Δ)`;
    None where the reference has no row for this table."""
    layout = table.layout
    matched = [(row, reference.rows.get((layout.name, layout.reference_row(row.key) or "")))
               for row in table.rows]
    if not any(ref for _, ref in matched):
        return None
    title = (f"**{layout.title.split(':')[0]} beside the {reference.name}: ours / theirs "
             "(Δ = ours − theirs)**")
    head = [*layout.label_titles, *(c.title for c in layout.columns)]
    lines = [title, "", "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * len(layout.label_titles)
                               + ["---:"] * len(layout.columns)) + " |"]
    for row, ref in matched:
        if ref is None:
            continue
        cells = [_compare(c, row.cells[c.key], ref.get(c.key)) for c in layout.columns]
        lines.append("| " + " | ".join([*row.labels, *cells]) + " |")
    missing = [row.labels[0] for row, ref in matched if ref is None]
    notes = ([f"- {reference.name}: {reference.description}"] if reference.description else [])
    notes += [f"- not in the {reference.name}: {', '.join(missing)}"] if missing else []
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
