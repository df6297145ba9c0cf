"""The CS224N readers on the real files and on malformed input."""
import logging

import pytest

from common.errors import ConfigError, DataError
from tasks.registry import get_tasks
from tasks.data import load_task_data, read_split, resolve_root

TASKS = {t.name: t for t in get_tasks(["sst", "para", "sts"])}
EXPECTED_ROWS = {  # rows in the shared files, minus the malformed ones
    ("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test"): 2210,
    ("para", "train"): 14141, ("para", "dev"): 3062,
    ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test"): 1725,
}


@pytest.mark.parametrize("task,split", sorted(EXPECTED_ROWS))
def test_real_files_read_completely(data_root, task, split):
    s = read_split(TASKS[task], data_root, split)
    assert len(s) == EXPECTED_ROWS[task, split]
    assert len(s.ids) == len(s.texts) == len(set(s.ids))
    assert all(len(t) == len(TASKS[task].text_columns) and all(t) for t in s.texts)
    if split == "test":
        assert s.labels is None
    else:
        assert len(s.labels) == len(s)
        lo, hi = TASKS[task].label_range
        assert min(s.labels) == lo and max(s.labels) == hi


def test_real_quora_malformed_row_is_skipped_and_logged(data_root, caplog):
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["para"], data_root, "train")
    assert s.skipped == 1
    assert ("quora-train.csv: 14142 data lines: 14141 rows read, 1 malformed rows skipped"
            in caplog.text)
    assert "ad118c967d683c93883bf072d" not in s.ids  # the row whose quote swallows its label


def test_real_sst_label_distribution(data_root):
    s = read_split(TASKS["sst"], data_root, "dev")
    assert sorted(set(s.labels)) == [0, 1, 2, 3, 4]
    assert s.ids[0] == "a7d575c9ed86ea9633660c67e"
    assert s.texts[0][0].startswith("It 's a lovely film")


def _file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    _file(tmp_path, "sts-train.csv",
          "\tid\tsentence1\tsentence2\tsimilarity\n"
          "0\ta\tA dog runs.\tA dog walks.\t3.2\n"
          "1\tb\t\tMissing first sentence.\t1.0\n"
          "2\tc\tNo label here.\tNone at all.\t\n"
          "3\td\tBad label.\tNot a number.\tfour\n"
          "4\te\tToo short a row\n"
          "5\tf\tA cat sleeps.\tA cat naps.\t4.0\n")
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        s = read_split(TASKS["sts"], tmp_path, "train")
    assert s.ids == ["a", "f"] and s.labels == [3.2, 4.0] and s.skipped == 4
    assert "sts-train.csv: 6 data lines: 2 rows read, 4 malformed rows skipped" in caplog.text


@pytest.mark.parametrize("label", ["7", "-1", "2.5"])
def test_out_of_range_label_names_file_and_row(tmp_path, label):
    _file(tmp_path, "ids-sst-dev.csv",
          f"\tid\tsentence\tsentiment\n0\ta\tFine film .\t3\n1\tb\tOdd film .\t{label}\n")
    with pytest.raises(DataError) as e:
        read_split(TASKS["sst"], tmp_path, "dev")
    msg = str(e.value)
    assert "ids-sst-dev.csv, line 3 (id b)" in msg and f"sentiment='{label}'" in msg
    assert "[0, 4]" in msg


def test_missing_file_names_file_and_columns(tmp_path):
    with pytest.raises(DataError) as e:
        read_split(TASKS["para"], tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "quora-train.csv") in msg
    assert "['id', 'sentence1', 'sentence2', 'is_duplicate']" in msg
    assert "scripts/get_data.py" in msg


def test_wrong_columns_name_what_is_missing(tmp_path):
    _file(tmp_path, "sts-dev.csv", "\tid\tsentence1\tsentence2\tscore\n0\ta\tx\ty\t1.0\n")
    with pytest.raises(DataError, match=r"sts-dev.csv: missing column\(s\) \['similarity'\]"):
        read_split(TASKS["sts"], tmp_path, "dev")


def test_comma_separated_file_is_a_column_error(tmp_path):
    _file(tmp_path, "ids-sst-dev.csv", ",id,sentence,sentiment\n0,a,Fine,3\n")
    with pytest.raises(DataError, match="tab-separated header"):
        read_split(TASKS["sst"], tmp_path, "dev")


def test_test_student_header_with_extra_leading_columns(tmp_path):
    _file(tmp_path, "ids-sst-test-student.csv", "0\t\tid\tsentence\n1\t0.0\tx1\tA film .\n")
    s = read_split(TASKS["sst"], tmp_path, "test")
    assert s.ids == ["x1"] and s.texts == [("A film .",)] and s.labels is None


def test_load_task_data_allows_missing_test_file_and_limits(synthetic_root):
    (synthetic_root / "quora-test-student.csv").unlink()
    data = load_task_data(get_tasks(["sst", "para"]), synthetic_root, limit_train=10, limit_eval=5)
    assert set(data["para"]) == {"train", "dev"} and set(data["sst"]) == {"train", "dev", "test"}
    assert len(data["sst"]["train"]) == 10 and len(data["sst"]["dev"]) == 5
    again = load_task_data(get_tasks(["sst"]), synthetic_root, limit_train=10)
    assert again["sst"]["train"].ids == data["sst"]["train"].ids  # a fixed subset


@pytest.mark.parametrize("limit", [0, -5, 2.5])
def test_bad_limits_are_config_errors(synthetic_root, limit):
    with pytest.raises(ConfigError, match="data.limit_train=.* must be a positive integer"):
        load_task_data(get_tasks(["sst"]), synthetic_root, limit_train=limit)


def test_load_task_data_requires_train_and_dev(synthetic_root):
    (synthetic_root / "sts-dev.csv").unlink()
    with pytest.raises(DataError, match="sts-dev.csv not found"):
        load_task_data(get_tasks(["sst", "sts"]), synthetic_root)


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("MINBERT_DATA", str(tmp_path))
    assert resolve_root(None) == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_root(str(other)) == other.resolve()
    monkeypatch.delenv("MINBERT_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="MINBERT_DATA"):
        resolve_root(None)
    (tmp_path / "data").mkdir()
    assert resolve_root(None) == (tmp_path / "data").resolve()


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"no task 'qqp'.*the tasks there are \['cfimdb', 'nli', 'para', 'sst', 'sts'\]"):
        get_tasks(["sst", "qqp"])
