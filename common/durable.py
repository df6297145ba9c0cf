"""Files that survive a kill at any moment: every file a run writes goes through `atomic_write`
(the write-to-temp, fsync, rename, fsync-the-folder sequence of SQLite's and LMDB's durable
commits, which POSIX `rename(2)` makes all-or-nothing), a `RunLock` that the kernel releases when
its process dies (flock(2)), and named fault points for the tests: `MINBERT_FAULT=<point>[@n]`
makes the process SIGKILL itself the n-th time (default: the first) it reaches `<point>`, so a
test can kill a run exactly where a crash would hurt most; `<point>[@n]:USR2` (or `:TERM`) sends
that signal instead, as a cluster does before preempting a job. In a data-parallel run,
`MINBERT_FAULT_RANK=<r>` limits the fault to rank r (default: every rank).

Points: `checkpoint-write` (inside a checkpoint write, before the rename), `adapter-written` (after
a best-state file is renamed in), `history-appended` (after history.jsonl is rewritten),
`before-metrics` (before metrics.json, the file that marks a finished run), `step` (after an
optimizer step).

In a data-parallel run (`torchrun`, `trainers.engine.parallel`) only rank 0 writes: on the other
ranks `atomic_write` (and so `write_text`, `write_json`, every checkpoint, adapter and history
file) writes nothing, since rank 0 holds the same state (`common.distributed`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Callable, IO

from common.distributed import is_main, rank
from common.errors import ConfigError

FAULT_ENV = "MINBERT_FAULT"
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    """Kills this process with SIGKILL if `MINBERT_FAULT` names this point (and this is the n-th
    time it is reached). A no-op otherwise."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, _, sig = spec.partition(":")
    point, _, nth = where.partition("@")
    if point != name or os.environ.get("MINBERT_FAULT_RANK", str(rank())) != str(rank()):
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}") if sig else signal.SIGKILL)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object],
                 fault: str | None = None) -> Path:
    """Writes `path` all or nothing: `write(f)` into a temporary file in the same folder, flush,
    fsync, rename over `path`, fsync the folder. A kill at any point leaves the old file or the new
    one, never a torn one (a stale `.tmp` at worst, overwritten by the next write). On a rank
    other than 0 of a data-parallel run, nothing is written (rank 0 writes the run's files)."""
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if fault:
        fault_point(fault)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


class RunLock:
    """`with RunLock(run_dir):` holds an exclusive lock on `<run_dir>/run.lock` for as long as this
    process runs the run; a second process asking for it gets a ConfigError naming the holder.
    The kernel drops the lock when the holder dies, even by SIGKILL, so no stale lock survives."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "run.lock"
        self._file: IO | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path.parent} is being run by {holder}; wait for it to end "
                              "(or kill it) before running or resuming it again") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
