"""Tests for scripts/get_data.py over tasks.download (no network: copy mode and file://
downloads). The files and their columns come from the cs224n task files, conf/task/*.yaml."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import download as dl
from tasks.registry import get_tasks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "get_data.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("get_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gd = _load_module()
TASKS = get_tasks(list(dl.DEFAULT_TASKS))
FILES = dl.files_of(TASKS)  # 12 files: train, dev, test of sst, para, sts, cfimdb
SPLITS = ("train", "dev", "test")


def names(*tasks: str) -> list[str]:
    return [w.name for w in FILES if not tasks or w.task in tasks]


def _shared_data() -> Path | None:
    candidates = [os.environ.get("MINBERT_DATA"), REPO / ".." / "shared" / "data" / "cs224n"]
    for cand in candidates:
        if cand and (Path(cand) / "ids-sst-train.csv").is_file():
            return Path(cand).resolve()
    return None


# --- small valid CS224N-format files -------------------------------------------------

HEADERS = {
    ("sst", "labelled"): "\tid\tsentence\tsentiment",
    ("sst", "test-student"): "0\t\tid\tsentence",  # extra leading column, as upstream
    ("cfimdb", "labelled"): "\tid\tsentence\tsentiment",
    ("cfimdb", "test-student"): "0\t\tid\tsentence",
    ("para", "labelled"): "\tid\tsentence1\tsentence2\tis_duplicate",
    ("para", "test-student"): "\tid\tsentence1\tsentence2",
    ("sts", "labelled"): "\tid\tsentence1\tsentence2\tsimilarity",
    ("sts", "test-student"): "\tid\tsentence1\tsentence2",
}


def _row(task: str, split: str, i: int) -> str:
    test = split == "test"
    if task in ("sst", "cfimdb"):
        return f"{i + 1}\t{float(i)}\tid{i}\t sentence {i}" if test else f"{i}\tid{i}\t s {i}\t{i % 5}"
    pair = f"{i}\tid{i}\tWhat is {i}?\t\"A \"\"quoted\"\" {i}\""
    if test:
        return pair
    return pair + ("\t1.0" if task == "para" else f"\t{i % 6}.0")


def make_file(path: Path, task: str, split: str, rows: int = 3) -> None:
    kind = "test-student" if split == "test" else "labelled"
    lines = [HEADERS[(task, kind)]] + [_row(task, split, i) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A fake 'remote' data folder with every file (rows = 3 + split index)."""
    folder = tmp_path / "remote"
    folder.mkdir()
    for w in FILES:
        make_file(folder / w.name, w.task, w.split, rows=3 + SPLITS.index(w.split))
    return folder


