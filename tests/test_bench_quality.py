"""Smoke test for scripts/bench_quality.py: on a few synthetic examples a task, the plain
transformers pipeline and ours (the fast recipe) both run an epoch, and the script prints their
dev scores, the time-to-reach ratio and writes the plot. It checks that the benchmark runs and
reports what it should, not how fast or how good anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"


@pytest.mark.slow  # two pipelines on MiniLM, a few seconds of training each
def test_quick_run_prints_both_pipelines_and_plots(synthetic_root, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_png = tmp_path / "quality.png"
    assert module.main(["--limit-train", "16", "--limit-eval", "16", "--data-root",
                        str(synthetic_root), "--out", str(out_png), "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (plain|ours) \| 1 \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \|",
                      out, re.M)
    assert [r[0] for r in rows] == ["plain", "ours"]
    for _, sst, para, sts, overall in rows:  # the CS224N overall of the row's own scores
        want = (float(sst) + float(para) + (float(sts) + 1) / 2) / 3
        assert abs(float(overall) - want) < 2e-3
    assert "final dev overall: ours" in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"
