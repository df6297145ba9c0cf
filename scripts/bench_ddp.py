#!/usr/bin/env python
"""Data-parallel scaling: training examples per second of one run trained by 1 process and by N
(`torchrun`, gloo on the CPU, NCCL on GPUs), each process with `--threads` threads, and the ratio.

    python scripts/bench_ddp.py                 # 1 vs 2 processes, one thread each, MiniLM: ~3 min
    python scripts/bench_ddp.py --quick         # one round of 8 steps: ~70 s
    python scripts/bench_ddp.py --procs 1 2 4 --peft lora --batch-size 32

Each measurement is a fresh `torchrun --nproc_per_node=N` of this script's worker, which builds
the run exactly as `train.py` does (`trainers.engine.run.setup`: the same DDP wrapper, row shares
of the global batch and gradient all-reduce) and times `--steps` optimizer steps of the engine's
own `train_step` after `--warmup` untimed ones, between two barriers. The global batch is
`--batch-size` whatever N, so every configuration trains the same examples per step. The process
counts take turns round by round (the order flips every round), so a noisy neighbour slows all
alike; the ratio is the median over rounds of each round's N-process rate over its 1-process
rate. A reference row gives one process with N x `--threads` threads, the other way to spend the
same cores.

On this project's 2-core CPU: 1 vs 2 processes with one thread each (the issue's target: the
ratio printed, and the machine class it applies to). Needs the CS224N data ($MINBERT_DATA or
--data-root).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
CONF = SCRIPT.parents[1] / "conf"


# ---- the worker: one rank of one measurement -----------------------------------------------------
def worker(args, overrides: list[str]) -> None:
    """Builds the run as train.py does, times `args.steps` training steps (after `args.warmup`)
    and, on rank 0, writes {examples, seconds, world} to `args.out`."""
    import torch

    from reports.bench import ready_to_train
    from trainers.engine.loop import train_step

    torch.set_num_threads(args.threads)
    with ready_to_train(CONF, overrides) as (trainer, ctx, state, tasks):
        total = trainer.steps_per_epoch(ctx, tasks)
        examples, t0 = 0, None
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                ctx.parallel.barrier()
                t0 = time.perf_counter()
            step = trainer.next_step(ctx, state, tasks)
            if step is None:
                raise SystemExit(f"the epoch ended after {i} steps: raise --limit-train")
            train_step(ctx, state, step, trainer, total)
            examples += sum(len(batch) for _, batch in step) if i >= args.warmup else 0
        ctx.parallel.barrier()
        seconds = time.perf_counter() - t0
    if ctx.parallel.main:
        Path(args.out).write_text(json.dumps({"examples": examples, "seconds": seconds,
                                              "world": ctx.parallel.world}))


# ---- the driver ----------------------------------------------------------------------------------
def overrides_for(args, peft: str) -> list[str]:
    out = [f"model={args.model}", f"peft={peft}", "trainer=interleaved", "logger=none",
           "progress=false", f"precision={args.precision}", f"device={args.device}",
           f"data.batch_size={args.batch_size}", f"data.limit_train={args.limit_train}",
           "data.limit_eval=16", f"seed={args.seed}"]
    return out + ([f"data.root={args.data_root}"] if args.data_root else [])


def measure(args, peft: str, procs: int, threads: int) -> float:
    """Training examples per second of one fresh launch with `procs` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", str(SCRIPT), "--worker", "--out", str(out),
               "--threads", str(threads), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--", *overrides_for(args, peft)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"{procs} process(es), peft={peft} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    if result["world"] != procs:
        raise SystemExit(f"asked for {procs} processes, the run had {result['world']}")
    return result["examples"] / result["seconds"]


def bench(args, peft: str) -> dict[str, list[float]]:
    """{label: [examples per second per round]}: the process counts (and the threaded reference)
    in turns, the order flipped every round."""
    configs = [(f"{n} x {args.threads} thread(s)", n, args.threads) for n in args.procs]
    wide = max(args.procs) * args.threads
    if args.threads != wide:
        configs.append((f"1 x {wide} threads (reference)", 1, wide))
    rates: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    for r in range(args.rounds):
        for label, procs, threads in (configs if r % 2 == 0 else configs[::-1]):
            rates[label].append(measure(args, peft, procs, threads))
            print(f"  peft={peft} round {r + 1}: {label}: {rates[label][-1]:.1f} examples/s",
                  flush=True)
    return rates


def report(args, results: dict[str, dict[str, list[float]]]) -> None:
    from trainers.engine.precision import machine_class

    base = f"1 x {args.threads} thread(s)"
    print(f"\n| peft | processes x threads | examples / s (median) | over 1 process |")
    print("| --- | --- | ---: | ---: |")
    for peft, rates in results.items():
        for label, values in rates.items():
            ratio = statistics.median(a / b for a, b in zip(values, rates[base]))
            print(f"| {peft} | {label} | {statistics.median(values):.1f} | {ratio:.2f}x |")
    n = max(args.procs)
    print(f"machine: {machine_class(args.device if args.device != 'auto' else 'cpu')}, "
          f"{os.cpu_count()} cores; global batch {args.batch_size}, {args.model}, "
          f"precision={args.precision}; ideal scaling to {n} processes: {n:.2f}x")


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--peft", nargs="+", default=["none", "lora"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=512, help="examples a task")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=11711)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--quick", action="store_true", help="one round of 8 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 8, 2
    if 1 not in args.procs:
        parser.error("--procs must include 1: every ratio is over one process")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args, args.overrides)
        return 0
    results = {peft: bench(args, peft) for peft in args.peft}
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