def url_of(folder: Path) -> str:
    return folder.as_uri() + "/"


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def count_rows(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as fp:
        return sum(1 for _ in csv.reader(fp, delimiter="\t")) - 1


# --- copy mode ---------------------------------------------------------------------------

def test_copy_from_shared_data(tmp_path, capsys):
    src = _shared_data()
    if src is None:
        pytest.skip("shared CS224N data not found (set MINBERT_DATA or ../shared/data/cs224n)")
    dest = tmp_path / "data"
    assert gd.main(["--from", str(src), "--dest", str(dest)]) == 0
    out, err = capsys.readouterr()
    for w in FILES:
        name = w.name
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        if (src / name).is_file():
            assert same_bytes(src / name, dest / name), name
            assert line.split()[1] == str(count_rows(src / name))
            assert "ok (copied)" in line
        else:
            assert w.split == "test", f"required file {name} missing in {src}"
            assert "missing (warning)" in line and f"warning: {name}" in err
            assert not (dest / name).exists()
    assert f"export MINBERT_DATA={dest.resolve()}" in out
    assert not [p for p in dest.iterdir() if p.name.endswith(".part")]


def test_copy_missing_test_student_only_warns(remote, tmp_path, capsys):
    (remote / "quora-test-student.csv").unlink()
    dest = tmp_path / "data"
    assert gd.main(["--from", str(remote), "--dest", str(dest)]) == 0
    out, err = capsys.readouterr()
    assert "warning: quora-test-student.csv" in err
    assert "missing (warning)" in out
    assert same_bytes(remote / "quora-train.csv", dest / "quora-train.csv")


def test_copy_missing_train_is_error(remote, tmp_path, capsys):
    (remote / "sts-train.csv").unlink()
    assert gd.main(["--from", str(remote), "--dest", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "sts-train.csv" in err and "error:" in err


# --- download mode (file:// URLs) ------------------------------------------------------

def test_download_byte_identical_then_skips(remote, tmp_path, capsys):
    dest = tmp_path / "data"
    args = ["--url-base", url_of(remote), "--dest", str(dest)]
    assert gd.main(args) == 0
    out = capsys.readouterr().out
    for w in FILES:
        name = w.name
        assert same_bytes(remote / name, dest / name), name
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert line.split()[1] == str(3 + SPLITS.index(w.split)) and "ok (downloaded)" in line
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert gd.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("ok (already present)") == 12 and "downloaded" not in out
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes


def test_force_refetches_same_size_file(remote, tmp_path, capsys):
    dest = tmp_path / "data"
    args = ["--url-base", url_of(remote), "--dest", str(dest), "--tasks", "sst"]
    assert gd.main(args) == 0
    original = (remote / "ids-sst-dev.csv").read_bytes()
    (dest / "ids-sst-dev.csv").write_bytes(original.replace(b"s 1", b"x 1"))
    assert gd.main(args) == 0  # same size: skipped
    assert (dest / "ids-sst-dev.csv").read_bytes() != original
    assert gd.main(args + ["--force"]) == 0
    assert (dest / "ids-sst-dev.csv").read_bytes() == original
    assert "ok (downloaded)" in capsys.readouterr().out


def test_tasks_subset(remote, tmp_path, capsys):
    dest = tmp_path / "data"
    assert gd.main(["--url-base", url_of(remote), "--dest", str(dest), "--tasks", "sts", "para"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(names("sts", "para"))
    assert len(names("sts", "para")) == 6


def test_download_missing_train_names_url(remote, tmp_path, capsys):
    (remote / "ids-sst-train.csv").unlink()
    dest = tmp_path / "data"
    assert gd.main(["--url-base", url_of(remote), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err
    assert url_of(remote) + "ids-sst-train.csv" in err
    assert "--from" in err and "Traceback" not in err
    assert not (dest / "ids-sst-train.csv").exists()


def test_download_missing_test_student_warns(remote, tmp_path, capsys):
    (remote / "quora-test-student.csv").unlink()
    assert gd.main(["--url-base", url_of(remote), "--dest", str(tmp_path / "d")]) == 0
    assert "warning: quora-test-student.csv" in capsys.readouterr().err


def test_wrong_columns_reported(remote, tmp_path, capsys):
    bad = remote / "sts-dev.csv"
    bad.write_text("\tid\tsentence1\tsentence2\tscore\n0\ta\tb\tc\t1.0\n", encoding="utf-8")
    assert gd.main(["--url-base", url_of(remote), "--dest", str(tmp_path / "d")]) == 1
    out, err = capsys.readouterr()
    line = next(ln for ln in out.splitlines() if ln.startswith("sts-dev.csv "))
    assert "BAD COLUMNS" in line and "similarity" in line
    assert "sts-dev.csv" in err and "export MINBERT_DATA" not in out


def test_check_file_by_name_not_position(tmp_path):
    path = tmp_path / "ids-sst-test-student.csv"
    make_file(path, "sst", "test", rows=4)
    columns = {w.split: w.columns for w in FILES if w.task == "sst"}
    assert columns["test"] == ("id", "sentence") and columns["train"][-1] == "sentiment"
    assert dl.check_file(path, columns["test"]) == (4, "ok")
    rows, status = dl.check_file(path, columns["train"])  # no label column
    assert rows == 4 and "sentiment" in status


def test_interrupted_download_leaves_no_file(tmp_path):
    class Broken:
        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("connection reset")
            return b"partial data"

    dest = tmp_path / "ids-sst-train.csv"
    with pytest.raises(ConnectionResetError):
        dl.atomic_write(dest, Broken(), total=100, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_dest_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MINBERT_DATA", str(tmp_path / "x"))
    assert gd.parse_args([]).dest == tmp_path / "x"
    monkeypatch.delenv("MINBERT_DATA")
    assert gd.parse_args([]).dest == Path("data")


def test_url_base_from_env(monkeypatch, remote, tmp_path):
    monkeypatch.setenv(dl.URL_ENV, url_of(remote))
    assert gd.parse_args([]).url_base == url_of(remote)
    assert gd.main(["--dest", str(tmp_path / "d"), "--tasks", "sts"]) == 0
    assert same_bytes(remote / "sts-dev.csv", tmp_path / "d" / "sts-dev.csv")
    monkeypatch.delenv(dl.URL_ENV)
    assert gd.parse_args([]).url_base == dl.DEFAULT_URL_BASE


def test_unknown_or_non_cs224n_task_is_one_line_error(monkeypatch, remote, tmp_path, capsys):
    args = ["--url-base", url_of(remote), "--dest", str(tmp_path / "d")]
    assert gd.main(args + ["--tasks", "nosuchtask"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nosuchtask" in err[0]
    csv_task = dataclasses.replace(TASKS[0], name="mine", source={
        "format": "csv", "data_files": {"train": "a.csv", "dev": "b.csv"}})
    monkeypatch.setattr(gd, "get_tasks", lambda names: [csv_task])
    assert gd.main(args + ["--tasks", "mine"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mine (csv" in err[0] and "cs224n" in err[0]
    assert not (tmp_path / "d").exists()


# --- the CLI as a subprocess ---------------------------------------------------------------

def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINBERT_DATA"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_download_and_missing_source(remote, tmp_path):
    proc = _run_cli("--url-base", url_of(remote), "--tasks", "sst", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert same_bytes(remote / "ids-sst-train.csv", tmp_path / "data" / "ids-sst-train.csv")
    assert f"export MINBERT_DATA={(tmp_path / 'data').resolve()}" in proc.stdout

    proc = _run_cli("--from", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "d"), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: source folder")
    assert "nowhere" in lines[0] and "Traceback" not in proc.stderr


def test_http_download_and_404(remote, tmp_path, capsys):
    """Same flow over a localhost HTTP server (real Content-Length and HTTP 404)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(remote))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        dest = tmp_path / "data"
        assert gd.main(["--url-base", base, "--dest", str(dest), "--tasks", "para"]) == 0
        assert same_bytes(remote / "quora-dev.csv", dest / "quora-dev.csv")
        assert gd.main(["--url-base", base, "--dest", str(dest), "--tasks", "para"]) == 0
        assert capsys.readouterr().out.count("ok (already present)") == 3
        (remote / "sts-dev.csv").unlink()
        assert gd.main(["--url-base", base, "--dest", str(dest), "--tasks", "sts"]) == 1
        err = capsys.readouterr().err
        assert base + "sts-dev.csv" in err and "404" in err
    finally:
        server.shutdown()
        server.server_close()
