"""What checkpointing costs: seconds per checkpoint against seconds per training step, measured
side by side in one process (rounds of timed steps, each followed by a timed checkpoint), and the
share of training time that checkpointing every `checkpoint.every_n_steps` steps costs.

    python scripts/bench_checkpoint.py                         # MiniLM, full fine-tuning and LoRA
    python scripts/bench_checkpoint.py --methods none --interval 200 --rounds 5
    python scripts/bench_checkpoint.py --quick                 # one round of 4 steps a method

The training steps are the real loop's (`trainers.engine.loop.train_step` on the real data, batch 32), the
checkpoints the real ones (`trainers.engine.state.save_checkpoint`: the whole TrainState, written to a
temporary file, fsynced, renamed in). Needs the CS224N data (`$MINBERT_DATA` or --data-root).
Target: at most 3 % at the default interval for full fine-tuning on MiniLM, for fp32 steps (the
default precision) on any CPU; a faster step (bf16 on a CPU with native bf16, a GPU) makes the
share larger, so the printed target names the machine class it was measured on. About 2 minutes
at the defaults on 2 CPU cores, 1 with --quick.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from reports.bench import ready_to_train
from trainers.engine.loop import train_step
from trainers.engine.precision import machine_class
from trainers.engine.state import checkpoint_files, save_checkpoint

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGET = 0.03


def measure(method: str, model: str, rounds: int, steps: int, data_root: str | None) -> dict:
    overrides = [f"model={model}", f"peft={method}", "logger=none", "progress=false",
                 "data.limit_train=2000", "data.limit_eval=32"]
    overrides += [f"data.root={data_root}"] if data_root else []
    with ready_to_train(CONF, overrides) as (trainer, ctx, state, tasks):
        step_times, save_times = [], []
        for _ in range(rounds):
            for _ in range(steps):
                start = time.perf_counter()
                train_step(ctx, state, trainer.next_step(ctx, state, tasks), trainer, 10 ** 6)
                step_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            save_checkpoint(state, ctx.model, ctx.generator, ctx.run_dir, keep=2)
            save_times.append(time.perf_counter() - start)
        size = checkpoint_files(ctx.run_dir)[-1].stat().st_size
    return {"step": statistics.median(step_times[1:]), "save": statistics.median(save_times),
            "mib": size / 2 ** 20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", nargs="+", default=["none", "lora"])
    parser.add_argument("--rounds", type=int, default=3, help="checkpoints timed per method")
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per round")
    parser.add_argument("--interval", type=int, default=200,
                        help="checkpoint.every_n_steps to cost (the default: 200)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--quick", action="store_true", help="one round of 4 steps a method")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 4
    print(f"| peft ({args.model}) | ms / step | ms / checkpoint | checkpoint MiB | "
          f"share at every {args.interval} steps | interval for {TARGET:.0%} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for method in args.methods:
        m = measure(method, args.model, args.rounds, args.steps, args.data_root)
        share = m["save"] / (args.interval * m["step"] + m["save"])
        needed = m["save"] * (1 - TARGET) / (TARGET * m["step"])
        worst = max(worst, share)
        print(f"| {method} | {1e3 * m['step']:.2f} | {1e3 * m['save']:.2f} | {m['mib']:.1f} | "
              f"{share:.2%} | {needed:.0f} |")
    print(f"target ({machine_class()}, fp32 steps): checkpointing at most {TARGET:.0%} of "
          f"training time: "
          f"{'met' if worst <= TARGET else 'NOT met'} (worst {worst:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
