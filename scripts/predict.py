"""Use a trained run on new data: score a CS224N-format file, or predict for one sentence or pair.

    python scripts/predict.py <run> --input my-sst-dev.csv               # the task from the header
    python scripts/predict.py <run> --input pairs.csv --task sts --out sts-preds.csv
    python scripts/predict.py <run> --text "A gripping, beautifully shot film."
    python scripts/predict.py <run> --text "How do I learn Python?" "What is the best way to learn Python?"

The run is rebuilt by `trainers.record.load_run` (its saved config, the tasks it trained and the
weights its strategy saved: one model, per-task experts or a merge). A file is any tab-separated
CS224N-format file of one of the run's tasks (`id` and the task's sentence columns, labelled or
not); its task is `--task`, else the one task whose columns the header has (SST: `sentence`;
Quora and STS share `sentence1`/`sentence2`, so their label column, or the file name, tells them
apart). Predictions are written in the CS224N leaderboard format (`--out`, default
`<run>/predictions/<file stem>-<task>-output.csv`); when the file has labels, the task's dev metric
is printed too. `--text` with one sentence predicts every single-sentence task of the run, with two
every pair task.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from minbert.errors import ConfigError, DataError, MinbertError
from tasks import TASKS
from tasks.base import Task
from tasks.batching import EncodedSplit
from tasks.data import Split, read_file
from trainers.evaluate import RunContext, predict_task, write_predictions
from trainers.record import SavedRun, load_run

SST_LABELS = ("negative", "somewhat negative", "neutral", "somewhat positive", "positive")


def file_task(path: Path, saved: SavedRun, name: str | None) -> Task:
    """The run's task that a file is for: `name`, else what its header (or file name) says."""
    run_tasks = {t.name: t for t in saved.tasks}
    if name is not None:
        if name not in run_tasks:
            raise ConfigError(f"--task {name}: the run trained {sorted(run_tasks)}")
        return run_tasks[name]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter="\t"), [])
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    fits = [t for t in run_tasks.values() if set(t.text_columns) <= set(header)]
    labelled = [t for t in fits if t.label_column in header]
    by_name = [t for t in fits if t.file_prefix.removeprefix("ids-") in path.name]
    for chosen in (labelled, by_name, fits):
        if len(chosen) == 1:
            return chosen[0]
    raise DataError(f"{path}: cannot tell which of the run's tasks {sorted(run_tasks)} the file "
                    f"is for from its header {header}; pass --task")


def predict_file(saved: SavedRun, path: Path, task: Task, out: Path | None,
                 progress: bool = True) -> tuple[Path, float | None]:
    """Writes the predictions for every row of `path`; returns where, and the metric if labelled."""
    split = read_file(task, path, path.stem)
    if not len(split):
        raise DataError(f"{path} has no usable rows")
    preds = _predict(saved, split, progress)
    out = out or saved.run_dir / "predictions" / f"{path.stem}-{task.name}-output.csv"
    written = write_predictions(out.parent, task, split.name, split.ids, preds, name=out.name)
    score = task.score(preds, np.asarray(split.labels)) if split.labels is not None else None
    return written, score


def _predict(saved: SavedRun, split: Split, progress: bool = False) -> np.ndarray:
    from minbert.checkpoint import load_tokenizer

    head = saved.model.heads[split.task.name]
    data = EncodedSplit(split, load_tokenizer(saved.cfg.model.tokenizer),
                        saved.cfg.model.max_length, getattr(head, "joint", False))
    ctx = RunContext(saved.model, saved.tasks, {}, saved.run_dir, None,
                     eval_batch_size=saved.cfg.data.eval_batch_size, progress=progress,
                     method=saved.method, weights=saved.weights)
    return predict_task(ctx, split.task, data)


def predict_text(saved: SavedRun, texts: list[str]) -> list[str]:
    """One line per task of the run that takes this many sentences."""
    tasks = [t for t in saved.tasks if len(t.text_columns) == len(texts)]
    if not tasks:
        kind = "a pair" if len(texts) == 2 else "one sentence"
        raise ConfigError(f"the run trained {[t.name for t in saved.tasks]}, none of which takes "
                          f"{kind}; give {'one sentence' if len(texts) == 2 else 'two'} to --text")
    lines = []
    for task in tasks:
        split = Split(task, "text", Path("--text"), ["text"], [tuple(texts)])
        value = _predict(saved, split)[0]
        lines.append(f"{task.name}: {describe(task, value)}")
    return lines


def describe(task: Task, value) -> str:
    if task.name == "sst":
        return f"{int(value)} ({SST_LABELS[int(value)]})"
    if task.name == "para":
        return "paraphrase" if int(value) else "not a paraphrase"
    return f"similarity {float(value):.3f} (0 to 5)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help="a CS224N-format file of one of the run's tasks")
    what.add_argument("--text", nargs="+", metavar="SENTENCE", help="one sentence, or two (a pair)")
    parser.add_argument("--task", choices=sorted(TASKS), help="the task of --input")
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
        out, score = predict_file(saved, args.input, task, args.out)
    except MinbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if score is not None:
        print(f"{task.name}/{args.input.stem}/{task.metric}: {score:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
