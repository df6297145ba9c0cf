"""Use a trained run on new data: score a file of one of its tasks, or predict for a sentence or pair.

    python scripts/predict.py <run> --input my-sst-dev.csv               # the task from the header
    python scripts/predict.py <run> --input pairs.jsonl --task mnli --out mnli-preds.csv
    python scripts/predict.py <run> --text "A gripping, beautifully shot film."
    python scripts/predict.py <run> --text "How do I learn Python?" "What is the best way to learn Python?"

The run is rebuilt by `trainers.engine.record.load_run` (its saved config, the tasks it trained with their
task configs, and the weights its strategy saved: one model, per-task experts or a merge). A file
is read as its task's data is (`tasks.data.read_file`), labelled or not, in the format its name
says (`.jsonl`/`.json`, `.parquet`, `.tsv`, `.csv`: the task's own format if it is CS224N's or
csv) or `--format`. Its task is `--task`, else the one task of the run whose columns the file has
(a labelled file: whose label column it has too; else the one whose data file names match).
Predictions are written in the CS224N leaderboard format, labels in the task's own type (`--out`,
default `<run>/predictions/<file stem>-<task>-output.csv`); a labelled file's metrics are printed
too. `--text` with one sentence predicts every single-sentence task of the run, with two every
pair task.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError, MinbertError
from tasks.base import FORMATS, Task
from tasks.batching import EncodedSplit
from tasks.data import Split, read_file
from trainers.engine.context import RunContext
from trainers.engine.evaluate import predict_task, write_predictions
from trainers.engine.record import SavedRun, load_run

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".tsv": "tsv"}


def file_format(path: Path, task: Task, given: str | None) -> str:
    if given:
        return given
    if path.suffix in SUFFIXES:
        return SUFFIXES[path.suffix]
    return task.format if task.format in ("cs224n", "csv", "tsv") else "csv"


def file_columns(path: Path) -> list[str]:
    """The column names of a file, from its header (or first JSON record, or parquet schema)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return list(pq.read_schema(path).names)
        with open(path, newline="", encoding="utf-8") as f:
            first = f.readline()
        if path.suffix in (".jsonl", ".json"):
            return list(json.loads(first.strip().lstrip("[").rstrip(",")))
        return next(csv.reader([first], delimiter="\t" if "\t" in first else ","), [])
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def file_task(path: Path, saved: SavedRun, name: str | None) -> Task:
    """The run's task that a file is for: `name`, else what its columns (or file name) say."""
    run_tasks = {t.name: t for t in saved.tasks}
    if name is not None:
        if name not in run_tasks:
            raise ConfigError(f"--task {name}: the run trained {sorted(run_tasks)}")
        return run_tasks[name]
    if not path.is_file():
        raise DataError(f"{path} not found")
    header = file_columns(path)
    fits = [t for t in run_tasks.values() if set(t.text_columns) <= set(header)]
    labelled = [t for t in fits if t.label_column in header]
    by_name = [t for t in fits if any(Path(str(f)).stem.rsplit("-", 1)[0] in path.name
                                      for f in (t.source.get("data_files") or {}).values())]
    for chosen in (labelled, by_name, fits):
        if len(chosen) == 1:
            return chosen[0]
    raise DataError(f"{path}: cannot tell which of the run's tasks {sorted(run_tasks)} the file "
                    f"is for from its columns {header}; pass --task")


def predict_file(saved: SavedRun, path: Path, task: Task, out: Path | None,
                 progress: bool = True, fmt: str | None = None
                 ) -> tuple[Path, dict[str, float] | None]:
    """Writes the predictions for every row of `path`; returns where, and the metrics if labelled."""
    split = read_file(task, path, path.stem, None, saved.cfg.data.get("cache_dir"),
                      file_format(path, task, fmt))
    if not len(split):
        raise DataError(f"{path} has no usable rows")
    preds = _predict(saved, split, progress)
    out = out or saved.run_dir / "predictions" / f"{path.stem}-{task.name}-output.csv"
    written = write_predictions(out.parent, task, split.name, split.ids, preds, name=out.name)
    scores = None if split.labels is None else task.score(preds, np.asarray(split.labels),
                                                          path.stem)
    return written, scores


def _predict(saved: SavedRun, split: Split, progress: bool = False) -> np.ndarray:
    from minbert.checkpoint import load_tokenizer

    head = saved.model.heads[split.task.name]
    data = EncodedSplit(split, load_tokenizer(saved.cfg.model.tokenizer),
                        saved.cfg.model.max_length, getattr(head, "joint", False))
    ctx = RunContext.for_scoring(saved.model, saved.tasks, {}, saved.run_dir, saved.method,
                                 eval_batch_size=saved.cfg.data.eval_batch_size,
                                 progress=progress)
    return predict_task(ctx, split.task, data, saved.weights)


def predict_text(saved: SavedRun, texts: list[str]) -> list[str]:
    """One line per task of the run that takes this many sentences."""
    tasks = [t for t in saved.tasks if len(t.text_columns) == len(texts)]
    if not tasks:
        kind = "a pair" if len(texts) == 2 else "one sentence"
        raise ConfigError(f"the run trained {[t.name for t in saved.tasks]}, none of which takes "
                          f"{kind}; give {'one sentence' if len(texts) == 2 else 'two'} to --text")
    lines = []
    for task in tasks:
        split = Split.from_rows(task, "text", ["text"], [tuple(texts)], path=Path("--text"))
        lines.append(f"{task.name}: {describe(task, _predict(saved, split)[0])}")
    return lines


def describe(task: Task, value) -> str:
    """A prediction in words: the class and its name, or the score and its range."""
    if task.is_regression:
        return "{:.3f} (a score in [{:g}, {:g}])".format(float(value), *task.label_range)
    name = f" ({task.label_names[int(value)]})" if task.label_names else ""
    return f"class {int(value)}{name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help="a CS224N-format file of one of the run's tasks")
    what.add_argument("--text", nargs="+", metavar="SENTENCE", help="one sentence, or two (a pair)")
    parser.add_argument("--task", help="the task of --input (one of the run's)")
    parser.add_argument("--format", choices=[f for f in FORMATS if f != "hub"],
                        help="the format of --input (default: from its name and the task's)")
    parser.add_argument("--out", type=Path, help="where to write the predictions of --input")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.text is not None and len(args.text) > 2:
        parser.error(f"--text takes one sentence or two, not {len(args.text)}")
    try:
        saved = load_run(args.run_dir, args.device)
        if args.text is not None:
            print("\n".join(predict_text(saved, args.text)))
            return 0
        task = file_task(args.input, saved, args.task)
        out, scores = predict_file(saved, args.input, task, args.out, fmt=args.format)
    except MinbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, value in (scores or {}).items():
        print(f"{key}: {value:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
