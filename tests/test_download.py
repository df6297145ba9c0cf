"""Tests for tasks.download.data_root: fetching a missing data root (data.download: auto) from a
local file:// "remote" given by $MINBERT_DATA_URL, the one-line errors when it cannot, and an
existing root left alone. No network: every URL is file:// or a closed localhost port."""
from __future__ import annotations

import dataclasses
import logging
import socket
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.errors import ConfigError, DataError
from tasks import download as dl
from tasks.registry import get_tasks

TASKS = get_tasks(list(dl.DEFAULT_TASKS))
FILES = dl.files_of(TASKS)


def write_cs224n(path: Path, columns: tuple[str, ...], rows: int = 4) -> None:
    """A small CS224N-style file: header with a leading index column, tab-separated; every
    label column holds 1 (valid for each of the four tasks)."""
    lines = ["\t" + "\t".join(columns)]
    for i in range(rows):
        values = [f"id{i}" if c == "id" else ("1" if c in LABELS else f"text {c} {i}")
                  for c in columns]
        lines.append("\t".join([str(i), *values]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


LABELS = {t.label_column for t in TASKS}


@pytest.fixture
def remote(tmp_path, monkeypatch) -> Path:
    """A fake upstream data folder with every file but quora's test file (as upstream), served
    through $MINBERT_DATA_URL."""
    folder = tmp_path / "remote"
    for w in FILES:
        if w.name != "quora-test-student.csv":
            write_cs224n(folder / w.name, w.columns)
    monkeypatch.setenv(dl.URL_ENV, folder.as_uri() + "/")
    return folder


def config(root, download: str | None = "auto"):
    data = {"root": None if root is None else str(root)}
    if download is not None:
        data["download"] = download
    return OmegaConf.create({"data": data, "progress": False})


def no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("data_root must not fetch anything here")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- auto fetch ----------------------------------------------------------------------------------

def test_auto_fetches_missing_root(remote, tmp_path, caplog):
    root = tmp_path / "new" / "data"
    with caplog.at_level(logging.INFO, logger="tasks.download"):
        assert dl.data_root(config(root), TASKS) == root.resolve()
    fetched = sorted(p.name for p in root.iterdir())
    assert fetched == sorted(p.name for p in remote.iterdir()) and len(fetched) == 11
    for name in fetched:
        assert (root / name).read_bytes() == (remote / name).read_bytes(), name
    assert not leftovers(root.parent)
    assert f"data folder {root.resolve()} does not exist: downloading" in caplog.text
    assert "quora-test-student.csv not found" in caplog.text  # a warning, not an error


def test_auto_fetched_files_are_readable(remote, tmp_path):
    from tasks.data import load_task_data

    sst = get_tasks(["sst"])
    root = dl.data_root(config(tmp_path / "d"), sst)
    data = load_task_data(sst, root, cache_dir=str(tmp_path / "cache"))
    assert {s: len(v) for s, v in data["sst"].items()} == {"train": 4, "dev": 4, "test": 4}


def test_auto_fetches_only_the_missing_tasks(remote, tmp_path, monkeypatch):
    root = tmp_path / "d"
    assert dl.data_root(config(root), get_tasks(["sts"])) == root.resolve()
    assert sorted(p.name for p in root.iterdir()) == [
        "sts-dev.csv", "sts-test-student.csv", "sts-train.csv"]


def test_root_from_env_and_default(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("MINBERT_DATA", str(tmp_path / "env"))
    assert dl.data_root(config(None, download=None), get_tasks(["sst"])) == (tmp_path / "env")
    assert (tmp_path / "env" / "ids-sst-train.csv").is_file()
    monkeypatch.delenv("MINBERT_DATA")
    monkeypatch.chdir(tmp_path)
    assert dl.data_root(config(None), get_tasks(["sst"])) == (tmp_path / "data").resolve()
    assert (tmp_path / "data" / "ids-sst-dev.csv").is_file()


# --- cannot fetch: one-line errors ---------------------------------------------------------------

def test_never_is_one_line_error(tmp_path, monkeypatch):
    no_network(monkeypatch)
    root = tmp_path / "absent"
    with pytest.raises(DataError) as exc:
        dl.data_root(config(root, download="never"), TASKS)
    message = one_line(exc)
    assert f"data folder {root.resolve()} does not exist (data.download=never)" in message
    assert f"python scripts/get_data.py --dest {root.resolve()}" in message
    assert "data.root" in message and "MINBERT_DATA" in message
    assert not root.exists()


def test_unreachable_url_is_one_line_error(tmp_path, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(dl.URL_ENV, url)
    root = tmp_path / "absent"
    with pytest.raises(DataError) as exc:
        dl.data_root(config(root), TASKS)
    message = one_line(exc)
    assert f"data folder {root.resolve()} does not exist and downloading" in message
    assert f"could not reach {url}" in message  # the reason
    assert f"python scripts/get_data.py --dest {root.resolve()}" in message
    assert not root.exists() and not leftovers(tmp_path)


def test_missing_required_file_is_one_line_error(remote, tmp_path):
    (remote / "sts-dev.csv").unlink()
    root = tmp_path / "absent"
    with pytest.raises(DataError) as exc:
        dl.data_root(config(root), TASKS)
    message = one_line(exc)
    assert "required file sts-dev.csv not found" in message and "get_data.py" in message
    assert not root.exists() and not leftovers(tmp_path)  # no half-filled data folder


def test_bad_columns_is_one_line_error(remote, tmp_path):
    write_cs224n(remote / "ids-sst-dev.csv", ("id", "sentence", "label"))
    with pytest.raises(DataError) as exc:
        dl.data_root(config(tmp_path / "absent"), get_tasks(["sst"]))
    assert "ids-sst-dev.csv failed the column check" in one_line(exc)
    assert not (tmp_path / "absent").exists()


def test_non_cs224n_task_is_never_downloaded(remote, tmp_path, monkeypatch):
    no_network(monkeypatch)
    mine = dataclasses.replace(TASKS[0], name="mine", file="conf/task/mine.yaml", source={
        "format": "csv", "data_files": {"train": "mine-train.csv", "dev": "mine-dev.csv"}})
    root = tmp_path / "absent"
    with pytest.raises(DataError) as exc:
        dl.data_root(config(root), [TASKS[0], mine])
    message = one_line(exc)
    assert "mine (csv, conf/task/mine.yaml)" in message and "cannot be downloaded" in message
    assert not root.exists()


def test_bad_download_value_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.download='sometimes'"):
        dl.data_root(config(tmp_path, download="sometimes"), TASKS)


# --- nothing to fetch ----------------------------------------------------------------------------

def test_existing_root_is_returned_untouched(remote, tmp_path, monkeypatch):
    no_network(monkeypatch)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "ids-sst-train.csv").write_text("mine\n")
    assert dl.data_root(config(root), TASKS) == root.resolve()
    assert [p.name for p in root.iterdir()] == ["ids-sst-train.csv"]
    assert (root / "ids-sst-train.csv").read_text() == "mine\n"


def test_missing_root_no_task_reads_from(tmp_path, monkeypatch):
    no_network(monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    write_cs224n(elsewhere / "t.csv", TASKS[0].text_columns)
    absolute = dataclasses.replace(TASKS[0], source={"format": "cs224n", "data_files": {
        "train": str(elsewhere / "t.csv"), "dev": str(elsewhere / "t.csv")}})
    root = tmp_path / "absent"
    assert dl.data_root(config(root), [absolute]) == root.resolve()
    assert not root.exists()
