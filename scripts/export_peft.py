"""Export a finished run's LoRA, LoRA-FA or DoRA adapter in peft's format.

    python scripts/export_peft.py outputs/runs/2026-11-22/10-00-00 exported/
    # then, with transformers and peft:
    #   base = transformers.BertModel.from_pretrained(<base checkpoint folder>)
    #   model = peft.PeftModel.from_pretrained(base, "exported/")

The run is rebuilt by `trainers.engine.record.load_run` (its saved config, the tasks it trained and the
weights its strategy saved), and the encoder's adapter is written as `adapter_config.json` +
`adapter_model.safetensors`. The task heads, which peft's format has no place for, go beside them
as `minbert_heads.safetensors`. A run with one expert per task (`trainer=eoe`) is written as one
adapter per task, in `<out dir>/<task>/`; a merged run (`fedavg`, `orthoada`) holds a full-rank
ΔW per layer, which peft's LoRA format cannot hold.

The out dir must be new or empty: one that holds files (an earlier export, say) is refused, and
left as it is, unless `--force` is given (then the export's files are written over, each
atomically; other files stay). Every file is written atomically (`common.durable`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minbert.checkpoint import resolve_checkpoint
from common.durable import storage_error
from common.errors import MinbertError, StorageError
from minbert.peft.io import export_peft, save_state
from trainers.engine.evaluate import shared_weights
from trainers.engine.record import SavedRun, load_run


def _export(saved: SavedRun, out_dir: Path, heads: list[str]) -> Path:
    name = saved.cfg.model.encoder.get("name_or_path")
    base = str(resolve_checkpoint(name)) if name and name.startswith("package:") else name
    export_peft(saved.model.encoder, saved.method, out_dir, base_model=base)
    state = {n: p.detach().contiguous() for n, p in saved.model.heads.state_dict().items()
             if n.split(".")[0] in heads}
    save_state(state, out_dir / "minbert_heads.safetensors")
    return out_dir


def check_out_dir(out_dir: Path, force: bool = False) -> None:
    """Refuses an out dir that is a file, or (without `force`) one that already holds files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise StorageError(f"cannot export into {out_dir}: it is a file, not a folder; pick "
                           "another folder")
    try:
        held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    except OSError as e:
        raise storage_error(out_dir, e, "export into") from e
    if held and not force:
        exported = any((out_dir / name / "adapter_config.json").is_file() for name in ("", *held))
        what = "an export" if exported else f"{len(held)} file(s) or folder(s)"
        raise StorageError(f"{out_dir} already holds {what} ({', '.join(held[:4])}"
                           f"{', ...' if len(held) > 4 else ''}); pass --force to write over it, "
                           "or pick another folder")


def export_run(run_dir: Path, out_dir: Path, force: bool = False) -> list[Path]:
    """Writes the run's adapter (or one per task, for per-task experts); returns the folders.
    `out_dir` must be new or empty, unless `force`."""
    check_out_dir(out_dir, force)
    saved = load_run(run_dir)
    names = [t.name for t in saved.tasks]
    if saved.weights is shared_weights:
        return [_export(saved, out_dir, names)]
    written = []
    for task in names:
        with saved.weights(task):
            written.append(_export(saved, out_dir / task, [task]))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder written by train.py")
    parser.add_argument("out_dir", type=Path,
                        help="where to write the peft adapter: a new or empty folder")
    parser.add_argument("--force", action="store_true",
                        help="write into a folder that already holds files (an earlier export's "
                             "are written over)")
    args = parser.parse_args(argv)
    try:
        folders = export_run(args.run_dir, args.out_dir, args.force)
    except MinbertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for out in folders:
        print(f"wrote {out / 'adapter_config.json'}, {out / 'adapter_model.safetensors'} and "
              f"{out / 'minbert_heads.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
