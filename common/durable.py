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

A write that the system refuses (a read-only or someone else's folder, a full disk, a path that is
a folder, a folder on the path that is a file) raises `common.errors.StorageError`, whose one-line
message names the path, the cause in words and what to do (`train.py` and the scripts print it as
one `error:` line); the temporary file is removed and the old file is left as it was.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Callable, IO

from common.distributed import is_main, rank
from common.errors import ConfigError, DamagedFileError, StorageError

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


# errno -> (the cause in words, what to do); `{file}`: the path the system named
_CAUSES = {
    errno.EACCES: ("permission denied on {file}",
                   "make the folder writable for this user, or choose another output folder"),
    errno.EPERM: ("permission denied on {file}",
                  "make the folder writable for this user, or choose another output folder"),
    errno.EROFS: ("the file system holding {file} is read-only",
                  "choose an output folder on a writable disk"),
    errno.ENOSPC: ("the disk is full", "free some space, or choose an output folder on "
                   "another disk, and run again"),
    errno.EDQUOT: ("the disk quota is used up", "free some space, or choose an output folder on "
                   "another disk, and run again"),
    errno.EFBIG: ("the file is too large for its file system",
                  "choose an output folder on another disk"),
    errno.EISDIR: ("{file} is a folder", "move the folder away, or choose another path"),
    errno.ENOTDIR: ("a part of {file} is a file, not a folder",
                    "move that file away, or choose another path"),
    errno.EEXIST: ("{file} is a file, not a folder", "move that file away, or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
    errno.EIO: ("an input/output error (a failing disk or a lost network mount)",
                "check the disk, then run again"),
}
# errors of the disk, not of the code, that a serializer (torch.save) may wrap in its own
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES,
                errno.EPERM}


def storage_error(path: str | Path, error: OSError, action: str = "write",
                  file: str | Path | None = None) -> StorageError:
    """`error` (from writing `path`) as a StorageError: `cannot <action> <path>: <cause>; <what
    to do>`. `file`: the path the cause is about (default: the one the system named)."""
    if file is None:
        file = error.filename if error.filename is not None else path
    cause, todo = _CAUSES.get(error.errno, (error.strerror or str(error) or type(error).__name__,
                                            "check the folder and the disk, then run again"))
    return StorageError(f"cannot {action} {path}: {cause.replace('{file}', str(file))}; {todo}")


def _cause_file(error: OSError, path: Path, tmp: Path) -> str | Path | None:
    """What the cause of a failed atomic write is about: the folder, when creating or renaming
    the temporary file in it is refused; `path` when it is a folder; else what the system named."""
    if error.errno == errno.EISDIR and error.filename2 is not None:
        return error.filename2  # os.replace(tmp, path) onto a folder
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and \
            str(error.filename) in (str(tmp), str(path)):
        return path.parent
    return error.filename


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: `e` itself, or one of the disk's errors that `e` was raised while
    handling (torch.save reports a full disk as a RuntimeError raised from the OSError)."""
    if isinstance(e, OSError):
        return e
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object],
                 fault: str | None = None) -> Path:
    """Writes `path` all or nothing: `write(f)` into a temporary file in the same folder, flush,
    fsync, rename over `path`, fsync the folder. A kill at any point leaves the old file or the new
    one, never a torn one (a stale `.tmp` at worst, overwritten by the next write). A failure of
    the system (`OSError`: read-only folder, full disk, ...) raises a `StorageError` naming the
    path, the cause and what to do; on any failure the temporary file is removed and the old file
    is as it was. On a rank other than 0 of a data-parallel run, nothing is written (rank 0 writes
    the run's files)."""
    path = Path(path)
    if not is_main():
        return path
    if path.is_dir():  # found now, not at the rename after the whole write
        raise storage_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR),
                                                    str(path)))
    tmp = path.with_name(f".{path.name}.tmp")
    created = False  # whether `tmp` is ours to remove
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
        created = True
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
        created = False
        fsync_dir(path.parent)
    except Exception as e:
        cause = _os_error(e)
        if cause is None:
            raise  # not the system's: a bug, with its traceback
        raise storage_error(path, cause, file=_cause_file(cause, path, tmp)) from e
    finally:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


RETRAIN = ("if the run folder was copied, copy it again; else train the run again (train.py with "
           "the run's config) in a new folder")


def damaged_file(path: str | Path, error: BaseException, what: str = "file",
                 recover: str = RETRAIN) -> DamagedFileError:
    """A file that is there but cannot be read back (truncated, emptied, overwritten) as a
    DamagedFileError: `<path> is damaged: the run's <what> cannot be read (<why>); <recover>`."""
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DamagedFileError(f"{path} is damaged: the run's {what} cannot be read ({why}); "
                            f"{recover}")


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise storage_error(self.path, e, "create the run's lock file",
                                _cause_file(e, self.path, self.path)) from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{self.path.parent} is being run by {holder}; wait for it to end "
                              "(or kill it) before running or resuming it again") from None
        except OSError as e:  # a file system without locks (ENOLCK), ...
            f.close()
            raise storage_error(self.path, e, "lock") from e
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}\n")
            f.flush()
        except OSError as e:  # the holder's pid is only for a second process's message
            with contextlib.suppress(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                f.close()
            raise storage_error(self.path, e) from e
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
