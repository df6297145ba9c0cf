"""Every data line accounted for: a CS224N row may not span lines (a stray double quote at the start
of a field would swallow the rest of the file), rows read + rows skipped = data lines, empty and
header-only files are named errors (for a test split: no test predictions, with a warning), an
undefined metric is NaN with a warning, and a NaN dev/overall is never the best state. Fast: no
training."""
from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest

from common.errors import DataError
from tasks import data as D
from tasks import metrics as M
from tasks.data import load_task_data, read_file, read_split
from tasks.registry import get_tasks
from trainers.engine import scoring
from trainers.engine.state import TrainState

TASKS = {t.name: t for t in get_tasks(["sst", "sts", "nli"])}
SST = "\tid\tsentence\tsentiment\n"


def _rows(n: int, start: int = 0) -> list[str]:
    return [f"{i}\tid{i}\tFilm number {i} .\t{i % 5}\n" for i in range(start, start + n)]


def _file(tmp_path, name: str, text: str):
    (tmp_path / name).write_bytes(text.encode("utf-8"))  # bytes: the line ends exactly as given
    return tmp_path


# --- rows that span lines ----------------------------------------------------------------------

def test_stray_quote_is_an_error_naming_file_and_line(tmp_path):
    """A quote at the start of the sentence on line 5 (the 4th data row) swallowed the rest of
    this 9-row file: the old reader said "4 rows read, 1 malformed rows skipped"."""
    rows = _rows(9)
    rows[3] = '3\tid3\t"Film number 3 .\t3\n'
    _file(tmp_path, "ids-sst-train.csv", SST + "".join(rows))
    with pytest.raises(DataError) as e:
        read_split(TASKS["sst"], tmp_path, "train")
    msg = str(e.value)
    assert f"{tmp_path / 'ids-sst-train.csv'}, line 5:" in msg
    assert "runs on to line 10" in msg and "'sentence' field" in msg
    assert "a double quote at the start of a field opens a quoted field" in msg
    assert "Remove that quote, or escape it" in msg
    with pytest.raises(DataError, match="line 5"):  # nothing cached: a second read says it again
        read_split(TASKS["sst"], tmp_path, "train")


def test_quote_closed_lines_later_names_where_the_row_starts_and_ends(tmp_path):
    rows = _rows(8)
    rows[1] = '1\tid1\t"An opening quote .\t1\n'
    rows[3] = '3\tid3\tA closing one ."\t3\n'
    _file(tmp_path, "ids-sst-dev.csv", SST + "".join(rows))
    with pytest.raises(DataError, match=r"ids-sst-dev.csv, line 3: .* runs on to line 5 \(3 lines"):
        read_split(TASKS["sst"], tmp_path, "dev")


def test_quote_in_the_header_is_an_error_at_line_1(tmp_path):
    _file(tmp_path, "ids-sst-dev.csv", '\tid\t"sentence\tsentiment\n' + "".join(_rows(3)))
    with pytest.raises(DataError, match=r"ids-sst-dev.csv, line 1: .*double quote"):
        read_split(TASKS["sst"], tmp_path, "dev")


def test_fixed_file_reads_after_the_error(tmp_path):
    """A failed read leaves nothing in the datasets cache: the corrected file is read afresh."""
    rows = _rows(4)
    _file(tmp_path, "ids-sst-dev.csv", SST + rows[0] + '1\tid1\t"Film .\t1\n' + "".join(rows[2:]))
    with pytest.raises(DataError, match="line 3"):
        read_split(TASKS["sst"], tmp_path, "dev", cache_dir=str(tmp_path / "cache"))
    # the fix the error suggests: the quote doubled, the whole field quoted
    fixed = '1\tid1\t"""Film"" ."\t1\n'
    _file(tmp_path, "ids-sst-dev.csv", SST + rows[0] + fixed + "".join(rows[2:]))
    s = read_split(TASKS["sst"], tmp_path, "dev", cache_dir=str(tmp_path / "cache"))
    assert s.ids == ["id0", "id1", "id2", "id3"] and s.texts[1] == ('"Film" .',)


