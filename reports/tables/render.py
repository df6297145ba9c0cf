"""Writing a built table out: Markdown (a GitHub pipe table under a bold title, notes as bullets),
CSV (one column per metric mean and std, numbers only) and LaTeX (a booktabs `tabular`, notes as
comments). Missing cells are gaps: "—" in Markdown and CSV, "--" in LaTeX; a cell that is not
the row's (the generic table's column of a task the row's runs did not train) is blank."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from .layouts import Cell, Column, Table

GAP = "—"
TEX_GAP = "--"
TEX_CHARS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "→": r"$\rightarrow$", "±": r"$\pm$", "–": "--", "—": "---",
}


def format_score(cell: Cell) -> str | None:
    """`0.520 ± 0.028` over several runs, `0.520` over one, None over none."""
    if cell.mean is None:
        return None
    return f"{cell.mean:.3f}" if cell.std is None else f"{cell.mean:.3f} ± {cell.std:.3f}"


def format_percent(cell: Cell) -> str | None:
    """`4.16 %`, or the range `0.56–0.57 %` where the runs differ."""
    if not cell.values:
        return None
    low, high = f"{min(cell.values):.2f}", f"{max(cell.values):.2f}"
    return f"{low} %" if low == high else f"{low}–{high} %"


def format_cost(cell: Cell, unit: str) -> str | None:
    """A cost's mean over the runs: `1.23 M` (count), `12.3 MiB` (bytes), `98.1 / s` (rate)."""
    if cell.mean is None:
        return None
    if unit == "bytes":
        return f"{cell.mean / 2 ** 20:.1f} MiB"
    if unit == "rate":
        return f"{cell.mean:.1f} / s"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(cell.mean) >= size:
            return f"{cell.mean / size:.3g} {suffix}"
    return f"{cell.mean:.0f}"


def cell_text(column: Column, cell: Cell) -> str | None:
    """The cell as shown: None for a gap, "" for a cell that is not the row's."""
    if not cell.applies:
        return ""
    if column.unit:
        return format_cost(cell, column.unit)
    return format_percent(cell) if column.percent else format_score(cell)


def _table_cells(table: Table) -> list[list[str | None]]:
    """Each row's labels and cell texts; None marks a gap."""
    return [[*row.labels, *(cell_text(col, row.cells[col.key]) for col in table.layout.columns)]
            for row in table.rows]


def seed_note(table: Table) -> str | None:
    """The footnote on what a cell is, where some cell averages several runs."""
    counts = sorted({cell.n for row in table.rows for col in table.layout.columns
                     if not col.percent and not col.unit and (cell := row.cells[col.key]).n})
    if not counts or counts[-1] < 2:
        return None
    has_costs = any(col.unit for col in table.layout.columns)
    costs = "; a cost is the mean over the seeds" if has_costs else ""
    if len(counts) == 1:
        return f"mean ± std (sample, ddof=1) over {counts[0]} seeds{costs}"
    return (f"mean ± std (sample, ddof=1) over {counts[0]}–{counts[-1]} seeds "
            f"(the n of each cell is in {table.layout.name}.csv){costs}")


def notes(table: Table) -> list[str]:
    """The notes under a table: what a cell is, then the table's own notes."""
    footnote = seed_note(table)
    return ([footnote] if footnote else []) + table.notes


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(table: Table) -> str:
    layout = table.layout
    lines = [f"**{layout.title}**", "",
             _md_row([*layout.label_titles, *(col.title for col in layout.columns)]),
             _md_row(["---"] * len(layout.label_titles) + ["---:"] * len(layout.columns))]
    lines += [_md_row([GAP if c is None else c for c in cells]) for cells in _table_cells(table)]
    below = notes(table)
    if below:
        lines += ["", *(f"- {note}" for note in below)]
    return "\n".join(lines) + "\n"


def _csv_header(table: Table) -> list[str]:
    header = list(table.layout.label_keys)
    for col in table.layout.columns:
        suffixes = ("", "_min", "_max") if col.percent else ("", "_std")
        header += [col.key + suffix for suffix in suffixes]
    return header + [f"{slot}_n_seeds" if slot else "n_seeds" for slot in table.layout.slots]


def _csv_cells(column: Column, cell: Cell) -> list[str]:
    if not cell.applies:
        return ["", "", ""] if column.percent else ["", ""]
    if cell.mean is None:
        return [GAP, "", ""] if column.percent else [GAP, ""]
    if column.percent:
        return [f"{value:.2f}" for value in (cell.mean, min(cell.values), max(cell.values))]
    if column.unit:  # a cost, in its own unit (bytes, examples per second, parameters)
        return [f"{cell.mean:.1f}", "" if cell.std is None else f"{cell.std:.1f}"]
    return [f"{cell.mean:.3f}", "" if cell.std is None else f"{cell.std:.3f}"]


def csv_text(table: Table) -> str:
    """Header row, then one row per table row: labels, each metric's mean and std (a percent
    column: mean, min and max over the row's runs), and the finished runs in each slot."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_csv_header(table))
    for row in table.rows:
        cells = [value for col in table.layout.columns
                 for value in _csv_cells(col, row.cells[col.key])]
        writer.writerow([*row.labels, *cells, *(row.seeds[s] for s in table.layout.slots)])
    return out.getvalue()


def tex_escape(text: str) -> str:
    return "".join(TEX_CHARS.get(char, char) for char in text)


def _tex_row(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def latex(table: Table) -> str:
    """A booktabs `tabular` (labels left, numbers right); title and notes as comments."""
    layout = table.layout
    spec = "l" * len(layout.label_titles) + "r" * len(layout.columns)
    header = [tex_escape(t) for t in (*layout.label_titles, *(c.title for c in layout.columns))]
    lines = [f"% {layout.title}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule", _tex_row(header),
             r"\midrule"]
    lines += [_tex_row([TEX_GAP if c is None else tex_escape(c) for c in cells])
              for cells in _table_cells(table)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {note}" for note in notes(table)]
    return "\n".join(lines) + "\n"


def write_table(table: Table, out_dir: Path) -> list[Path]:
    """Writes `<name>.md`, `.csv` and `.tex` (table1, ..., figure2, tasks) into `out_dir`;
    returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = table.layout.name
    written = []
    for suffix, text in (("md", markdown(table)), ("csv", csv_text(table)),
                         ("tex", latex(table))):
        path = out_dir / f"{stem}.{suffix}"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
