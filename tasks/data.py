"""Reading CS224N-format task files: tab-separated, with a header row and an index column, as in
the Stanford CS224N minBERT default project. Malformed rows (a missing sentence, an unparseable
label) are skipped and counted per file; a missing file, wrong columns or an impossible label stop
the run with a message that names the file and row.
"""
from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minbert.errors import ConfigError, DataError
from tasks.base import Task

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test-student")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long IMDB reviews exceed the 128 KiB default


@dataclass
class Split:
    """One task's split in memory: ids, sentence tuples, labels (None for test-student)."""

    task: Task
    name: str  # train | dev | test-student
    path: Path
    ids: list[str] = field(default_factory=list)
    texts: list[tuple[str, ...]] = field(default_factory=list)
    labels: list[float] | None = None
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A fixed random subset of n examples (the same for every run with the same seed)."""
        if n is None or n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        labels = None if self.labels is None else [self.labels[i] for i in keep]
        return Split(self.task, self.name, self.path, [self.ids[i] for i in keep],
                     [self.texts[i] for i in keep], labels, self.skipped)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """`data.root` if set, else $MINBERT_DATA, else ./data. The folder must exist."""
    chosen = root or os.environ.get("MINBERT_DATA") or "data"
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist. Set data.root=... or MINBERT_DATA, "
                        "or fetch the files with `python scripts/get_data.py`.")
    return path


def read_split(task: Task, root: Path, split: str) -> Split:
    """Reads `<root>/<prefix>-<split>.csv`; test-student files have no label column."""
    return read_file(task, task.path(root, split), split, labelled=split != "test-student")


def read_file(task: Task, path: Path, split: str, labelled: bool | None = None) -> Split:
    """Reads any CS224N-format file of `task`. `labelled=None`: labelled if the header has the
    task's label column (then every row's label is read and checked)."""
    path = Path(path)
    if not path.is_file():
        needed = ["id", *task.text_columns] + ([task.label_column] if labelled is not False else [])
        raise DataError(f"{path} not found. Expected a tab-separated file with columns "
                        f"{needed}; fetch the data with `python scripts/get_data.py`.")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if labelled is None:
                labelled = task.label_column in (reader.fieldnames or [])
            out = Split(task, split, path, labels=[] if labelled else None)
            _check_columns(path, reader.fieldnames,
                           ["id", *task.text_columns] + ([task.label_column] if labelled else []))
            for row in reader:
                _add_row(out, row, reader.line_num)
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse as tab-separated UTF-8 ({e})") from e
    level = logging.WARNING if out.skipped else logging.INFO
    log.log(level, "%s: %d rows read, %d malformed rows skipped", path.name, len(out), out.skipped)
    return out


def _check_columns(path: Path, header: list[str] | None, needed: list[str]) -> None:
    missing = [c for c in needed if c not in (header or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}. Expected a tab-separated header "
                        f"with columns {needed}; found {header}.")


def _add_row(out: Split, row: dict, line: int) -> None:
    """Appends one row, skips it if malformed, raises if its label is impossible."""
    task = out.task
    texts = tuple((row.get(c) or "").strip() for c in task.text_columns)
    example_id = (row.get("id") or "").strip()
    if not example_id or not all(texts):
        out.skipped += 1
        return
    if out.labels is not None:
        raw = row.get(task.label_column)
        try:
            label = task.parse_label(raw)
        except (TypeError, ValueError):
            out.skipped += 1
            return
        if not task.label_ok(label):
            lo, hi = task.label_range
            kind = "an integer" if task.integer_labels else "a number"
            raise DataError(f"{out.path}, line {line} (id {example_id}): {task.label_column}="
                            f"{raw!r} is not {kind} in [{lo:g}, {hi:g}]. Fix or delete that row.")
        out.labels.append(label)
    out.ids.append(example_id)
    out.texts.append(texts)


def load_task_data(tasks: list[Task], root: Path, limit_train: int | None = None,
                   limit_eval: int | None = None) -> dict[str, dict[str, Split]]:
    """Reads every split of every task before any training, so bad data fails the run early.
    A missing test-student file is allowed (it only means no test predictions)."""
    for key, limit in (("data.limit_train", limit_train), ("data.limit_eval", limit_eval)):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"{key}={limit!r} must be a positive integer, or null for no cap")
    data: dict[str, dict[str, Split]] = {}
    for task in tasks:
        splits = {}
        for split in SPLITS:
            if split == "test-student" and not task.path(root, split).is_file():
                log.warning("%s not found: no test predictions for %s", task.path(root, split),
                            task.name)
                continue
            limit = limit_train if split == "train" else limit_eval
            splits[split] = read_split(task, root, split).subset(limit)
            if not len(splits[split]):
                raise DataError(f"{splits[split].path} has no usable rows")
        data[task.name] = splits
    return data