def test_quoted_fields_on_one_line_parse_as_before(tmp_path, caplog):
    """Quotes that open and close on the same line (the real quora, sts and cfimdb files have
    hundreds) keep csv's parse: the quotes go, what follows the closing one is kept, and a quote
    inside a field is an ordinary character."""
    _file(tmp_path, "ids-sst-dev.csv", SST
          + '0\ta\t"Quoted" film .\t1\n'
          + '1\tb\t"All of it quoted"\t2\n'
          + '2\tc\tA "quote" inside .\t3\n'
          + '3\td\t"Doubled ""inner"" quotes"\t4\n')
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["sst"], tmp_path, "dev")
    assert s.texts == [("Quoted film .",), ("All of it quoted",), ('A "quote" inside .',),
                       ('Doubled "inner" quotes',)]
    assert s.labels == [1, 2, 3, 4] and s.skipped == 0
    assert "ids-sst-dev.csv: 4 data lines: 4 rows read, 0 malformed rows skipped" in caplog.text


# --- rows read + rows skipped = data lines -------------------------------------------------------

def test_rows_read_and_skipped_add_up_to_the_data_lines(tmp_path, caplog):
    """7 data lines: 5 good rows, one with a bad label and a blank line in the middle, both
    skipped; the newline that ends the file starts no further line."""
    rows = _rows(5)
    text = SST + "".join(rows[:2]) + "\n" + "9\tbad\tA film .\tfour\n" + "".join(rows[2:])
    _file(tmp_path, "ids-sst-train.csv", text)
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["sst"], tmp_path, "train")
    assert len(s) == 5 and s.skipped == 2 and len(s) + s.skipped == 7
    assert s.ids == ["id0", "id1", "id2", "id3", "id4"]
    assert "ids-sst-train.csv: 7 data lines: 5 rows read, 2 malformed rows skipped" in caplog.text


def test_windows_line_ends_and_no_final_newline_count_the_same(tmp_path, caplog):
    text = SST + "".join(_rows(3))
    _file(tmp_path, "ids-sst-dev.csv", text.replace("\n", "\r\n").rstrip("\r\n"))
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["sst"], tmp_path, "dev")
    assert s.ids == ["id0", "id1", "id2"] and s.texts[2] == ("Film number 2 .",)
    assert "ids-sst-dev.csv: 3 data lines: 3 rows read, 0 malformed rows skipped" in caplog.text


def test_accounting_that_does_not_add_up_is_an_error(tmp_path, monkeypatch):
    _file(tmp_path, "ids-sst-dev.csv", SST + "".join(_rows(3)))
    real = D._cs224n_layout
    monkeypatch.setattr(D, "_cs224n_layout", lambda path: (real(path)[0], 4))
    with pytest.raises(DataError, match=r"ids-sst-dev.csv: 4 data lines but 3 rows were read"):
        read_split(TASKS["sst"], tmp_path, "dev")


def test_real_files_every_data_line_accounted_for(data_root, caplog):
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["sst"], data_root, "train")
    assert len(s) + s.skipped == 8544
    assert "ids-sst-train.csv: 8544 data lines: 8544 rows read, 0 malformed rows skipped" \
        in caplog.text


# --- empty and header-only files ---------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "dev"])
def test_header_only_train_or_dev_is_a_named_error(tmp_path, split):
    _file(tmp_path, f"ids-sst-{split}.csv", SST)
    with pytest.raises(DataError) as e:
        read_split(TASKS["sst"], tmp_path, split)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / f'ids-sst-{split}.csv'} has a header but no data rows; ")
    assert "['id', 'sentence', 'sentiment']" in msg and f"the {split} file of task sst" in msg


@pytest.mark.parametrize("text", ["", "\n"])
def test_empty_train_file_is_a_named_error(tmp_path, text):
    _file(tmp_path, "ids-sst-train.csv", text)
    with pytest.raises(DataError) as e:
        read_split(TASKS["sst"], tmp_path, "train")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'ids-sst-train.csv'} is empty; expected a tab-separated "
                          "header")
    assert "['id', 'sentence', 'sentiment']" in msg and "train file of task sst" in msg


