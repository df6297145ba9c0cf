#!/usr/bin/env python
"""Fetch the CS224N minBERT default-project data files into a data root.

The data is the Stanford CS224N minBERT default final project data:
  * SST-5, Stanford Sentiment Treebank (Socher et al. 2013)  -> ids-sst-*.csv
  * Quora Question Pairs (paraphrase detection)              -> quora-*.csv
  * STS-B, Semantic Textual Similarity Benchmark (Cer et al. 2017) -> sts-*.csv
  * CFIMDB, polarity-labelled IMDB movie reviews              -> ids-cfimdb-*.csv

Each task has ``train``, ``dev`` and ``test-student`` splits, stored as
tab-separated files with a header row and an index column.

Usage:
  python scripts/get_data.py [--dest DIR]           # download (stdlib urllib)
  python scripts/get_data.py --from DIR [--dest DIR]  # copy from a local folder

The default destination is ``$MINBERT_DATA`` if set, else ``./data``. Files
already present with the same size are skipped (``--force`` re-fetches).
Downloads go to a temporary file that is renamed into place, so an interrupted
run never leaves a half-written file. Afterwards every file's header is checked
and a summary table is printed, followed by the ``export MINBERT_DATA=...``
line to use. A missing test-student file is only a warning; a missing train or
dev file is an error (exit code 1).
"""
from __future__ import annotations

import argparse
import csv
import http.client
import os
import shlex
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

DEFAULT_URL_BASE = (
    "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"
)
SPLITS = ("train", "dev", "test-student")
PREFIXES = {"sst": "ids-sst", "quora": "quora", "sts": "sts", "cfimdb": "ids-cfimdb"}
# Columns required in every split; LABELS[task] is also required in train/dev.
TEXT_COLUMNS = {
    "sst": ("id", "sentence"),
    "cfimdb": ("id", "sentence"),
    "quora": ("id", "sentence1", "sentence2"),
    "sts": ("id", "sentence1", "sentence2"),
}
LABELS = {"sst": "sentiment", "cfimdb": "sentiment", "quora": "is_duplicate", "sts": "similarity"}
HINT = "or use --from DIR with a local copy of the CS224N data"


class FetchError(Exception):
    """A failure that is reported as a one-line message (exit code 1)."""


class Missing(Exception):
    """The source has no such file (HTTP 404 / file not found)."""


def file_name(task: str, split: str) -> str:
    return f"{PREFIXES[task]}-{split}.csv"


def expected_columns(task: str, split: str) -> tuple[str, ...]:
    cols = TEXT_COLUMNS[task]
    return cols if split == "test-student" else cols + (LABELS[task],)


