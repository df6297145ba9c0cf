#!/usr/bin/env python
"""What `precision=auto` buys on this machine: the same run (default `recipe=fast debug=fast`:
MiniLM, 256 examples a task, one epoch) in `precision=auto`, `fp32` and `bf16`, timed in turn in
one process, and the ratio of each to fp32's wall time.

    python scripts/bench_precision.py                   # 2 rounds, about 3 minutes on 2 CPU cores
    python scripts/bench_precision.py --quick           # 1 round of 64 examples a task: ~1 minute
    python scripts/bench_precision.py --preset recipe=fast data.limit_train=1000

`precision=auto` picks bf16 where the hardware runs it natively and fp32 elsewhere
(`trainers.engine.precision`); the first line says what it picked here and why. A bf16 that is not
native (a CPU with only AVX2: every bf16 matmul emulated, a training step ~20x slower than fp32)
is not timed at the run's size: it is measured once on 16 examples a task, and reported as such.
Targets, with the machine class they apply to: on a machine without native bf16, auto takes at
most 1.1x fp32's time (it runs fp32); on one with native bf16, auto is bf16 and faster than fp32.
Needs the CS224N data ($MINBERT_DATA or --data-root).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from trainers.engine.build import resolve_device
from trainers.engine.precision import bf16_support, machine_class
from trainers.engine.run import run

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGET_AUTO_OVER_FP32 = 1.1  # without native bf16


def timed_run(overrides: list[str]) -> tuple[float, float]:
    """(wall seconds, dev/overall) of one run of train.py's `run` in a temporary folder."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        score = run(cfg, tmp)
        return time.perf_counter() - t0, score


def measure(args, native: bool) -> dict[str, list[tuple[float, float]]]:
    """Each precision's (seconds, score) per round, the precisions taking turns."""
    common = [*args.preset, "logger=none", "progress=false", f"seed={args.seed}"]
    common += [f"data.root={args.data_root}"] if args.data_root else []
    base = [*common, f"data.limit_train={args.limit_train}", f"data.limit_eval={args.limit_train}"]
    brief = [*common, "data.limit_train=16", "data.limit_eval=16"]
    timed = ["auto", "fp32"] + (["bf16"] if native else [])
    out: dict[str, list] = {p: [] for p in timed}
    timed_run([*brief, "precision=fp32"])  # warm-up, untimed: the first run loads and caches
    for r in range(args.rounds):
        for precision in (timed if r % 2 == 0 else timed[::-1]):
            out[precision].append(timed_run([*base, f"precision={precision}"]))
            print(f"round {r + 1}: precision={precision}: {out[precision][-1][0]:.1f} s, "
                  f"dev/overall {out[precision][-1][1]:.4f}", flush=True)
    if not native:  # measured briefly: a few examples, not the run's size
        out["bf16 (16 examples a task)"] = [timed_run([*brief, "precision=bf16"])]
        out["fp32 (16 examples a task)"] = [timed_run([*brief, "precision=fp32"])]
    return out


def report(results: dict, native: bool, device: torch.device) -> list[bool]:
    fp32 = statistics.median(s for s, _ in results["fp32"])
    print(f"\n| precision | median s | x fp32 | dev overall |\n| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        sec = statistics.median(s for s, _ in runs)
        ref = fp32 if "(" not in name else statistics.median(
            s for s, _ in results["fp32 (16 examples a task)"])
        print(f"| {name} | {sec:.1f} | {sec / ref:.2f} | {runs[-1][1]:.4f} |")
    auto = statistics.median(s for s, _ in results["auto"]) / fp32
    cls = machine_class(device)
    if native:
        ok = auto < 1.0
        print(f"\ntarget ({cls}): auto runs bf16 and is faster than fp32: {auto:.2f}x "
              f"{'PASS' if ok else 'FAIL'}")
    else:
        ok = auto <= TARGET_AUTO_OVER_FP32
        print(f"\ntarget ({cls}): auto at most {TARGET_AUTO_OVER_FP32}x fp32's time: {auto:.2f}x "
              f"{'PASS' if ok else 'FAIL'}; bf16 not native here, timed on 16 examples a task only")
    return [ok]


def main(argv=None) -> list[bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="*", default=["recipe=fast", "debug=fast"],
                   help="the run's config overrides (default: recipe=fast debug=fast)")
    p.add_argument("--limit-train", type=int, default=256, help="examples a task, train and dev")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 round of 64 examples a task")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=11711)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.limit_train = 1, min(args.limit_train, 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")  # the runs' device=auto
    support = bf16_support(device)
    print(f"{machine_class(device)}; threads={torch.get_num_threads()}; precision=auto -> "
          f"{'bf16' if support.native else 'fp32'}: {support.reason}", flush=True)
    return report(measure(args, support.native), support.native, device)


if __name__ == "__main__":
    main()