def test_empty_train_file_stops_load_task_data(synthetic_root):
    (synthetic_root / "ids-sst-train.csv").write_bytes(b"")
    with pytest.raises(DataError, match="ids-sst-train.csv is empty"):
        load_task_data(get_tasks(["sst"]), synthetic_root)


@pytest.mark.parametrize("text,what", [("\tid\tsentence\n", "has a header but no data rows"),
                                       ("", "is empty")])
def test_header_only_or_empty_test_file_means_no_test_split(synthetic_root, caplog, text, what):
    path = synthetic_root / "ids-sst-test-student.csv"
    path.write_bytes(text.encode())
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        data = load_task_data(get_tasks(["sst", "sts"]), synthetic_root)
    assert set(data["sst"]) == {"train", "dev"}
    assert set(data["sts"]) == {"train", "dev", "test"}
    assert f"{path} {what}: no test predictions for sst" in caplog.text


@pytest.mark.parametrize("fmt,name", [("csv", "x.csv"), ("tsv", "x.tsv"), ("json", "x.jsonl"),
                                      ("parquet", "x.parquet")])
def test_empty_file_of_other_formats_is_a_named_error(tmp_path, fmt, name):
    _file(tmp_path, name, "")
    with pytest.raises(DataError) as e:
        read_file(TASKS["nli"], tmp_path / name, "train", fmt=fmt)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / name} is empty; expected ")
    assert "['premise', 'hypothesis', 'label']" in msg and "train file of task nli" in msg


@pytest.mark.parametrize("fmt,name,text,what", [
    ("csv", "x.csv", "premise,hypothesis,label\n", "has a header but no data rows"),
    ("tsv", "x.tsv", "premise\thypothesis\tlabel\n", "has a header but no data rows"),
    ("json", "x.json", "[]", "has no data rows")])
def test_header_only_file_of_other_formats_is_a_named_error(tmp_path, fmt, name, text, what):
    _file(tmp_path, name, text)
    with pytest.raises(DataError) as e:
        read_file(TASKS["nli"], tmp_path / name, "dev", fmt=fmt)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / name} {what}; ")
    assert "['premise', 'hypothesis', 'label']" in msg and "dev file of task nli" in msg


# --- undefined metrics -------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["pearson", "spearman"])
def test_correlation_of_constant_labels_or_predictions_is_nan_with_a_warning(metric, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.metrics"):
        constant_gold = M.score(metric, np.array([1.0, 2.0, 3.0]), np.array([2.5, 2.5, 2.5]))
    assert math.isnan(constant_gold)
    assert f"{metric} is undefined (NaN): all 3 gold labels are equal (2.5)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.metrics"):
        constant_pred = M.score(metric, np.array([1.0, 1.0, 1.0]), np.array([2.0, 3.0, 2.0]))
    assert math.isnan(constant_pred)
    assert f"{metric} is undefined (NaN): all 3 predictions are equal (1)" in caplog.text
    assert M.score(metric, np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 2.0])) > 0  # defined


