"""Fetching the CS224N minBERT default-project data files (SST-5, Quora Question Pairs, STS-B,
CFIMDB) into a data root, and `data_root`, the folder a run reads its tasks' files from.

Which files to fetch and which columns to check come from the task files (`conf/task/*.yaml`) of
the `cs224n`-format tasks: each relative path in `source.data_files` is fetched from the data root
of the upstream project (`DEFAULT_URL_BASE`, or `$MINBERT_DATA_URL`, e.g. a `file://` URL of a
local mirror) or copied from a local folder. Downloads stream into a temporary file that is renamed
into place, so an interrupted fetch never leaves a half-written file; files already present with
the same size are skipped unless `force`. Every fetched file's header is then checked: the id and
text columns, and the label column in train and dev (the test file has none). A missing test file
is only a warning (upstream has no quora test file); a missing train or dev file is an error.

`data_root(cfg, tasks)` returns the data folder of a run; with `data.download: auto` a missing
folder is created and filled with the CS224N files its tasks need. Other formats are never fetched.
`scripts/get_data.py` is the command-line entry point.
"""
from __future__ import annotations

import csv
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from common.errors import ConfigError, DataError
from tasks.data import chosen_root  # (tasks.data also lifts csv's field size limit for IMDB)

log = logging.getLogger(__name__)
DEFAULT_URL_BASE = (
    "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"
)
URL_ENV = "MINBERT_DATA_URL"  # overrides DEFAULT_URL_BASE (a mirror, or file:// in tests)
DEFAULT_TASKS = ("sst", "para", "sts", "cfimdb")
DOWNLOAD_MODES = ("auto", "never")
HINT = "or use --from DIR with a local copy of the CS224N data"
Summary = list[tuple[str, "int | None", str]]  # (file, rows, status) per file


class FetchError(Exception):
    """A fetch failed. `reason` says what went wrong; str() adds what to do about it."""

    def __init__(self, reason: str, advice: str = ""):
        self.reason = " ".join(reason.split())  # always one line
        super().__init__(f"{self.reason}; {advice}" if advice else self.reason)


class Missing(Exception):
    """The source has no such file (HTTP 404 / file not found)."""


@dataclass(frozen=True)
class Wanted:
    """One file to fetch: `name` is its path under the data root (and under the URL base)."""

    task: str
    split: str  # train | dev | test
    name: str
    columns: tuple[str, ...]  # the header must have these
    required: bool  # train and dev are; a missing test file only warns


def url_base() -> str:
    """The base URL files are fetched from: $MINBERT_DATA_URL if set, else DEFAULT_URL_BASE."""
    return os.environ.get(URL_ENV) or DEFAULT_URL_BASE


def default_dest() -> Path:
    return Path(os.environ.get("MINBERT_DATA") or "data")


def files_of(tasks) -> list[Wanted]:
    """The fetchable files of `tasks`: the relative data files of the cs224n-format ones."""
    wanted = []
    for task in tasks:
        if task.format != "cs224n":
            continue
        for split in (task.source.get("data_files") or {}):
            rel = task.path(Path(), split)  # relative to the root, unless the file is absolute
            if rel is None or rel.is_absolute():
                continue
            label = () if split == "test" else (task.label_column,)
            columns = (task.id_column or "id", *task.text_columns, *label)
            wanted.append(Wanted(task.name, split, rel.as_posix(), columns, split != "test"))
    return wanted


