"""Files and disks: every file a run writes goes through `common.durable.atomic_write`, and a write
the system refuses (permission denied, a read-only file system, a full disk, a path that is a
folder, a folder on the path that is a file) is a `StorageError` naming the path, the cause and what
to do, with no `.tmp` file left and the old file byte for byte as it was. A run's file that is
damaged (truncated, emptied, overwritten) reads back as a `DamagedFileError` naming it, never a
traceback; a torn checkpoint falls back to the one before. `export_peft.py` refuses a folder that
already holds files unless `--force`.

Tests run as root, which ignores permission bits, so refusals are made by monkeypatching the
system call that would fail (`open`, `os.fsync`, `os.replace`) to raise the OSError the kernel
gives, by writing into `/dev/full` (ENOSPC, as a full disk gives it), or by real paths (a folder
where the file should be, a file where a folder should be)."""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, trained_run, write_synthetic_data
from common import durable
from common.durable import RunLock, atomic_write, write_json, write_text
from common.errors import CheckpointError, DamagedFileError, MinbertError, StorageError

OLD = b'{"old": "contents"}\n'


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder`, with the bytes of each file."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), *([str(args[0])] if args else []))
    return fail


# ---------------------------------------------------------------- atomic_write: refused writes

def _open_refused(monkeypatch, code):
    monkeypatch.setattr(durable, "open", fail_with(code), raising=False)


def _fsync_refused(monkeypatch, code):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(code, os.strerror(code))))


def _replace_refused(monkeypatch, code):
    def replace(src, dst):
        raise OSError(code, os.strerror(code), str(src), None, str(dst))
    monkeypatch.setattr(os, "replace", replace)


def _disk_full(monkeypatch, code):
    """The temporary file is created, and every byte written to it goes to /dev/full (ENOSPC)."""
    real = open

    def full(path, mode="r", *args, **kwargs):
        real(path, mode).close()
        return real("/dev/full", mode)
    monkeypatch.setattr(durable, "open", full, raising=False)


@pytest.mark.parametrize("refuse,code,cause", [
    (_open_refused, errno.EACCES, "permission denied"),
    (_open_refused, errno.EROFS, "read-only"),
    (_fsync_refused, errno.ENOSPC, "the disk is full"),
    (_fsync_refused, errno.EIO, "input/output error"),
    (_replace_refused, errno.EACCES, "permission denied"),
    (_replace_refused, errno.EROFS, "read-only"),
    (_disk_full, errno.ENOSPC, "the disk is full"),
], ids=["open-EACCES", "open-EROFS", "fsync-ENOSPC", "fsync-EIO", "rename-EACCES",
        "rename-EROFS", "write-ENOSPC"])
@pytest.mark.parametrize("writer", ["bytes", "torch.save"])
def test_a_refused_write_is_a_storage_error_and_the_old_file_stays(tmp_path, monkeypatch, refuse,
                                                                   code, cause, writer):
    path = tmp_path / "run" / "metrics.json"
    path.parent.mkdir()
    path.write_bytes(OLD)
    write = ((lambda f: f.write(b"x" * 100_000)) if writer == "bytes"
             else (lambda f: torch.save({"w": torch.zeros(50_000)}, f)))
    refuse(monkeypatch, code)
    with pytest.raises(StorageError) as e:
        atomic_write(path, write)
    message = str(e.value)
    assert isinstance(e.value, MinbertError) and "\n" not in message
    assert message.startswith(f"cannot write {path}: ") and cause in message
    monkeypatch.undo()
    assert path.read_bytes() == OLD
    assert leftovers(tmp_path) == []


def test_permission_denied_names_the_folder_and_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "run" / "adapter.safetensors"
    _open_refused(monkeypatch, errno.EACCES)
    with pytest.raises(StorageError) as e:
        write_text(path, "new")
    assert str(e.value) == (f"cannot write {path}: permission denied on {path.parent}; make the "
                            "folder writable for this user, or choose another output folder")


def test_a_path_that_is_a_folder_is_refused_before_writing(tmp_path):
    target = tmp_path / "metrics.json"
    (target / "inside").mkdir(parents=True)
    (target / "inside" / "keep.txt").write_bytes(OLD)
    before = snapshot(tmp_path)
    calls = []
    with pytest.raises(StorageError, match=f"{target} is a folder; move the folder away"):
        atomic_write(target, lambda f: calls.append(f.write(b"new")))
    assert calls == [] and snapshot(tmp_path) == before


@pytest.mark.parametrize("where,cause", [
    ("file/metrics.json", "{tmp}/file is a file, not a folder"),
    ("file/sub/metrics.json", "a part of {tmp}/file/sub is a file, not a folder"),
])
def test_a_file_where_a_folder_should_be_is_named(tmp_path, where, cause):
    (tmp_path / "file").write_bytes(OLD)
    with pytest.raises(StorageError) as e:
        write_json(tmp_path / where, {"a": 1})
    assert str(e.value).startswith(f"cannot write {tmp_path / where}: {cause.format(tmp=tmp_path)}")
    assert (tmp_path / "file").read_bytes() == OLD and leftovers(tmp_path) == []


def test_a_bug_in_the_writer_keeps_its_traceback_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_bytes(OLD)

    def write(f):
        f.write(b"half")
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        atomic_write(path, write)
    assert path.read_bytes() == OLD and leftovers(tmp_path) == []


def test_a_checkpoint_on_a_full_disk_leaves_the_older_ones(tmp_path, monkeypatch):
    from trainers.engine.state import TrainState, checkpoint_files, save_checkpoint

    model, generator = torch.nn.Linear(4, 4), torch.Generator().manual_seed(0)
    state = TrainState()
    for _ in range(2):
        save_checkpoint(state, model, generator, tmp_path)
    before = snapshot(tmp_path)
    _disk_full(monkeypatch, errno.ENOSPC)
    with pytest.raises(StorageError, match="checkpoint-000003.pt: the disk is full; free some"):
        save_checkpoint(state, model, generator, tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and len(checkpoint_files(tmp_path)) == 2


# ------------------------------------------------------------------------------- the run's lock

def test_a_lock_file_that_cannot_be_created_is_a_storage_error(tmp_path, monkeypatch):
    _open_refused(monkeypatch, errno.EROFS)
    with pytest.raises(StorageError) as e:
        with RunLock(tmp_path / "run"):
            pass
    assert str(e.value).startswith(f"cannot create the run's lock file {tmp_path}/run/run.lock: "
                                   "the file system holding")
    assert "read-only" in str(e.value)


def test_a_run_dir_under_a_file_is_a_storage_error(tmp_path):
    from conftest import compose_config, smoke_overrides
    from trainers.engine.run import run

    (tmp_path / "file").write_bytes(OLD)
    root = write_synthetic_data(tmp_path / "data", n=8, tasks=("sst",))
    cfg = compose_config(smoke_overrides(root, "peft=lora", "trainer=single", "trainer.task=sst"))
    with pytest.raises(StorageError, match=f"lock file {tmp_path}/file/run/run.lock: a part of"):
        run(cfg, tmp_path / "file" / "run")
    assert (tmp_path / "file").read_bytes() == OLD


# ------------------------------------------------------------------------ damaged files read back

def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "header": data[:20], "empty": b"",
                      "garbage": b"not a safetensors file at all " * 8}[how])


DAMAGE = ["truncated", "header", "empty", "garbage"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished tiny runs, made once: one model (adapter.safetensors) and per-task experts."""
    root = write_synthetic_data(tmp_path_factory.mktemp("data"))
    runs = {}
    for name, overrides in {"single": ["peft=lora", "trainer=single", "trainer.task=sst"],
                            "eoe": ["peft=lora", "trainer=eoe"]}.items():
        runs[name] = tmp_path_factory.mktemp(name)
        trained_run(root, runs[name], *overrides)
    return root, runs


def copy_run(finished, name: str, tmp_path: Path) -> Path:
    shutil.copytree(finished[1][name], tmp_path / name)
    return tmp_path / name


def one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_adapter_is_named_by_every_script(finished, tmp_path, capsys, how):
    from trainers.engine.record import load_run

    run_dir = copy_run(finished, "single", tmp_path)
    adapter = run_dir / "adapter.safetensors"
    damage(adapter, how)
    with pytest.raises(DamagedFileError, match=f"{adapter} is damaged: the run's adapter file"):
        load_run(run_dir)
    assert load_script("predict").main([str(run_dir), "--text", "a great movie"]) == 1
    one_error_line(capsys, f"{adapter} is damaged", "train the run again")
    out = tmp_path / "export"
    assert load_script("export_peft").main([str(run_dir), str(out)]) == 1
    one_error_line(capsys, f"{adapter} is damaged")
    assert not out.exists()


@pytest.mark.parametrize("how", ["truncated", "empty"])
@pytest.mark.parametrize("file", ["experts/sst.safetensors", "experts/init.safetensors"])
def test_a_damaged_expert_file_is_named_by_every_script(finished, tmp_path, capsys, how, file):
    run_dir = copy_run(finished, "eoe", tmp_path)
    damage(run_dir / file, how)
    assert load_script("predict").main([str(run_dir), "--text", "a great movie"]) == 1
    one_error_line(capsys, f"{run_dir / file} is damaged: the run's")
    assert load_script("merge").main([str(run_dir), "--data-root", str(finished[0])]) == 1
    one_error_line(capsys, f"{run_dir / file} is damaged")
    assert load_script("export_peft").main([str(run_dir), str(tmp_path / "export")]) == 1
    one_error_line(capsys, f"{run_dir / file} is damaged")


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_a_damaged_run_record_is_named_by_the_scripts(finished, tmp_path, capsys, how):
    run_dir = copy_run(finished, "single", tmp_path)
    record = run_dir / "run.json"
    damage(record, how)
    assert load_script("predict").main([str(run_dir), "--text", "a great movie"]) == 1
    one_error_line(capsys, f"{record} is unreadable")
    assert load_script("export_peft").main([str(run_dir), str(tmp_path / "export")]) == 1
    one_error_line(capsys, f"{record} is unreadable")


def test_merge_writes_its_scores_atomically(finished, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(finished, "eoe", tmp_path)
    assert load_script("merge").main([str(run_dir), "--data-root", str(finished[0])]) == 0
    written = run_dir / "merges" / "linear.json"
    before = written.read_bytes()
    assert json.loads(before)["method"] == "linear"
    _fsync_refused(monkeypatch, errno.ENOSPC)
    assert load_script("merge").main([str(run_dir), "--data-root", str(finished[0])]) == 1
    monkeypatch.undo()
    one_error_line(capsys, f"cannot write {written}: the disk is full")
    assert written.read_bytes() == before and leftovers(run_dir) == []


def test_predictions_into_a_folder_are_refused(finished, tmp_path, capsys):
    run_dir = copy_run(finished, "single", tmp_path)
    (tmp_path / "out.csv").mkdir()
    assert load_script("predict").main([str(run_dir), "--input",
                                        str(finished[0] / "ids-sst-dev.csv"),
                                        "--out", str(tmp_path / "out.csv")]) == 1
    one_error_line(capsys, f"cannot write {tmp_path / 'out.csv'}: {tmp_path / 'out.csv'} is a "
                           "folder")


# --------------------------------------------------------------------------- damaged checkpoints

def _checkpoints(tmp_path: Path, n: int) -> list[Path]:
    from trainers.engine.state import TrainState, checkpoint_files, save_checkpoint

    model, generator, state = torch.nn.Linear(4, 4), torch.Generator().manual_seed(0), TrainState()
    for _ in range(n):
        state.step += 1
        save_checkpoint(state, model, generator, tmp_path, keep=n)
    return checkpoint_files(tmp_path)


@pytest.mark.parametrize("how", DAMAGE + ["not-a-dict"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, how, caplog):
    from trainers.engine.state import load_checkpoint

    older, newest = _checkpoints(tmp_path, 2)
    if how == "not-a-dict":
        torch.save(torch.zeros(3), newest)
    else:
        damage(newest, how)
    sd = load_checkpoint(tmp_path)
    assert sd["state"]["counters"]["step"] == 1
    assert f"checkpoint {newest} is unreadable" in caplog.text


@pytest.mark.parametrize("how", DAMAGE)
def test_every_checkpoint_damaged_is_a_named_error(tmp_path, how):
    from trainers.engine.state import load_checkpoint

    files = _checkpoints(tmp_path, 2)
    for path in files:
        damage(path, how)
    with pytest.raises(DamagedFileError, match="holds 2 checkpoint.* every one is damaged.*move "
                                               f"{tmp_path}/checkpoints away"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_base_checkpoint_is_named(tmp_path, how):
    from minbert.checkpoint import _read_weights

    save_file({"w": torch.zeros(64)}, str(tmp_path / "model.safetensors"))
    damage(tmp_path / "model.safetensors", how)
    with pytest.raises(DamagedFileError, match="model.safetensors cannot be read: the checkpoint"):
        _read_weights(tmp_path)
    assert issubclass(DamagedFileError, CheckpointError)


# ------------------------------------------------------------------------------- export_peft.py

def test_export_refuses_a_folder_that_holds_an_export_unless_forced(finished, tmp_path, capsys):
    export = load_script("export_peft")
    run_dir, out = finished[1]["single"], tmp_path / "export"
    assert export.main([str(run_dir), str(out)]) == 0
    capsys.readouterr()
    first = snapshot(out)
    assert {"adapter_config.json", "adapter_model.safetensors",
            "minbert_heads.safetensors"} <= set(first)
    assert export.main([str(run_dir), str(out)]) == 1
    one_error_line(capsys, f"{out} already holds an export", "pass --force", "another folder")
    assert snapshot(out) == first
    assert export.main([str(run_dir), str(out), "--force"]) == 0
    assert snapshot(out) == first  # the same run exports the same bytes
    assert leftovers(out) == []


def test_export_refuses_a_folder_with_other_files_and_a_file(finished, tmp_path, capsys):
    export = load_script("export_peft")
    run_dir, out = finished[1]["single"], tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_bytes(OLD)
    assert export.main([str(run_dir), str(out)]) == 1
    one_error_line(capsys, f"{out} already holds 1 file(s) or folder(s) (notes.txt)", "--force")
    assert snapshot(out) == {"notes.txt": OLD}
    (tmp_path / "a-file").write_bytes(OLD)
    assert export.main([str(run_dir), str(tmp_path / "a-file")]) == 1
    one_error_line(capsys, f"{tmp_path / 'a-file'}: it is a file, not a folder")
    assert export.main([str(run_dir), str(tmp_path / "empty")]) == 0  # new: fine
    (tmp_path / "empty2").mkdir()
    assert export.main([str(run_dir), str(tmp_path / "empty2")]) == 0  # empty: fine


def test_export_on_a_full_disk_is_one_error_line(finished, tmp_path, capsys, monkeypatch):
    export = load_script("export_peft")
    _disk_full(monkeypatch, errno.ENOSPC)
    assert export.main([str(finished[1]["single"]), str(tmp_path / "export")]) == 1
    monkeypatch.undo()
    one_error_line(capsys, f"cannot write {tmp_path / 'export'}/", "the disk is full")
    assert leftovers(tmp_path) == []


def test_the_writers_are_atomic():
    """No script or library writer of a run's files bypasses atomic_write."""
    for rel in ("scripts/export_peft.py", "scripts/merge.py", "minbert/peft/io.py"):
        text = (REPO / rel).read_text()
        assert "save_file(" not in text and ".write_text(" not in text, rel
