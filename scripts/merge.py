"""Merge a finished run's saved experts again, with another method or other weights, and score the
merged model on dev, without training.

    python scripts/merge.py outputs/runs/<date>/<time>                        # the run's own merge
    python scripts/merge.py <run> --method ties --density 0.5
    python scripts/merge.py <run> --method task_arithmetic --weights 1 1 1 --scale 0.4
    python scripts/merge.py <run> --method dare --density 0.3 --seed 1

The run must come from `trainer=eoe`, `fedavg` or `orthoada` (its `experts/<task>.safetensors`).
Its composed config (`.hydra/config.yaml`) rebuilds the model as the run did; each expert's update
is formed exactly per layer (ΔW_i = s_i B_i A_i) and merged in weight space
(`minbert.peft.merging`), each task keeps its own head. The scores are printed and written to
`<run>/merges/<method>.json`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from minbert.errors import MinbertError
from tasks import get_tasks
from tasks.data import load_task_data, resolve_root
from trainers.experts import encoder_state, merge_experts
from trainers.loop import RunContext, evaluate
from trainers.run import (build_method, build_model, encode_data, load_run_config,
                          seed_everything)


def remerge(run_dir: Path, method: str, weights: list[float] | None, options: dict,
            data_root: str | None = None) -> dict[str, float]:
    cfg = load_run_config(run_dir)
    tasks = get_tasks(list(cfg.order.tasks))
    files = [run_dir / "experts" / f"{t.name}.safetensors" for t in tasks]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MinbertError(f"no saved experts {missing}: merge.py needs a run of trainer=eoe, "
                           "fedavg or orthoada")
    seed_everything(cfg.seed)  # the adapters' initial state, as the run drew it
    model = build_model(cfg, tasks, build_method(cfg))
    weights = weights or [1.0 / len(tasks)] * len(tasks)
    merge_experts(model, encoder_state(model), [load_file(str(f)) for f in files], method,
                  weights, options)
    raw = load_task_data(tasks, resolve_root(data_root or cfg.data.root), None,
                         cfg.data.limit_eval)
    data = encode_data(cfg, model, {t: {"dev": s["dev"]} for t, s in raw.items()})
    ctx = RunContext(model, tasks, data, run_dir, None, progress=False)
    metrics, _ = evaluate(ctx, "dev")
    out = run_dir / "merges" / f"{method}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"method": method, "weights": weights, **options, **metrics},
                              indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--method", default="linear",
                        help="linear | task_arithmetic | ties | dare | dare_ties")
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