def default_dest() -> Path:
    return Path(os.environ.get("MINBERT_DATA") or "data")


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
        raise FetchError(f"could not download {url}: HTTP {exc.code} {exc.reason}; "
                         f"retry later, {HINT}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):
            raise Missing(url) from None
        raise FetchError(f"could not reach {url} ({exc.reason}); check your network "
                         f"connection or --url-base, {HINT}") from None
    except (OSError, ValueError) as exc:
        raise FetchError(f"could not download {url} ({exc}); {HINT}") from None


def download(name: str, dest: Path, url_base: str, force: bool, progress: bool,
             timeout: float = 60.0) -> str:
    """Download one file; return 'downloaded' or 'already present'."""
    url = url_base.rstrip("/") + "/" + name
    with open_url(url, timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if not force and dest.is_file() and total is not None and dest.stat().st_size == total:
            return "already present"
        try:
            atomic_write(dest, resp, total, progress)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"download of {url} failed ({exc}); re-run the script, "
                             f"{HINT}") from None
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


def check_file(path: Path, task: str, split: str) -> tuple[int | None, str]:
    """Return (rows, status) after checking the header has the expected columns."""
    try:
        with open(path, newline="", encoding="utf-8") as fp:
            reader = csv.reader(fp, delimiter="\t")
            header = [h.strip() for h in next(reader, [])]
            rows = sum(1 for _ in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, f"UNREADABLE ({exc})"
    missing = [c for c in expected_columns(task, split) if c not in header]
    if missing:
        return rows, f"BAD COLUMNS: missing {', '.join(missing)} (header: {header})"
    if rows == 0:
        return rows, "EMPTY"
    return rows, "ok"


def fetch_one(task: str, split: str, args: argparse.Namespace) -> str | None:
    """Fetch one file; return its action, or None if an optional file is missing."""
    name = file_name(task, split)
    dest = args.dest / name
    try:
        if args.src is not None:
            return copy(name, dest, args.src, args.force)
        return download(name, dest, args.url_base, args.force, args.progress, args.timeout)
    except Missing as exc:
        if split == "test-student":
            print(f"warning: {name} not found at {exc}; skipping it (test-student files "
                  "are only needed to write test predictions)", file=sys.stderr)
            return None
        if args.src is not None:
            raise FetchError(f"required file {name} not found: {exc}; pass --from a "
                             "folder holding all CS224N data files") from None
        raise FetchError(f"required file {name} not found at {exc}; check --url-base, "
                         f"{HINT}") from None


def prepare(args: argparse.Namespace) -> None:
    """Validate the source folder and create the destination folder."""
    if args.src is not None and not args.src.is_dir():
        raise FetchError(f"source folder {args.src} does not exist; pass --from a folder "
                         "holding the CS224N data files (e.g. ids-sst-train.csv)")
    try:
        args.dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create destination folder {args.dest} ({exc}); "
                         "choose another one with --dest") from None


def fetch_all(args: argparse.Namespace) -> list[tuple[str, int | None, str]]:
    """Fetch and check every requested file; return summary rows."""
    summary = []
    for task in args.tasks:
        for split in SPLITS:
            name = file_name(task, split)
            action = fetch_one(task, split, args)
            if action is None:
                summary.append((name, None, "missing (warning)"))
                continue
            rows, status = check_file(args.dest / name, task, split)
            summary.append((name, rows, f"{status} ({action})" if status == "ok" else status))
    return summary


def print_summary(summary: list[tuple[str, int | None, str]]) -> None:
    width = max([len("file")] + [len(name) for name, _, _ in summary])
    print(f"{'file':<{width}}  {'rows':>7}  status")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 6}")
    for name, rows, status in summary:
        print(f"{name:<{width}}  {'-' if rows is None else rows:>7}  {status}")


def is_bad(status: str) -> bool:
    return not (status.startswith("ok") or status.startswith("missing"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download (or copy with --from) the CS224N minBERT default-project "
                    "data: SST-5, Quora Question Pairs, STS-B and CFIMDB.")
    parser.add_argument("--dest", type=Path, default=None,
                        help="destination folder (default: $MINBERT_DATA, else ./data)")
    parser.add_argument("--from", dest="src", type=Path, default=None, metavar="DIR",
                        help="copy the files from this local folder instead of downloading")
    parser.add_argument("--url-base", default=DEFAULT_URL_BASE,
                        help=f"base URL of the raw data folder (default: {DEFAULT_URL_BASE})")
    parser.add_argument("--tasks", nargs="+", choices=list(PREFIXES), default=list(PREFIXES),
                        help="tasks to fetch (default: all four)")
    parser.add_argument("--force", action="store_true",
                        help="re-fetch files even if already present with the same size")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="network timeout in seconds (default: 60)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="disable the download progress bars")
    args = parser.parse_args(argv)
    args.dest = args.dest if args.dest is not None else default_dest()
    args.tasks = list(dict.fromkeys(args.tasks))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args)
        summary = fetch_all(args)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; partial downloads were discarded, re-run to resume",
              file=sys.stderr)
        return 130
    print_summary(summary)
    bad = [name for name, _, status in summary if is_bad(status)]
    if bad:
        print(f"error: {len(bad)} file(s) failed the column check: {', '.join(bad)}; "
              "re-fetch them with --force or fix the source", file=sys.stderr)
        return 1
    print(f"\nexport MINBERT_DATA={shlex.quote(str(args.dest.resolve()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
