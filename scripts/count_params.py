"""Print the report's "Parameters updated" for a grid of PEFT settings, without training.

    python scripts/count_params.py                                  # LoRA ranks x targets, MiniLM
    python scripts/count_params.py --peft dora --ranks 8 64 --targets attn_qv all_linear
    python scripts/count_params.py --model bert-base                # needs its checkpoint cached

Each row builds the model exactly as `train.py` would (encoder, PEFT method, the three task heads)
and prints `params/trainable`, `params/total` and `params/updated_pct` as `metrics.json` has them
(heads included), and beside them the encoder's share alone (adapters over base + adapters).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from minbert.peft import param_counts
from tasks import get_tasks
from trainers.run import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def count(model: str, peft: str, rank: int, targets: str, extra: list[str]) -> dict:
    overrides = [f"model={model}", f"peft={peft}", f"peft.rank={rank}", f"peft.targets={targets}",
                 *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model = build_model(cfg, get_tasks(list(cfg.order.tasks)))
    encoder = param_counts(model.encoder)
    return {**param_counts(model), "encoder_pct": encoder["params/updated_pct"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 16, 64, 128])
    parser.add_argument("--targets", nargs="+", default=["attn_qkv", "all_linear"])
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. peft.bias=all")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"| {args.peft} on {args.model} | rank | trainable | total | updated % | encoder % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for targets, rank in itertools.product(args.targets, args.ranks):
        c = count(args.model, args.peft, rank, targets, args.overrides)
        print(f"| {targets} | {rank} | {c['params/trainable']:,} | {c['params/total']:,} | "
              f"{c['params/updated_pct']:.3f} | {c['encoder_pct']:.3f} |")


if __name__ == "__main__":
    main()
