"""Reading a task's splits through the `datasets` library (Lhoest et al., 2021, "Datasets: A
Community Library for Natural Language Processing"): `load_dataset` on local csv, tsv, JSON (Lines)
and parquet files or a hub data set, and the CS224N files (tab-separated, header row, index column,
as in the Stanford CS224N minBERT default project) through Python's csv module, whose quoting rules
they were written with, into `Dataset.from_generator`. Every split is then checked in one cached
`map`: rows without a text (or, in CS224N files, with an unparseable label) are skipped and counted;
a missing file, a missing column or an impossible label stops the run with a message that names the
file, the row and what to do. Each step is cached by `datasets`, so a second run reads Arrow files.

Every data line of a CS224N file is accounted for: its data lines are the physical lines after the
header (split as Python splits lines: at \n, \r\n or \r; the line terminator that ends the file
starts no further line), each is one row, and rows read + malformed rows skipped = data lines, which
the log says ("ids-sst-train.csv: 8544 data lines: 8542 rows read, 2 malformed rows skipped"). A
blank line is a data line and a skipped row. A row may not span lines: under csv quoting a double
quote at the start of a field opens a quoted field that runs on to the next lone double quote,
lines (or the whole file) later, so such a row is a DataError naming the line it starts on. An empty
file or one with a header but no data rows is an `EmptyFile` error, in any format; for a test split
it only means no test predictions (`load_task_data`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import datasets
import numpy as np

from common.errors import ConfigError, DataError
from tasks.base import Task

log = logging.getLogger(__name__)
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long IMDB reviews exceed the 128 KiB default
VERSION = "2"  # bump when validation changes what a cached split holds (2: blank lines are rows)
BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "parquet": "parquet"}
NO_DATA = "corresponds to no data"  # datasets' ValueError for a file without a single row


class EmptyFile(DataError):
    """A data file without data: empty (no header either), or a header and no data rows. For a
    train or dev split an error; for a test split it means no test predictions."""

    def __init__(self, path: Path, what: str, advice: str):
        super().__init__(f"{path} {what}; {advice}")
        self.path, self.what = Path(path), what


@dataclass
class Split:
    """One task's split: a `datasets.Dataset` with columns id, text_0 (, text_1) (, label)."""

    task: Task
    name: str  # train | dev | test, or a file's stem
    path: Path
    dataset: datasets.Dataset
    skipped: int = 0

    @classmethod
    def from_rows(cls, task: Task, name: str, ids: list[str], texts: list[tuple[str, ...]],
                  labels: list[float] | None = None, path: Path = Path("-")) -> "Split":
        columns = {"id": ids, **{f"text_{c}": [t[c] for t in texts]
                                 for c in range(len(task.text_columns))}}
        columns.update({} if labels is None else {"label": [float(v) for v in labels]})
        return cls(task, name, path, datasets.Dataset.from_dict(columns))

    def __len__(self) -> int:
        return len(self.dataset)

    @cached_property
    def ids(self) -> list[str]:
        return self.dataset["id"][:]  # [:]: a list, not datasets' lazy Column

    @cached_property
    def texts(self) -> list[tuple[str, ...]]:
        return list(zip(*(self.dataset[f"text_{c}"][:]
                          for c in range(len(self.task.text_columns)))))

    @cached_property
    def labels(self) -> list[float] | None:
        return self.dataset["label"][:] if "label" in self.dataset.column_names else None

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A fixed random subset of n examples (the same for every run with the same seed)."""
        if n is None or n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return Split(self.task, self.name, self.path, self.dataset.select(keep), self.skipped)


def chosen_root(root: str | os.PathLike | None) -> Path:
    """The data root asked for: `data.root` if set, else $MINBERT_DATA, else ./data."""
    return Path(root or os.environ.get("MINBERT_DATA") or "data").expanduser().resolve()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """`chosen_root(root)`, which must exist."""
    path = chosen_root(root)
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist. Set data.root=... or MINBERT_DATA, "
                        "or fetch the files with `python scripts/get_data.py`.")
    return path


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([VERSION, *map(str, parts)]).encode()).hexdigest()[:16]


def read_split(task: Task, root: Path, split: str, cache_dir: str | None = None) -> Split:
    """A split of `task` as its source lists it; a test split's labels are not read."""
    if task.format == "hub":
        raw = _hub(task, split, cache_dir)
        return _checked(task, raw, split, Path(f"{task.source['path']}:{split}"), split != "test",
                        "hub")
    path = task.path(root, split)
    if path is None:
        raise ConfigError(f"{task.file}: source.data_files has no {split} file")
    return read_file(task, path, split, split != "test", cache_dir)


