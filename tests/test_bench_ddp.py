"""Smoke test for scripts/bench_ddp.py on the tiny model and synthetic data: it launches real
torchrun workers (1 and 2 gloo processes, and the threaded reference), each timing the engine's
own training steps, and prints the table whose ratios are the documented ones. It checks that the
benchmark runs and that its arithmetic is right, not how fast anything is; and that a worker
really ran the number of processes it was asked for."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_ddp.py"
pytestmark = pytest.mark.slow  # three torchrun launches


def load():
    spec = importlib.util.spec_from_file_location("bench_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_ddp_runs_and_prints_the_scaling_ratio(synthetic_root, capsys):
    module = load()
    assert module.main(["--model", "tiny", "--peft", "lora", "--rounds", "1", "--steps", "2",
                        "--warmup", "1", "--batch-size", "8", "--data-root",
                        str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| lora \| (.+?) \| ([\d.]+) \| ([\d.]+)x \|$", out, re.M)
    assert [r[0] for r in rows] == ["1 x 1 thread(s)", "2 x 1 thread(s)",
                                    "1 x 2 threads (reference)"]
    rates = {label: float(rate) for label, rate, _ in rows}
    assert all(rate > 0 for rate in rates.values())
    for label, rate, ratio in rows:  # one round: the ratio is the rates' quotient
        assert float(ratio) == pytest.approx(float(rate) / rates["1 x 1 thread(s)"], abs=0.01)
    assert re.search(r"^machine: CPU with(out)? native bf16 .*ideal scaling to 2 processes: "
                     r"2\.00x$", out, re.M)


def test_a_worker_that_ran_another_number_of_processes_is_an_error(synthetic_root, monkeypatch):
    module = load()
    args = module.parse(["--model", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "8",
                         "--data-root", str(synthetic_root)])
    real = module.subprocess.run

    def one_process(cmd, **kw):  # a launcher that ignores --nproc_per_node
        cmd = [c if not c.startswith("--nproc_per_node=") else "--nproc_per_node=1" for c in cmd]
        return real(cmd, **kw)

    monkeypatch.setattr(module.subprocess, "run", one_process)
    with pytest.raises(SystemExit, match="asked for 2 processes, the run had 1"):
        module.measure(args, "lora", 2, 1)