def test_overall_with_an_undefined_primary_metric_is_nan():
    assert math.isnan(M.overall([("accuracy", 0.8), ("pearson", float("nan"))]))
    assert M.overall([("accuracy", 0.8), ("pearson", 0.2)]) == pytest.approx(0.7)
    task = TASKS["sts"]
    scores = task.score(np.array([3.0, 3.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert math.isnan(scores["sts/dev/pearson"])


# --- the best state never a NaN dev/overall ----------------------------------------------------

class _Strategy:
    def __init__(self, epochs: int, patience: int | None = None):
        self.options = SimpleNamespace(epochs=epochs, patience=patience, eval_every_n_steps=None)
        self.saved: list[tuple[int, int | None]] = []  # (epoch, best epoch) at each save

    def save_best(self, ctx, state, tasks):
        self.saved.append((state.epoch, state.best_epoch))


def _evaluate_in_turn(monkeypatch, overalls: list[float]):
    task = TASKS["sts"]
    scores = iter(overalls)

    def evaluate(ctx, split, tasks):
        value = next(scores)
        return {task.metric_key("dev"): value, "dev/overall": value}, {}
    monkeypatch.setattr(scoring, "evaluate", evaluate)
    return [task]


def _epochs(tmp_path, monkeypatch, overalls, patience=None):
    """Scores `overalls` as the dev/overall of epochs 1, 2, ...: (state, strategy, ctx, stopped
    after epoch n or None)."""
    tasks = _evaluate_in_turn(monkeypatch, overalls)
    ctx = SimpleNamespace(run_dir=tmp_path, logger=SimpleNamespace(log=lambda *a, **k: None))
    state, strategy = TrainState(), _Strategy(len(overalls), patience)
    for epoch in range(1, len(overalls) + 1):
        state.epoch, state.step = epoch, 10 * epoch
        scoring.score_dev(ctx, state, strategy, tasks, {})
        if scoring.out_of_patience(ctx, state, strategy.options, {}):
            return state, strategy, ctx, epoch
    return state, strategy, ctx, None


def test_a_nan_dev_overall_is_never_the_best(tmp_path, monkeypatch, caplog):
    nan = float("nan")
    with caplog.at_level(logging.WARNING, logger="trainers.engine.scoring"):
        state, strategy, _, _ = _epochs(tmp_path, monkeypatch, [0.6, nan, 0.7, nan, 0.65])
    assert (state.best_epoch, state.best_step, state.best_score) == (3, 30, 0.7)
    assert [epoch for epoch, _ in strategy.saved] == [1, 3]
    assert ("epoch 2, step 20: dev/overall is undefined (NaN: sts/dev/pearson undefined, see the "
            "warning above); not better than the best, 0.6000 at epoch 1, step 10") in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and math.isnan(rows[1]["dev/overall"])


def test_nan_first_then_defined_keeps_the_defined_one(tmp_path, monkeypatch, caplog):
    nan = float("nan")
    with caplog.at_level(logging.WARNING, logger="trainers.engine.scoring"):
        state, strategy, _, _ = _epochs(tmp_path, monkeypatch, [nan, 0.5, nan])
    assert (state.best_epoch, state.best_score) == (2, 0.5)
    assert strategy.saved == [(1, None), (2, 2)]  # epoch 1 only held the place
    assert "no evaluation so far has had a defined one" in caplog.text


def test_no_defined_dev_overall_keeps_the_last_state_with_a_warning(tmp_path, monkeypatch,
                                                                        caplog):
    from trainers.strategies.finishers import KeepBest

    nan = float("nan")
    with caplog.at_level(logging.WARNING):
        state, strategy, ctx, _ = _epochs(tmp_path, monkeypatch, [nan, nan, nan])
        result = KeepBest().result(ctx, state, None)  # no best: nothing is loaded
    assert state.best_epoch is None and result.best_epoch is None
    assert strategy.saved == [(1, None), (2, None), (3, None)]  # the last state is the one kept
    assert ("epoch 1, step 10: dev/overall is undefined (NaN: sts/dev/pearson undefined, see the "
            "warning above) and no evaluation so far has had a defined one") in caplog.text
    assert ("no dev evaluation had a defined dev/overall (each was NaN" in caplog.text
            and "the run keeps its last state" in caplog.text)


def test_patience_counts_nan_as_not_better(tmp_path, monkeypatch, caplog):
    nan = float("nan")
    with caplog.at_level(logging.INFO, logger="trainers.engine.scoring"):
        state, _, _, stopped = _epochs(tmp_path, monkeypatch, [0.6, nan, nan, 0.9], patience=2)
    assert stopped == 3 and state.best_epoch == 1
    assert "the best, 0.6000, was at epoch 1, step 10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainers.engine.scoring"):
        _, _, _, stopped = _epochs(tmp_path, monkeypatch, [nan, nan, 0.9], patience=2)
    assert stopped == 2
    assert "no evaluation had a defined (not NaN) dev/overall" in caplog.text


def test_better_never_takes_nan():
    assert scoring.better(0.5, float("-inf")) and not scoring.better(0.5, 0.5)
    assert not scoring.better(float("nan"), float("-inf"))
    assert not scoring.better(float("nan"), 0.1)
