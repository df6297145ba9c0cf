#!/usr/bin/env python
"""Fetch the CS224N minBERT default-project data files into a data root.

The data is the Stanford CS224N minBERT default final project data:
  * SST-5, Stanford Sentiment Treebank (Socher et al. 2013)  -> ids-sst-*.csv      (task sst)
  * Quora Question Pairs (paraphrase detection)              -> quora-*.csv        (task para)
  * STS-B, Semantic Textual Similarity Benchmark (Cer et al. 2017) -> sts-*.csv    (task sts)
  * CFIMDB, polarity-labelled IMDB movie reviews              -> ids-cfimdb-*.csv  (task cfimdb)

The files to fetch and the columns to check come from the task files `conf/task/<name>.yaml` of
the chosen `cs224n`-format tasks (`--tasks`, default all four); the work is done by
`tasks.download`, which training also uses to fetch a missing data root (`data.download: auto`).

Usage:
  python scripts/get_data.py [--dest DIR]           # download (stdlib urllib)
  python scripts/get_data.py --from DIR [--dest DIR]  # copy from a local folder

The default destination is ``$MINBERT_DATA`` if set, else ``./data``; the default URL base is
``$MINBERT_DATA_URL`` if set, else the upstream project's data folder. Files already present with
the same size are skipped (``--force`` re-fetches). Downloads go to a temporary file that is
renamed into place, so an interrupted run never leaves a half-written file. Afterwards every
file's header is checked and a summary table is printed, followed by the ``export
MINBERT_DATA=...`` line to use. A missing test file is only a warning; a missing train or dev file
is an error (exit code 1).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from common.errors import MinbertError
from tasks import download as dl
from tasks.registry import get_tasks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download (or copy with --from) the CS224N minBERT default-project "
                    "data: SST-5, Quora Question Pairs, STS-B and CFIMDB.")
    parser.add_argument("--dest", type=Path, default=None,
                        help="destination folder (default: $MINBERT_DATA, else ./data)")
    parser.add_argument("--from", dest="src", type=Path, default=None, metavar="DIR",
                        help="copy the files from this local folder instead of downloading")
    parser.add_argument("--url-base", default=dl.url_base(),
                        help=f"base URL of the raw data folder (default: ${dl.URL_ENV}, else "
                             f"{dl.DEFAULT_URL_BASE})")
    parser.add_argument("--tasks", nargs="+", default=list(dl.DEFAULT_TASKS), metavar="TASK",
                        help="cs224n-format tasks (conf/task/<name>.yaml) whose files to fetch "
                             f"(default: {' '.join(dl.DEFAULT_TASKS)})")
    parser.add_argument("--force", action="store_true",
                        help="re-fetch files even if already present with the same size")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="network timeout in seconds (default: 60)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="disable the download progress bars")
    args = parser.parse_args(argv)
    args.dest = args.dest if args.dest is not None else dl.default_dest()
    args.tasks = list(dict.fromkeys(args.tasks))
    return args


def load_tasks(names: list[str]):
    """The chosen tasks; each must read cs224n-format files (only those can be fetched)."""
    tasks = get_tasks(names)
    others = [f"{t.name} ({t.format}, {t.file})" for t in tasks if t.format != "cs224n"]
    if others:
        raise dl.FetchError(f"task(s) {', '.join(others)} are not in the cs224n format",
                            "get_data.py fetches only the CS224N files (e.g. --tasks sst para)")
    return tasks


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = dl.fetch(load_tasks(args.tasks), args.dest, src=args.src, base=args.url_base,
                           force=args.force, progress=args.progress, timeout=args.timeout,
                           warn=warn)
    except (dl.FetchError, MinbertError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; partial downloads were discarded, re-run to resume",
              file=sys.stderr)
        return 130
    print(dl.format_summary(summary))
    bad = dl.bad_files(summary)
    if bad:
        print(f"error: {len(bad)} file(s) failed the column check: {', '.join(bad)}; "
              "re-fetch them with --force or fix the source", file=sys.stderr)
        return 1
    print(f"\nexport MINBERT_DATA={shlex.quote(str(args.dest.resolve()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
