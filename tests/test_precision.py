"""Mixed precision and learning-rate schedules: a bf16 run trains and its dev scores stay within a
stated tolerance of fp32's on the same small run; fp16 needs a GPU; the schedule spans every
optimizer step of the run (across tasks for the sequential strategy, per expert for the expert
ones), follows transformers' formulas, and is saved with the training state."""
from __future__ import annotations

import json
import logging
import os
import platform

import pytest
import torch

from conftest import compose_config, smoke_overrides, trained_run
from common.errors import ConfigError
from trainers.engine.optim import build_scheduler
from trainers.engine.run import run

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
    with pytest.raises(ConfigError, match="precision='fp8': must be 'fp32', 'auto', 'bf16' or 'fp16'"):
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


# ---- precision=auto: the choice from the hardware -------------------------------------------------
from pathlib import Path  # noqa: E402

from trainers.engine import loop as loop_module  # noqa: E402
from trainers.engine import precision as precision_module  # noqa: E402
from trainers.engine.precision import (BF16_FLAGS, Bf16Support, cpu_bf16_support, cpu_flags,  # noqa: E402
                                resolve_precision)

CPU = torch.device("cpu")
NATIVE = Bf16Support(True, "this CPU has native bf16 (amx_bf16; test)", 0.3)
EMULATED = Bf16Support(False, "this CPU has no native bf16 (AVX2); test", 40.0)


@pytest.mark.parametrize("flags,slowdown,native,says", [
    ({"avx2", "amx_bf16", "avx512_bf16"}, 0.25, True, "native bf16 (amx_bf16, avx512_bf16"),
    ({"avx2", "avx512_bf16"}, 0.8, True, "native bf16 (avx512_bf16"),
    ({"avx2", "fma"}, 44.0, False, "no native bf16 (AVX2); a bf16 matmul ran 44.0x as long"),
    ({"avx2", "avx512_bf16"}, 44.0, False, "reports avx512_bf16, but a bf16 matmul ran 44.0x"),
    ({"bf16", "asimd"}, 0.7, True, "no x86 bf16 flags, but a bf16 matmul ran 1.4x faster"),
    (None, 3.0, False, "no native bf16 (no AVX512-BF16 or AMX)"),
])
def test_the_cpu_rule(flags, slowdown, native, says):
    support = cpu_bf16_support(flags, slowdown)
    assert support.native is native and says in support.reason


@pytest.mark.parametrize("support,want", [(NATIVE, "bf16"), (EMULATED, "fp32")])
def test_auto_follows_the_detection(monkeypatch, support, want):
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: support)
    chosen, why = resolve_precision("auto", CPU)
    assert chosen == want and why == f"precision=auto -> {want}: {support.reason}"


def test_explicit_bf16_without_native_bf16_runs_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: EMULATED)
    assert resolve_precision("bf16", CPU)[0] == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "precision=fp32 (or auto) is faster here" in warnings[0].message
    assert resolve_precision("fp32", CPU) == ("fp32", "precision=fp32, as asked")


def test_the_real_detection_agrees_with_proc_cpuinfo():
    """The flags are /proc/cpuinfo's, and on real hardware (no ONEDNN_MAX_CPU_ISA cap) the
    probe agrees with them: native bf16 exactly where the CPU has amx_bf16 or avx512_bf16."""
    support = precision_module.bf16_support(CPU)
    assert support.slowdown > 0 and support.reason
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():  # not Linux: torch's cpuinfo answers, and the rule still decides
        assert support == cpu_bf16_support(cpu_flags(), support.slowdown)
        return
    line = next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith(("flags", "Feat")))
    flags = set(line.split(":", 1)[1].split())
    assert cpu_flags() == flags
    if "ONEDNN_MAX_CPU_ISA" not in os.environ and any(f in flags for f in BF16_FLAGS):
        assert support.native, support.reason
    elif not any(f in flags for f in BF16_FLAGS) and platform.machine() in ("x86_64", "AMD64"):
        assert not support.native, support.reason


def run_json(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("support,want", [(EMULATED, "fp32"), (NATIVE, "bf16")])
def test_an_auto_run_computes_in_the_chosen_precision_and_records_why(
        synthetic_root, tmp_path, monkeypatch, support, want):
    """Its training losses are those of an explicit run in the chosen precision, bit for bit."""
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: support)
    trained_run(synthetic_root, tmp_path / "auto", "precision=auto", "trainer.epochs=2")
    trained_run(synthetic_root, tmp_path / "explicit", f"precision={want}", "trainer.epochs=2")
    assert train_losses(tmp_path / "auto") == train_losses(tmp_path / "explicit")
    record = run_json(tmp_path / "auto")["precision"]
    assert record == {"requested": "auto", "chosen": want,
                      "why": f"precision=auto -> {want}: {support.reason}"}


class Killed(Exception):
    pass


def test_a_resumed_run_keeps_the_precision_it_started_in(synthetic_root, tmp_path, monkeypatch,
                                                         caplog):
    """Started where bf16 is native, killed at step 5, resumed where it is not: it goes on in
    bf16, says so, and ends as an uninterrupted bf16 run does."""
    overrides = ("precision=auto", "trainer.epochs=2", "checkpoint.every_n_steps=2")
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: NATIVE)
    steps = iter(range(1, 100))

    def kill_at_step_5(name):
        if name == "step" and next(steps) == 5:
            raise Killed

    monkeypatch.setattr(loop_module, "fault_point", kill_at_step_5)
    with pytest.raises(Killed):
        trained_run(synthetic_root, tmp_path / "run", *overrides)
    monkeypatch.setattr(loop_module, "fault_point", lambda name: None)
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: EMULATED)
    trained_run(synthetic_root, tmp_path / "run", *overrides)
    assert "this run started in bf16" in caplog.text and "It continues in bf16" in caplog.text
    assert run_json(tmp_path / "run")["precision"]["chosen"] == "bf16"
    trained_run(synthetic_root, tmp_path / "whole", "precision=bf16", "trainer.epochs=2")
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "whole")
