"""Smoke test for scripts/bench_checkpoint.py on the tiny model and synthetic data: it times real
training steps and real checkpoints side by side and prints the table and the target's verdict.
It checks that the benchmark runs and that its arithmetic is the documented one, not how fast
anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_checkpoint.py"


def test_bench_checkpoint_runs_and_prints_the_share(synthetic_root, capsys):
    spec = importlib.util.spec_from_file_location("bench_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", "tiny", "--methods", "none", "lora", "--rounds", "1",
                        "--steps", "2", "--interval", "10", "--data-root",
                        str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (none|lora) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|", out,
                      re.M)
    assert [r[0] for r in rows] == ["none", "lora"]
    for _, step, save, mib, share in rows:
        want = float(save) / (10 * float(step) + float(save))
        assert abs(float(share) / 100 - want) < 0.01 and float(mib) > 0
    assert re.search(r"target \(CPU with(out)? native bf16 \(.*\), fp32 steps\): checkpointing "
                     r"at most 3% of training time", out)
