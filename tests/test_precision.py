"""Mixed precision and learning-rate schedules: a bf16 run trains and its dev scores stay within a
stated tolerance of fp32's on the same small run; fp16 needs a GPU; the schedule spans every
optimizer step of the run (across tasks for the sequential strategy, per expert for the expert
ones), follows transformers' formulas, and is saved with the training state."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config, smoke_overrides, trained_run
from minbert.errors import ConfigError
from trainers.optim import build_scheduler
from trainers.run import run

BF16_TOLERANCE = 0.05  # |dev overall bf16 - fp32| on the synthetic run below


def test_bf16_trains_and_stays_near_fp32(synthetic_root, tmp_path):
    """Six epochs on data with an obvious signal (as test_train's learning test): bf16 learns it
    too, and lands within 0.05 dev overall of fp32."""
    common = ("trainer.epochs=6", "heads=joint", "trainer.optimizer.lr=1e-3", "heads.dropout=0.0")
    _, fp32 = trained_run(synthetic_root, tmp_path / "fp32", *common)
    _, bf16 = trained_run(synthetic_root, tmp_path / "bf16", *common, "precision=bf16")
    assert bf16["para/dev/acc"] > 0.75 and bf16["sts/dev/pearson"] > 0.5  # it trains
    assert abs(bf16["dev/overall"] - fp32["dev/overall"]) < BF16_TOLERANCE
    # The precision really changed: the dev scores can coincide (the synthetic STS predictions
    # take two values, so any run that separates them has the same Pearson r), the losses cannot.
    assert train_losses(tmp_path / "bf16") != pytest.approx(train_losses(tmp_path / "fp32"),
                                                            rel=1e-6)
    assert bf16["memory/param_bytes"] == fp32["memory/param_bytes"]  # fp32 master weights


def train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [row[key] for row in rows for key in sorted(row) if key.endswith("/train/loss")]


def test_fp16_needs_a_gpu(synthetic_root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed")
    with pytest.raises(ConfigError, match="precision=fp16 needs a GPU"):
        run(compose_config(smoke_overrides(synthetic_root, "precision=fp16")), tmp_path)
    with pytest.raises(ConfigError, match="precision='fp8'; use one of"):
        run(compose_config(smoke_overrides(synthetic_root, "precision=fp8")), tmp_path)


@pytest.mark.parametrize("name,warmup,want", [
    ("constant", 0.0, [1.0] * 10),
    ("constant", 0.2, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 0.2, [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]),
])
def test_schedules_follow_the_formulas(name, warmup, want):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_scheduler(name, optimizer, 10, warmup)
    got = []
    for _ in range(10):
        got.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    assert got == pytest.approx(want)


@pytest.mark.parametrize("trainer,phases", [("sequential", 1), ("eoe", 3)])
def test_the_schedule_spans_the_run_or_each_expert(synthetic_root, tmp_path, recorded_logger,
                                                   trainer, phases):
    recorder = recorded_logger
    cfg = compose_config(smoke_overrides(synthetic_root, f"trainer={trainer}", "peft=lora",
                                         "trainer.epochs=2", "trainer.scheduler=linear",
                                         "trainer.optimizer.lr=1e-3"))
    run(cfg, tmp_path)
    per_phase = len(recorder.lrs) // phases  # 2 epochs x 9 batches (all tasks), or 2 x 3 (one)
    assert per_phase == (18 if phases == 1 else 6)
    for k in range(phases):
        lrs = recorder.lrs[k * per_phase:(k + 1) * per_phase]
        want = [1e-3 * (per_phase - i - 1) / per_phase for i in range(per_phase)]
        assert lrs == pytest.approx(want, rel=1e-6)  # one decay over the phase, to 0


def test_bad_schedule_options_are_config_errors(synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match="trainer.scheduler='step'; use one of"):
        run(compose_config(smoke_overrides(synthetic_root, "trainer.scheduler=step")), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.warmup_ratio=1.5 must be in \[0, 1\)"):
        run(compose_config(smoke_overrides(synthetic_root, "trainer.warmup_ratio=1.5")), tmp_path)
