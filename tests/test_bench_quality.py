"""Smoke test for scripts/bench_quality.py: on a few synthetic examples a task, the plain
transformers pipeline and ours (the fast recipe) both run an epoch, scoring dev inside it, and the
script prints their dev scores, the time-to-reach ratio and writes the plot; a bf16 that is not
native here is shrunk to --quick's size, saying so. It checks that the benchmark runs and reports
what it should, not how fast or how good anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from trainers.engine import precision as precision_module
from trainers.engine.precision import Bf16Support

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two pipelines on MiniLM, a few seconds of training each
def test_quick_run_prints_both_curves_and_plots(synthetic_root, tmp_path, capsys):
    out_png = tmp_path / "quality.png"
    assert _module().main(["--quick", "--limit-train", "64", "--limit-eval", "16",
                           "--evals-per-epoch", "2", "--data-root", str(synthetic_root),
                           "--out", str(out_png), "--precision", "auto"]) == 0
    out = capsys.readouterr().out
    assert "precision=auto -> " in out and "dev scored every 3 of 6 steps an epoch" in out
    rows = re.findall(r"^\| (plain|ours) \| 1 \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \|", out, re.M)
    # each pipeline scores at step 3 (inside the epoch) and at its end, step 6
    assert [(r[0], r[1]) for r in rows] == [("plain", "3"), ("plain", "6"), ("ours", "3"),
                                            ("ours", "6")]
    for _, _, sst, para, sts, overall, minutes in rows:  # the CS224N overall of the row's scores
        want = (float(sst) + float(para) + (float(sts) + 1) / 2) / 3
        assert abs(float(overall) - want) < 2e-3
    times = [float(r[6]) for r in rows]
    assert times[0] <= times[1] and times[2] <= times[3]  # training time only grows
    assert "final dev overall: ours" in out and "target (" in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bf16_that_is_not_native_is_shrunk_to_quick_size(monkeypatch, capsys):
    module = _module()
    slow = Bf16Support(False, "this CPU has no native bf16 (AVX2); test", 40.0)
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: slow)
    args = module.parse_args(["--precision", "bf16", "--limit-train", "5000"])
    module.choose_precision(args)
    assert "bf16: not native here (this CPU has no native bf16 (AVX2); test)" in \
        capsys.readouterr().out
    assert (args.limit_train, args.limit_eval, args.scale) == (200, 200, "quick")
    args = module.parse_args(["--precision", "auto"])
    module.choose_precision(args)
    assert args.precision == "fp32" and args.limit_train == 2000  # auto: fp32, full size


def test_full_refuses_limits():
    with pytest.raises(SystemExit):
        _module().parse_args(["--full", "--limit-train", "10"])
