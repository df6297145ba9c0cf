"""Smoke test for scripts/bench_precision.py on the tiny model and synthetic data: it times the
same run in precision=auto, fp32 and (where native) bf16 in turn, prints the ratios and the target
with its machine class, and where bf16 is not native (the detection patched to say so, as on an
AVX2-only CPU) it times bf16 only on 16 examples a task. It checks what the benchmark reports, not
how fast anything is."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from trainers.engine import precision as precision_module
from trainers.engine.precision import Bf16Support

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_precision.py"
SUPPORT = {True: Bf16Support(True, "native (test)", 0.3),
           False: Bf16Support(False, "no native bf16 (test)", 40.0)}


@pytest.mark.parametrize("native", [True, False])
def test_bench_precision_times_auto_beside_fp32(synthetic_root, monkeypatch, capsys, native):
    monkeypatch.setattr(precision_module, "bf16_support", lambda device: SUPPORT[native])
    spec = importlib.util.spec_from_file_location("bench_precision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--preset", "model=tiny", "trainer.epochs=1", "--quick", "--data-root",
                 str(synthetic_root)])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([a-z0-9 ()]+) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \|$", out, re.M))
    assert rows["fp32"] == "1.00"
    if native:
        assert set(rows) == {"auto", "fp32", "bf16"}
        assert re.search(r"target \(CPU with native bf16 .*\): auto runs bf16 and is faster", out)
    else:
        assert set(rows) == {"auto", "fp32", "bf16 (16 examples a task)",
                             "fp32 (16 examples a task)"}
        assert re.search(r"target \(CPU without native bf16 .*\): auto at most 1.1x fp32's time: "
                         r"[\d.]+x (PASS|FAIL); bf16 not native here", out)
