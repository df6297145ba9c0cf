"""Smoke test for scripts/bench_memory.py: `--model tiny --steps 3 --quick` on synthetic batches
builds every method's model and optimizer, trains them round-robin, prints the memory table, and its
checks (GaLore's optimizer state against theory, the 8-bit moment cut) pass; `--only KEY --json`,
which the full run starts once per method in a subprocess to measure the peak, prints its accounting."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
TINY = ["--model", "tiny", "--steps", "3", "--threads", "1", "--no-progress"]


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # main() sets torch's thread count for the whole process
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_prints_table_and_checks_pass(tmp_path, capsys):  # ~5 s
    bench = _load_module()
    # no ids-sst-train.csv in tmp_path: synthetic batches
    results = bench.main([*TINY, "--quick", "--data-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "data=synthetic" in out and "model=tiny" in out
    for label, _, _ in bench.METHODS.values():
        assert label in out
    assert len(results) == 5  # 3 GaLore ranks + GradNormLoRP against theory, the 8-bit moment cut
    assert out.count("[PASS]") == len(results) and "[FAIL]" not in out
    assert all(results)


def test_only_prints_one_methods_accounting_as_json(tmp_path, capsys):
    bench = _load_module()
    bench.main([*TINY, "--only", "galore8", "--json", "--peak-steps", "2", "--data-root",
                str(tmp_path)])
    acc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert acc["memory/peak_bytes"] >= 0 and acc["basis"] > 0
    assert acc["total"] == (acc["memory/param_bytes"] + acc["memory/grad_bytes"]
                            + acc["memory/optimizer_state_bytes"])
    assert acc["memory/optimizer_state_bytes"] == acc["moments"] + acc["basis"] + acc["other"]
