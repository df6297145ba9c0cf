"""Smoke test for scripts/bench_peft.py: `--quick` on synthetic batches builds every configuration
(minBERT and peft twins with equal trainable-parameter counts), times them and prints the table and
the targets. It checks that the benchmark runs, not how fast anything is."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peft.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_peft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~10-15 s: builds 15 MiniLM-sized models
def test_quick_run_prints_table_and_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MINBERT_DATA", raising=False)
    bench = _load_module()
    results = bench.main(["--quick", "--no-progress", "--threads", "1", "--data-root",
                          str(tmp_path)])  # no ids-sst-train.csv there: synthetic batches
    out = capsys.readouterr().out
    assert "data=synthetic" in out
    for row in [*bench.TRAIN_METHODS, *bench.OURS_ONLY, "base encoder",
                "LoRA r=16 all_linear merged"]:
        assert row in out
    assert len(results) == len(bench.TRAIN_METHODS) + len(bench.AS_FAST_AS_LORA8) + 3
    assert out.count("[PASS]") + out.count("[FAIL]") == len(results)
