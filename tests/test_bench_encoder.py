"""Smoke test for scripts/bench_encoder.py: one round of one batch times minBERT against
transformers and, beside them, the matrix-multiply peaks and minBERT's fp32 and bf16 training
steps as shares of those peaks. It checks that the benchmark runs and that its arithmetic (FLOPs
per step, shares) is the documented one, not how fast anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_encoder.py"


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # main() sets torch's thread count for the whole process
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _module():
    spec = importlib.util.spec_from_file_location("bench_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_flops_count_linear_layers_and_attention():
    import torch
    from minbert.model import BertModel

    model = BertModel.from_config(seed=0, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}]
    linear = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # per layer: q, k, v, out and the FFN
    want = 6 * linear * 5 + 12 * 2 * 2 * 4 ** 2 * 64  # 5 real tokens; B=2, T=4 for attention
    assert _module().step_flops(model, batches) == want


@pytest.mark.slow  # loads MiniLM twice and times a few steps
def test_quick_run_prints_the_ratio_and_the_limits(capsys):
    _module().main(["--rounds", "1", "--steps", "1", "--batch-size", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert re.search(r"matrix-multiply peak: fp32 \d+ GFLOP/s, bf16 \d+ GFLOP/s", out)
    for precision in ("fp32", "bf16"):
        assert re.search(rf"minBERT train step {precision}: [\d.]+ ex/s, \d+ GFLOP/s = \d+% of "
                         rf"the {precision} peak", out)
    assert "targets: bf16 step >= 40% of the bf16 peak" in out and "ratio ours/HF train" in out
