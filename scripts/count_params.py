"""Print the report's "Parameters updated" for a grid of PEFT settings, without training.

    python scripts/count_params.py                                  # LoRA ranks x targets, MiniLM
    python scripts/count_params.py --peft dora --ranks 8 64 --targets attn_qv all_linear
    python scripts/count_params.py --model bert-base                # needs its checkpoint cached
    python scripts/count_params.py --model bert-base --meta --tasks sst   # shapes only, offline
    python scripts/count_params.py --peft ia3 --meta          # a method without rank or targets

Each row builds the model exactly as `train.py` would (encoder, PEFT method, the task heads) and
prints `params/trainable`, `params/total` and `params/updated_pct` as `metrics.json` has them
(heads included), and beside them the encoder's share alone (adapters over base + adapters).
`--meta` builds bert-base's shapes (BertConfig's defaults) on the meta device: no checkpoint, no
memory. `--tasks sst` counts one task's head, as a single-task run (the report's Table 2) does.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from common.errors import MinbertError
from minbert.model import BertConfig, BertModel
from minbert.peft import param_counts
from tasks.registry import get_tasks
from trainers.engine.build import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def count(model: str, peft: str, rank: int | None, targets: str | None, extra: list[str],
          tasks: list[str] | None = None, meta: bool = False) -> dict:
    overrides = [f"model={model}", f"peft={peft}", *extra]
    overrides += [f"peft.rank={rank}"] if rank is not None else []
    overrides += [f"peft.targets={targets}"] if targets is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    chosen = get_tasks(tasks or list(cfg.tasks))
    if meta:  # bert-base's shapes (BertConfig's defaults), no storage
        with torch.device("meta"):
            model = build_model(cfg, chosen, encoder=BertModel(BertConfig()))
    else:
        model = build_model(cfg, chosen)
    encoder = param_counts(model.encoder)
    return {**param_counts(model), "encoder_pct": encoder["params/updated_pct"]}


def method_grid(peft: str, ranks, targets) -> list[tuple]:
    """(targets, rank) rows: the given values, the defaults for a method that has those options,
    and a clear error for options the method does not have."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        options = compose(config_name="config", overrides=[f"peft={peft}"]).peft
    for key, given in (("rank", ranks), ("targets", targets)):
        if given is not None and key not in options:
            raise MinbertError(f"--{key if key == 'targets' else 'ranks'}: peft={peft} has no "
                               f"`{key}` option")
    ranks = ranks or ([2, 4, 16, 64, 128] if "rank" in options else [None])
    preset = "targets" in options and isinstance(options.targets, str)
    targets = targets or (["attn_qkv", "all_linear"] if preset else [None])
    return list(itertools.product(targets, ranks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="default 2 4 16 64 128, for methods with a rank")
    parser.add_argument("--targets", nargs="+", default=None,
                        help="default attn_qkv all_linear, for methods with targets presets")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="the heads to count (default: the config's `tasks`)")
    parser.add_argument("--meta", action="store_true",
                        help="bert-base shapes on the meta device, without its checkpoint")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. peft.bias=all")
    args = parser.parse_args(argv)
    grid = method_grid(args.peft, args.ranks, args.targets)
    name = "bert-base shapes" if args.meta else args.model
    print(f"| {args.peft} on {name} | rank | trainable | total | updated % | encoder % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for targets, rank in grid:
        with torch.no_grad():
            c = count(args.model, args.peft, rank, targets, args.overrides, args.tasks, args.meta)
        print(f"| {targets or '—'} | {rank or '—'} | {c['params/trainable']:,} | {c['params/total']:,} | "
              f"{c['params/updated_pct']:.3f} | {c['encoder_pct']:.3f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MinbertError as e:  # a missing checkpoint, a bad option: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