def read_file(task: Task, path: Path, split: str, labelled: bool | None = None,
              cache_dir: str | None = None, fmt: str | None = None) -> Split:
    """Reads any file of `task` in its format (or `fmt`). `labelled=None`: labelled if the data
    has the task's label column (then every row's label is read and checked)."""
    path, fmt = Path(path), fmt or task.format
    if not path.is_file():
        raise DataError(f"{path} not found: the {split} file of task {task.name} "
                        f"({task.file or 'its task file'}: source.data_files). Expected a {fmt} "
                        f"file with columns {_expected(task, fmt, labelled)}"
                        + ("; fetch the CS224N data with `python scripts/get_data.py`."
                           if fmt == "cs224n" else "."))
    expected = _expected(task, fmt, labelled)
    if _blank(path):
        expect = {"cs224n": "a tab-separated header (after an index column) with columns",
                  "csv": "a header with columns", "tsv": "a tab-separated header with columns",
                  "json": "JSON (Lines) records with fields",
                  "parquet": "a parquet table with columns"}.get(fmt, "columns")
        raise EmptyFile(path, "is empty", f"expected {expect} {expected}"
                        + (", then one example a line" if fmt in ("cs224n", "csv", "tsv") else "")
                        + f": the {split} file of task {task.name}.")
    if fmt == "cs224n":
        raw, lines = _cs224n(task, path, split, cache_dir)
    else:
        raw, lines = _local(task, fmt, path, split, cache_dir, expected), None
    return _checked(task, raw, split, path, labelled, fmt, lines)