def atomic_write(dest: Path, src_stream, total: int | None, progress: bool) -> None:
    """Stream ``src_stream`` into ``dest`` via a temp file + atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=dest.name,
            disable=None if progress else True, leave=False,
        ) as bar:
            while chunk := src_stream.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_url(url: str, timeout: float):
    """Open ``url``; raise Missing for a 404/absent file, FetchError otherwise."""
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise Missing(f"{url} (HTTP 404)") from None
        raise FetchError(f"could not download {url}: HTTP {exc.code} {exc.reason}",
                         f"retry later, {HINT}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):
            raise Missing(url) from None
        raise FetchError(f"could not reach {url} ({exc.reason})",
                         f"check your network connection or --url-base, {HINT}") from None
    except (OSError, ValueError) as exc:
        raise FetchError(f"could not download {url} ({exc})", HINT) from None


def download(name: str, dest: Path, base: str, force: bool, progress: bool,
             timeout: float = 60.0) -> str:
    """Download one file; return 'downloaded' or 'already present'."""
    url = base.rstrip("/") + "/" + name
    with open_url(url, timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if not force and dest.is_file() and total is not None and dest.stat().st_size == total:
            return "already present"
        try:
            atomic_write(dest, resp, total, progress)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"download of {url} failed ({exc})",
                             f"re-run the script, {HINT}") from None
    return "downloaded"


def copy(name: str, dest: Path, src_dir: Path, force: bool) -> str:
    """Copy one file from ``src_dir``; return 'copied' or 'already present'."""
    src = src_dir / name
    if not src.is_file():
        raise Missing(str(src))
    if dest.exists() and src.samefile(dest):
        return "already present"
    if not force and dest.is_file() and dest.stat().st_size == src.stat().st_size:
        return "already present"
    try:
        with open(src, "rb") as fp:
            atomic_write(dest, fp, src.stat().st_size, progress=False)
    except OSError as exc:
        raise FetchError(f"could not copy {src} to {dest} ({exc})") from None
    return "copied"


def check_file(path: Path, columns) -> tuple[int | None, str]:
    """Return (rows, status) after checking the header has `columns` (by name, any order)."""
    try:
        with open(path, newline="", encoding="utf-8") as fp:
            reader = csv.reader(fp, delimiter="\t")
            header = [h.strip() for h in next(reader, [])]
            rows = sum(1 for _ in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, f"UNREADABLE ({exc})"
    missing = [c for c in columns if c not in header]
    if missing:
        return rows, f"BAD COLUMNS: missing {', '.join(missing)} (header: {header})"
    if rows == 0:
        return rows, "EMPTY"
    return rows, "ok"


def _fetch_one(w: Wanted, dest: Path, src: Path | None, base: str, force: bool,
               progress: bool, timeout: float, warn: Callable[[str], None]) -> str | None:
    """Fetch one file; return its action, or None if an optional file is missing."""
    target = dest / w.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if src is not None:
            return copy(w.name, target, src, force)
        return download(w.name, target, base, force, progress, timeout)
    except OSError as exc:
        raise FetchError(f"cannot create folder {target.parent} ({exc})",
                         "choose another destination") from None
    except Missing as exc:
        if not w.required:
            warn(f"{w.name} not found at {exc}; skipping it ({w.split} files are only needed "
                 "to write test predictions)")
            return None
        if src is not None:
            raise FetchError(f"required file {w.name} not found: {exc}",
                             "pass --from a folder holding all CS224N data files") from None
        raise FetchError(f"required file {w.name} not found at {exc}",
                         f"check --url-base, {HINT}") from None


def fetch(tasks, dest: Path, src: Path | None = None, base: str | None = None,
          force: bool = False, progress: bool = True, timeout: float = 60.0,
          warn: Callable[[str], None] = log.warning) -> Summary:
    """Fetch (download from `base`, default `url_base()`, or copy from `src`) and check every
    file of the cs224n tasks in `tasks` into `dest`; return the summary rows. Raises FetchError."""
    dest, base = Path(dest), base or url_base()
    if src is not None and not Path(src).is_dir():
        raise FetchError(f"source folder {src} does not exist",
                         "pass --from a folder holding the CS224N data files "
                         "(e.g. ids-sst-train.csv)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create destination folder {dest} ({exc})",
                         "choose another one with --dest") from None
    summary = []
    for w in files_of(tasks):
        action = _fetch_one(w, dest, src, base, force, progress, timeout, warn)
        if action is None:
            summary.append((w.name, None, "missing (warning)"))
            continue
        rows, status = check_file(dest / w.name, w.columns)
        summary.append((w.name, rows, f"{status} ({action})" if status == "ok" else status))
    return summary


def format_summary(summary: Summary) -> str:
    """The summary as a table: file, rows, status."""
    width = max([len("file")] + [len(name) for name, _, _ in summary])
    lines = [f"{'file':<{width}}  {'rows':>7}  status", f"{'-' * width}  {'-' * 7}  {'-' * 6}"]
    lines += [f"{name:<{width}}  {'-' if rows is None else rows:>7}  {status}"
              for name, rows, status in summary]
    return "\n".join(lines)


def bad_files(summary: Summary) -> list[str]:
    """The files whose check failed (a missing optional file is not a failure)."""
    return [name for name, _, status in summary
            if not (status.startswith("ok") or status.startswith("missing"))]


# --- the data root of a run ----------------------------------------------------------------------

def data_root(cfg, tasks) -> Path:
    """The run's data folder: `data.root`, else $MINBERT_DATA, else ./data. If it does not exist
    and `data.download` is auto, it is created and the CS224N files of the tasks that need them
    are fetched into it; otherwise (or if that fails) a one-line DataError says how to get them."""
    mode = cfg.data.get("download", "auto")
    if mode not in DOWNLOAD_MODES:
        raise ConfigError(f"data.download={mode!r} must be one of {list(DOWNLOAD_MODES)}: auto "
                          "fetches the CS224N files into a missing data root, never only stops")
    root = chosen_root(cfg.data.get("root"))
    if root.is_dir():
        return root
    missing = [t for t in tasks if any(p is not None and not p.is_file()
                                       for p in (t.path(root, s) for s in ("train", "dev")))]
    if not missing:
        return root  # no task reads files under it (hub data sets, absolute paths)
    how = (f"fetch them with `python scripts/get_data.py --dest {root}`, or set data.root=... "
           "or MINBERT_DATA to the folder that holds them")
    others = [f"{t.name} ({t.format}, {t.file})" for t in missing if t.format != "cs224n"]
    if others:
        raise DataError(f"data folder {root} does not exist; the files of task(s) "
                        f"{', '.join(others)} cannot be downloaded: set data.root=... or "
                        "MINBERT_DATA to the folder that holds them")
    if mode == "never":
        raise DataError(f"data folder {root} does not exist (data.download=never); {how}")
    try:
        _download_root(root, missing, bool(cfg.get("progress", True)))
    except FetchError as exc:
        raise DataError(f"data folder {root} does not exist and downloading the CS224N files "
                        f"failed ({exc.reason}); {how}") from None
    return root


def _download_root(root: Path, tasks, progress: bool) -> None:
    """Fetch `tasks`' files into a temporary sibling of `root`, then rename it to `root`, so a
    failed download leaves no half-filled data folder behind."""
    base = url_base()
    log.info("data folder %s does not exist: downloading the CS224N files of %s from %s "
             "(data.download=auto)", root, ", ".join(t.name for t in tasks), base)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".part"))
    except OSError as exc:
        raise FetchError(f"cannot create data folder {root} ({exc})") from None
    try:
        summary = fetch(tasks, tmp, base=base, progress=progress)
        bad = bad_files(summary)
        if bad:
            log.error("the fetched files in %s:\n%s", tmp, format_summary(summary))
            raise FetchError(f"{', '.join(bad)} failed the column check")
        log.info("fetched into %s:\n%s", root, format_summary(summary))
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():  # else another run filled it meanwhile: use that one
                raise FetchError(f"cannot create data folder {root}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
