"""Tests for scripts/bench_encoder.py: its arithmetic (FLOPs per step, the GEMM shapes behind the
shape-matched peak) is the documented one, and a --quick run of one tiny round prints the ratio,
the peaks and the targets with their machine class; where bf16 is not native (`bench_support`
patched to say so, as on an AVX2-only CPU) bf16 is reported as not timed, and no bf16 step runs.
They check what the benchmark prints and times, not how fast anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from minbert.model import BertModel
from trainers.engine.precision import Bf16Support

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_encoder.py"
TINY = ["--quick", "--rounds", "1", "--steps", "1", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():  # main() sets torch's thread count for the whole process
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _module():
    spec = importlib.util.spec_from_file_location("bench_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model_and_batches():
    model = BertModel.from_config(seed=0, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=256)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return model, [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}]


def test_step_flops_count_linear_layers_and_attention():
    model, batches = _tiny_model_and_batches()
    linear = 2 * (4 * 64 * 64 + 2 * 64 * 256)  # per layer: q, k, v, out and the FFN
    want = 6 * linear * 5 + 12 * 2 * 2 * 4 ** 2 * 64  # 5 real tokens; B=2, T=4 for attention
    assert _module().step_flops(model, batches) == want


def test_gemm_step_runs_every_linear_layer_at_the_real_token_count():
    model, batches = _tiny_model_and_batches()
    batches = batches + [{"input_ids": torch.zeros(1, 3, dtype=torch.long),
                          "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    gemms = _module().GemmStep(model, batches)
    assert len(gemms.linears) == 2 * 6 and set(gemms.acts) == {5, 3}  # N real tokens per batch
    shapes = []
    real_linear = torch.nn.functional.linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear",
                   lambda x, w, b: shapes.append((tuple(x.shape), tuple(w.shape)))
                   or real_linear(x, w, b))
        gemms(batches[1])
    per_layer = [((3, 64), (64, 64))] * 4 + [((3, 64), (256, 64)), ((3, 256), (64, 256))]
    assert shapes == per_layer * 2  # query, key, value, out, up, down of both layers
    # forward and both backward GEMMs: step_flops without attention
    attention = 12 * 2 * (2 * 4 ** 2 + 1 * 3 ** 2) * 64
    assert gemms.flops(batches) == _module().step_flops(model, batches) - attention


def test_quick_sets_fewer_rounds_and_steps_unless_given():
    bench = _module()
    assert (bench.parse_args([]).rounds, bench.parse_args([]).steps) == (5, 8)
    quick = bench.parse_args(["--quick"])
    assert (quick.rounds, quick.steps) == (bench.QUICK["rounds"], bench.QUICK["steps"])
    assert bench.parse_args(["--quick", "--rounds", "1"]).rounds == 1


def _run(monkeypatch, capsys, native: bool) -> tuple[str, list[list[str]]]:
    bench = _module()
    support = Bf16Support(native, "the test says so", 1.0 if native else 40.0)
    monkeypatch.setattr(bench, "bench_support", lambda device: support)
    timed = []
    real_bench = bench.bench
    monkeypatch.setattr(bench, "bench", lambda models, *a: timed.append(list(models))
                        or real_bench(models, *a))
    bench.main(TINY)
    out = capsys.readouterr().out
    assert re.search(r"fp32 matrix-multiply peak: \d+ GFLOP/s square \(n=1024\), \d+ GFLOP/s at "
                     r"the batches' GEMM shapes", out)
    assert re.search(r"minBERT train step fp32: [\d.]+ ex/s, \d+ GFLOP/s = \d+% of the fp32 "
                     r"square peak, \d+% of the shape-matched peak", out)
    assert re.search(r"targets \(any CPU, fp32\): fp32 step >= 60% of the shape-matched peak: "
                     r"\d+% (PASS|FAIL); ours/HF train >= 1.8x: [\d.]+x (PASS|FAIL)", out)
    assert "ratio ours/HF train" in out and timed[:2] == [["minBERT", "HF BertModel"]] * 2
    return out, timed[2:]


@pytest.mark.slow  # loads MiniLM three times and times a few steps
def test_quick_run_with_native_bf16_times_the_bf16_step(monkeypatch, capsys):
    out, limits = _run(monkeypatch, capsys, native=True)
    assert limits == [["fp32", "fp32 GEMMs", "bf16"]]
    assert re.search(r"bf16: native here \(the test says so\); peak \d+ GFLOP/s \(n=1024\)", out)
    assert re.search(r"minBERT train step bf16: [\d.]+ ex/s, \d+ GFLOP/s = \d+% of the bf16 square", out)
    assert re.search(r"targets \(CPU with native bf16\): bf16 step >= 40% of the bf16 peak: \d+% "
                     r"(PASS|FAIL); bf16 >= 1.8x fp32: [\d.]+x (PASS|FAIL)", out)


@pytest.mark.slow
def test_quick_run_without_native_bf16_reports_it_not_timed(monkeypatch, capsys):
    out, limits = _run(monkeypatch, capsys, native=False)
    assert limits == [["fp32", "fp32 GEMMs"]]  # no bf16 step at all
    assert re.search(r"bf16: not native here \(the test says so\), [\d.]+ GFLOP/s at n=512, "
                     r"step not timed", out)
    assert "train step bf16" not in out and "bf16 / fp32" not in out
    assert "targets (CPU with native bf16): not applicable here, bf16 is not native" in out