def _blank(path: Path) -> bool:
    """Whether the file holds nothing but whitespace (0 bytes included); reads up to the first
    byte that is not."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _no_rows(path: Path, fmt: str, expected: list[str], task: Task, split: str) -> EmptyFile:
    header = fmt in ("csv", "tsv", "cs224n")
    return EmptyFile(path, "has a header but no data rows" if header else "has no data rows",
                     f"expected one example {'a line after the header' if header else 'a record'}"
                     f", with columns {expected}, in the {split} file of task {task.name}. Add the "
                     "rows, or point the task at the right file.")


def _expected(task: Task, fmt: str, labelled: bool | None) -> list[str]:
    id_column = task.id_column or ("id" if fmt == "cs224n" else None)
    return [*([id_column] if id_column else []), *task.text_columns,
            *([task.label_column] if labelled is not False else [])]


def _local(task: Task, fmt: str, path: Path, split: str, cache_dir,
           expected: list[str]) -> datasets.Dataset:
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        return datasets.load_dataset(BUILDERS[fmt], data_files={"data": str(path)}, split="data",
                                     cache_dir=cache_dir, **kwargs)
    except Exception as e:  # pyarrow's and pandas' parse errors
        if isinstance(e, ValueError) and NO_DATA in str(e):  # a header, or `[]`, and no rows
            raise _no_rows(path, fmt, expected, task, split) from None
        raise DataError(f"{path}: cannot read it as {fmt} ({type(e).__name__}: {e})") from e


def _hub(task: Task, split: str, cache_dir) -> datasets.Dataset:
    source = task.source
    name = (source.get("splits") or {}).get(split)
    if name is None:
        raise ConfigError(f"{task.file}: source.splits has no {split} split")
    try:
        return datasets.load_dataset(source["path"], source.get("name"), split=name,
                                     cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"{task.file}: cannot load {source['path']} ({source.get('name')}) split "
                        f"{name} from the hub ({type(e).__name__}: {e}); a hub task needs the "
                        "network once, or the data set in the datasets cache") from e


def _cs224n_rows(path: str, columns: str, stamp: str):
    """The rows of a CS224N file, one per data line: the needed (tab-joined) `columns` as strings
    (None where a row is short: a blank line has none) and the row's line number. A row that spans
    lines is a DataError. The columns are those of `csv.DictReader` (of equal names, the last),
    but a blank line is a row (DictReader drops it). `stamp` (VERSION, size, mtime) keys the
    datasets cache to this version of the file and of this reader. (No list arguments: `datasets`
    would shard the generator over a list.)"""
    columns = columns.split("\t")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        where = {name: i for i, name in enumerate(header)}
        index = [where.get(c) for c in columns]
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num
            if end != start:
                raise _spanning(path, start, end, header, values)
            yield {**{c: values[i] if i is not None and i < len(values) else None
                      for c, i in zip(columns, index)}, "_line": end}


def _spanning(path, start: int, end: int, header: list[str], values: list[str]) -> DataError:
    """The error for a row (or header: `start` 1) that runs from line `start` on to line `end`."""
    field = next((f"its {header[i]!r} field " if i < len(header) and header[i] else
                  f"its field {i + 1} " for i, v in enumerate(values) if "\n" in v or "\r" in v),
                 "a field ")
    return DataError(
        f"{path}, line {start}: the row that starts on this line runs on to line {end} "
        f"({end - start + 1} lines as one row): {field}starts with a double quote (\"). In this "
        "tab-separated format (csv quoting) a double quote at the start of a field opens a quoted "
        "field, which goes on, over tabs and line ends, to the next lone double quote. Remove "
        "that quote, or escape it: double it and quote the whole field (\"\"\"word\"\" and "
        "the rest\" for \"word\" and the rest). Check the rows just after it too.")


def _cs224n_layout(path: Path) -> tuple[list[str], int]:
    """(the header's fields, the number of data lines: physical lines after the header)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, [])
        if reader.line_num > 1:
            raise _spanning(path, 1, reader.line_num, [], header)
        return header, sum(1 for _ in f)  # csv reads f a line at a time: f is at line 2


def _cs224n(task: Task, path: Path, split: str, cache_dir) -> tuple[datasets.Dataset, int]:
    """The raw rows of a CS224N file and its number of data lines."""
    try:
        header, lines = _cs224n_layout(path)
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse as tab-separated UTF-8 ({e})") from e
    wanted = [task.id_column or "id", *task.text_columns]
    _check_columns(path, header, wanted, "a tab-separated header")
    columns = wanted + ([task.label_column] if task.label_column in header else [])
    if not lines:
        raise _no_rows(path, "cs224n", columns, task, split)
    stat = path.stat()
    features = datasets.Features({**{c: datasets.Value("string") for c in columns},
                                  "_line": datasets.Value("int64")})
    try:
        return datasets.Dataset.from_generator(
            _cs224n_rows, features=features, cache_dir=cache_dir, split="data",
            gen_kwargs={"path": str(path), "columns": "\t".join(columns),
                        "stamp": f"{VERSION}-{stat.st_size}-{stat.st_mtime_ns}"}), lines
    except (csv.Error, UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:
        if isinstance(e.__cause__, DataError):  # a row that spans lines
            raise e.__cause__ from None
        raise DataError(f"{path}: cannot parse as tab-separated UTF-8 ({e.__cause__ or e})") from e


def _check_columns(path, header, needed: list[str], what: str = "columns") -> None:
    missing = [c for c in needed if c not in (header or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}. Expected {what} with columns "
                        f"{needed}; the data has {list(header or [])}. Fix the file, or the "
                        "task file's `columns:`.")


def _checked(task: Task, raw: datasets.Dataset, split: str, path: Path, labelled: bool | None,
             fmt: str, lines: int | None = None) -> Split:
    """The rows of `raw` that are usable, as id/text_i/label columns; the rest counted. CS224N
    files are read forgivingly (an unparseable label skips its row, as their known bad rows need),
    and their `lines` (data lines) must each be a row, read or skipped."""
    if lines is not None and len(raw) != lines:
        raise DataError(f"{path}: {lines} data lines but {len(raw)} rows were read from them: "
                        "every line after the header should be one row, read or skipped. If "
                        "the file changed while it was read, run again; else delete the datasets "
                        "cache (data.cache_dir, or ~/.cache/huggingface/datasets).")
    if not len(raw):
        raise _no_rows(path, fmt, _expected(task, fmt, labelled), task, split)
    id_column = task.id_column or ("id" if "id" in raw.column_names else None)
    if labelled is None:
        labelled = task.label_column in raw.column_names
    needed = [*([id_column] if id_column else []), *task.text_columns]
    _check_columns(path, raw.column_names, needed + ([task.label_column] if labelled else []))
    check = _RowCheck(task, str(path), id_column, labelled, fmt == "cs224n",
                      "_line" in raw.column_names, fmt in ("csv", "tsv"))
    rows = raw.map(check, batched=True, with_indices=True, remove_columns=raw.column_names,
                   new_fingerprint=fingerprint(raw._fingerprint, check.key(), "check"),
                   desc=f"checking {path.name}")
    ok = rows.filter(lambda keep: keep, input_columns="_ok", batched=False,
                     new_fingerprint=fingerprint(rows._fingerprint, "ok"))
    out = Split(task, split, path, ok.remove_columns("_ok"), skipped=len(raw) - len(ok))
    level = logging.WARNING if out.skipped else logging.INFO
    log.log(level, "%s: %d %s: %d rows read, %d malformed rows skipped", path.name, len(raw),
            "data lines" if lines is not None else "records", len(out), out.skipped)
    return out


class _RowCheck:
    """The batched check of raw rows: texts stripped, labels parsed and range-checked."""

    def __init__(self, task: Task, path: str, id_column, labelled: bool, forgiving: bool,
                 lines: bool, header_line: bool):
        self.task, self.path, self.id_column, self.labelled = task, path, id_column, labelled
        self.forgiving, self.lines, self.header_line = forgiving, lines, header_line

    def key(self) -> str:
        t = self.task
        return fingerprint(t.kind, t.text_columns, t.label_column, t.num_labels, t.label_range,
                           self.id_column, self.labelled, self.forgiving)

    def where(self, batch, i: int, index: int, example_id: str) -> str:
        if self.lines:
            return f"{self.path}, line {batch['_line'][i]} (id {example_id})"
        if self.header_line:
            return f"{self.path}, line {index + 2} (id {example_id})"
        return f"{self.path}, row {index + 1} (id {example_id})"

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        task = self.task
        out = {"id": [], **{f"text_{c}": [] for c in range(len(task.text_columns))}, "_ok": []}
        out.update({"label": []} if self.labelled else {})
        for i, index in enumerate(indices):
            raw_id = batch[self.id_column][i] if self.id_column else index
            example_id = "" if raw_id is None else str(raw_id).strip()
            texts = [str(batch[c][i] or "").strip() for c in task.text_columns]
            ok = bool(example_id) and all(texts)
            label = 0.0
            if ok and self.labelled:
                label, ok = self.label(batch[task.label_column][i], batch, i, index, example_id)
            out["id"].append(example_id)
            for c, text in enumerate(texts):
                out[f"text_{c}"].append(text)
            out["_ok"].append(ok)
            if self.labelled:
                out["label"].append(label)
        return out

    def label(self, raw, batch, i: int, index: int, example_id: str) -> tuple[float, bool]:
        """(the label, usable?): a missing one skips the row, a non-number skips it in a CS224N
        file (its known malformed rows) and is an error elsewhere, an impossible one is an error."""
        task = self.task
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return 0.0, False
        try:
            value = float(raw)
            if value != value:  # NaN
                raise ValueError("NaN")
        except (TypeError, ValueError):
            if self.forgiving:
                return 0.0, False
            raise DataError(f"{self.where(batch, i, index, example_id)}: {task.label_column}="
                            f"{raw!r} is not a number; {task.name} is {task.kind}, whose labels "
                            f"are {task.label_rule()}. Fix or delete that row.") from None
        if not task.label_ok(value):
            raise DataError(f"{self.where(batch, i, index, example_id)}: {task.label_column}="
                            f"{raw!r} is not {task.label_rule()}. Fix or delete that row"
                            + ("" if task.is_regression else ", or raise num_labels in "
                               f"{task.file or 'the task file'}") + ".")
        return value, True


def load_task_data(tasks: list[Task], root: Path | None, limit_train: int | None = None,
                   limit_eval: int | None = None, cache_dir: str | None = None,
                   test: bool = True) -> dict[str, dict[str, Split]]:
    """Reads every split of every task before any training, so bad data fails the run early.
    A missing, empty or header-only test file is allowed (it only means no test predictions, with
    a warning); test=False does not read it (`data.predict_test=false`: a sweep that compares dev
    only)."""
    for key, limit in (("data.limit_train", limit_train), ("data.limit_eval", limit_eval)):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"{key}={limit!r} must be a positive integer, or null for no cap")
    data: dict[str, dict[str, Split]] = {}
    for task in tasks:
        splits = {}
        for split in ("train", "dev", "test") if test else ("train", "dev"):
            if split == "test" and not _has_test(task, root):
                continue
            limit = limit_train if split == "train" else limit_eval
            try:
                splits[split] = read_split(task, root, split, cache_dir).subset(limit)
            except EmptyFile as e:
                if split != "test":
                    raise
                log.warning("%s %s: no test predictions for %s", e.path, e.what, task.name)
                continue
            if not len(splits[split]):
                raise DataError(f"{splits[split].path} has no usable rows")
        data[task.name] = splits
    return data


def _has_test(task: Task, root) -> bool:
    if task.format == "hub":
        return "test" in (task.source.get("splits") or {})
    path = task.path(root, "test")
    if path is not None and not path.is_file():
        log.warning("%s not found: no test predictions for %s", path, task.name)
    return path is not None and path.is_file()
