"""Merge a finished run's saved experts again, with another method or other weights, and score the
merged model on dev, without training.

    python scripts/merge.py outputs/runs/<date>/<time>                        # the run's own merge
    python scripts/merge.py <run> --method ties                               # density 0.2
    python scripts/merge.py <run> --method ties --density 0.5
    python scripts/merge.py <run> --method task_arithmetic --weights 1 1 1 --scale 0.4
    python scripts/merge.py <run> --method dare --density 0.3 --seed 1

The run must come from `trainer=eoe`, `fedavg` or `orthoada` (its `experts/<task>.safetensors`).
`trainers.engine.record.load_run` rebuilds it (its config, the tasks it trained, its initial adapters); each
expert's update is formed exactly per layer (ΔW_i = s_i B_i A_i) and merged in weight space
(`minbert.peft.merging`), and each task keeps its own head. Options not given are the run's own
(its `trainer.finisher.merge`, `trainer.finisher.weights`, ...) or, for another method, the published defaults
(`minbert.peft.merging.DEFAULTS`: TIES keeps 20 %, DARE 10 %). The scores are printed and written
to `<run>/merges/<method>.json`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.durable import write_json
from common.errors import MinbertError
from minbert.peft import check_mergeable
from minbert.peft.merging import check_merge_options, default_options
from tasks.data import load_task_data, resolve_root
from trainers.strategies.experts import (MergeExperts, encoder_state, merge_experts, merged_weights,
                              read_experts)
from trainers.engine.build import build, encode_data
from trainers.engine.context import RunContext
from trainers.engine.evaluate import evaluate
from trainers.engine.record import load_run


def merge_settings(trainer, n: int, method: str | None, weights: list[float] | None,
                   options: dict) -> tuple[str, list[float], dict]:
    """The merge to run: what was given, else the run's own merge, else linear with 1/n."""
    finisher = trainer.finisher
    own = isinstance(finisher, MergeExperts)
    method = method or (finisher.merge if own else "linear")
    if weights is None:
        weights = finisher.weights_for(n) if own else [1.0 / n] * n
    if own and method == finisher.merge:
        options = {**finisher.options, **options}
    options = {**default_options(method, options), **options}
    check_merge_options(method, options)
    return method, weights, options


def remerge(run_dir: Path, method: str | None, weights: list[float] | None, options: dict,
            data_root: str | None = None) -> dict[str, float]:
    saved = load_run(run_dir)
    check_mergeable(saved.method, f"merge.py --method {method or 'linear'}")
    names = [t.name for t in saved.tasks]
    experts = read_experts(run_dir, names)
    method, weights, options = merge_settings(build(saved.cfg.trainer, "trainer"), len(names),
                                              method, weights, options)
    init = encoder_state(saved.model)
    merged = merge_experts(saved.model, init, [experts[t] for t in names], method, weights,
                           options)
    heads = {n: t for e in experts.values() for n, t in e.items() if n.startswith("heads.")}
    raw = load_task_data(saved.tasks, resolve_root(data_root or saved.cfg.data.root), None,
                         saved.cfg.data.limit_eval, saved.cfg.data.get("cache_dir"))
    data = encode_data(saved.cfg, saved.model, {t: {"dev": s["dev"]} for t, s in raw.items()})
    ctx = RunContext.for_scoring(saved.model, saved.tasks, data, run_dir, saved.method,
                                 eval_batch_size=saved.cfg.data.eval_batch_size)
    metrics, _ = evaluate(ctx, "dev", weights=merged_weights(saved.model, merged, heads))
    write_json(run_dir / "merges" / f"{method}.json",
               {"method": method, "weights": weights, **options, **metrics})
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default=None,
                        help="linear | task_arithmetic | ties | dare | dare_ties "
                             "(default: the run's own trainer.finisher.merge)")
    parser.add_argument("--weights", type=float, nargs="+", help="one per task, in the run's order")
    parser.add_argument("--density", type=float, help="ties, dare: the fraction of entries kept")
    parser.add_argument("--scale", type=float, help="task_arithmetic: the scale of the sum")
    parser.add_argument("--seed", type=int, help="dare: the seed of the drop mask")
    parser.add_argument("--data-root", help="the CS224N data (default: the run's, $MINBERT_DATA)")
    args = parser.parse_args(argv)
    options = {k: v for k in ("density", "scale", "seed") if (v := getattr(args, k)) is not None}
    try:
        metrics = remerge(args.run_dir, args.method, args.weights, options, args.data_root)
    except MinbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
