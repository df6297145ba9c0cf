"""Export a finished run's LoRA, LoRA-FA or DoRA adapter in peft's format.

    python scripts/export_peft.py outputs/runs/2026-11-22/10-00-00 exported/
    # then, with transformers and peft:
    #   base = transformers.BertModel.from_pretrained(<base checkpoint folder>)
    #   model = peft.PeftModel.from_pretrained(base, "exported/")

The run's composed config (`.hydra/config.yaml`) rebuilds the model, its `adapter.safetensors`
(the best epoch's state) is loaded into it, and the encoder's adapter is written as
`adapter_config.json` + `adapter_model.safetensors`. The task heads, which peft's format has no
place for, go beside them as `minbert_heads.safetensors`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from minbert.checkpoint import resolve_checkpoint
from minbert.errors import MinbertError
from minbert.peft.io import export_peft, load_adapter
from tasks import get_tasks
from trainers.loop import ADAPTER_FILE
from trainers.run import build_method, build_model, load_run_config


def export_run(run_dir: Path, out_dir: Path) -> Path:
    cfg = load_run_config(run_dir)
    method = build_method(cfg)
    model = build_model(cfg, get_tasks(list(cfg.order.tasks)), method)
    load_adapter(model, run_dir / ADAPTER_FILE)
    name = cfg.model.encoder.get("name_or_path")
    base = str(resolve_checkpoint(name)) if name and name.startswith("package:") else name
    export_peft(model.encoder, method, out_dir, base_model=base)
    heads = {n: p.detach().contiguous() for n, p in model.heads.state_dict().items()}
    save_file(heads, str(out_dir / "minbert_heads.safetensors"))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    parser.add_argument("out_dir", type=Path, help="where to write the peft adapter")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out_dir)
    except MinbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'adapter_config.json'}, {out / 'adapter_model.safetensors'} and "
          f"{out / 'minbert_heads.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
