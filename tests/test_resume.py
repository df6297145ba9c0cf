"""Runs that survive being killed: kill a run anywhere (SIGKILL at a named fault point, at a random
step, by a preemption signal), run it again, and its metrics.json (but for the measured peak
memory), history.jsonl, predictions and adapter, expert and merge files are byte for byte those of
an uninterrupted run. Also: optimizer states round-trip exactly through `weights_only` loading, a
truncated checkpoint falls back to the one before, a finished run is skipped, a different config or
a second process is refused, a relaunched sweep continues where it stopped, W&B resumes its run."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config, smoke_overrides, write_synthetic_data
from common import durable
from common.durable import RunLock
from common.errors import ConfigError
from minbert.optim import AdamW8bit, GaLoreAdamW
from trainers.engine.run import run
from trainers.engine.state import checkpoint_files

STEPS = ["checkpoint.every_n_steps=2", "trainer.epochs=2"]


def launch(root: Path, run_dir: Path, *overrides: str, fault: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINBERT_FAULT"}
    if fault:
        env["MINBERT_FAULT"] = fault
    proc = subprocess.run([sys.executable, "train.py", *smoke_overrides(root, *STEPS, *overrides),
                           f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and not fault and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stderr[-3000:]}")
    return proc


def outputs(run_dir: Path) -> dict[str, bytes | dict]:
    """What must be identical: every file of record, metrics.json without the measured peak and
    throughput."""
    files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
             if p.is_file() and (p.suffix in (".safetensors", ".csv", ".jsonl"))}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("memory/peak_bytes")
    metrics.pop("train/examples_per_s", None)  # a resumed run measured only its own steps
    return {**files, "metrics.json": metrics}


def assert_identical(got: Path, want: Path) -> None:
    a, b = outputs(got), outputs(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run's"
    assert any(n.endswith(".safetensors") for n in a) and "history.jsonl" in a


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The uninterrupted run of a configuration, made once per module."""
    made: dict[tuple, Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in made:
            made[overrides] = tmp_path_factory.mktemp("reference")
            launch(root, made[overrides], *overrides)
        return made[overrides]

    return get


def resume_until_done(root: Path, run_dir: Path, *overrides: str, faults=()) -> list[int]:
    """Runs with each fault in turn (each launch is killed), then once more to the end."""
    codes = [launch(root, run_dir, *overrides, fault=f).returncode for f in faults]
    launch(root, run_dir, *overrides)
    return codes


@pytest.mark.parametrize("overrides,fault", [
    (["peft=lora"], "checkpoint-write@2"),
    (["peft=lora"], "adapter-written"),
    (["peft=lora"], "history-appended@2"),
    (["peft=lora"], "before-metrics"),
    (["peft=lora"], "step@5"),
    (["peft=lora", "trainer=eoe"], "adapter-written@2"),
    (["peft=galore", "optim.state_bits=8", "peft.update_proj_gap=3"], "step@7"),
    (["peft=adalora", "peft.tinit=2", "peft.deltaT=2"], "step@7"),
    (["peft=dylora", "trainer=eoe"], "step@8"),
    (["peft=qlora"], "step@5"),
    (["peft=lora", "precision=bf16", "trainer.scheduler=cosine", "trainer.warmup_ratio=0.2"],
     "step@6"),
    # killed between two mid-epoch evaluations (at 3 and 6), and just after one was written
    (["peft=lora", "trainer.eval_every_n_steps=3"], "step@5"),
    (["peft=lora", "trainer.eval_every_n_steps=3"], "history-appended@2"),
    (["trainer=eoe", "trainer.eval_every_n_steps=2", "trainer.patience=1",
      "trainer.optimizer.lr=0.0", "trainer.head_lr=0.0"], "step@3"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_a_kill_at_a_fault_point_resumes_bit_identically(root, reference, tmp_path, overrides,
                                                        fault):
    codes = resume_until_done(root, tmp_path / "run", *overrides, faults=[fault])
    assert codes == [-signal.SIGKILL]
    assert_identical(tmp_path / "run", reference(*overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()  # a finished run keeps none


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(root, reference, tmp_path):
    run_dir = tmp_path / "run"
    assert launch(root, run_dir, "peft=lora", fault="step@9").returncode == -signal.SIGKILL
    newest = checkpoint_files(run_dir)[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    proc = launch(root, run_dir, "peft=lora")
    assert f"checkpoint {newest} is unreadable" in proc.stdout + proc.stderr
    assert_identical(run_dir, reference("peft=lora"))


def test_a_preemption_signal_checkpoints_then_the_run_resumes(root, reference, tmp_path):
    """USR2 (submitit's preemption signal) mid-training: a checkpoint at the next step boundary,
    a clear exit, and `resume=` continues to the uninterrupted run's result."""
    run_dir = tmp_path / "run"
    proc = launch(root, run_dir, "peft=lora", fault="step@3:USR2")
    assert proc.returncode == 1 and "stopped by SIGUSR2 after a checkpoint" in proc.stderr
    assert f"resume={run_dir}" in proc.stderr and checkpoint_files(run_dir)
    launch(root, tmp_path / "elsewhere", "peft=lora", f"resume={run_dir}")
    assert_identical(run_dir, reference("peft=lora"))


def test_the_preemption_handler_before_ours_is_called_after_the_checkpoint(root, tmp_path,
                                                                           monkeypatch):
    """Under submitit, its USR2 handler requeues the job: ours hands the signal on to it, after
    the checkpoint is on disk."""
    seen = []

    def submitit_like(signum, frame):
        seen.append((signum, [p.name for p in checkpoint_files(tmp_path)]))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    monkeypatch.setenv("MINBERT_FAULT", "step@3:USR2")
    monkeypatch.setattr(durable, "_reached", Counter())
    try:
        with pytest.raises(SystemExit):
            run(compose_config(smoke_overrides(root, *STEPS, "peft=lora")), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, ["checkpoint-000001.pt", "checkpoint-000002.pt"])]


def test_a_finished_run_is_skipped_and_another_config_refused(root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = compose_config(smoke_overrides(root, "peft=lora"))
    score = run(cfg, tmp_path)
    stamp = (tmp_path / "metrics.json").stat().st_mtime_ns
    assert run(cfg, tmp_path) == score  # nothing to do: the same score, no training
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == stamp
    assert "has finished already" in caplog.text
    other = compose_config(smoke_overrides(root, "peft=lora", "trainer.epochs=3",
                                           "peft.rank=4", "progress=true"))
    with pytest.raises(ConfigError, match=r"holds a run with another config.*peft.rank: 8 -> 4; "
                                          r"trainer.epochs: 1 -> 3\. Run it with its own config"):
        run(other, tmp_path)


def test_a_run_held_by_another_process_is_refused(root, tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ConfigError, match=f"is being run by process {os.getpid()}"):
            run(compose_config(smoke_overrides(root, "peft=lora")), tmp_path)


def test_resume_needs_a_run(root, tmp_path):
    proc = launch(root, tmp_path / "new", f"resume={tmp_path / 'nothing'}", check=False)
    assert proc.returncode == 1 and "no run there (no run.json)" in proc.stderr


@pytest.mark.slow
def three_job_sweep(root: Path, tmp_path: Path) -> tuple[list[str], Path, list[str], dict]:
    """(the task orders, the sweep dir, the command, an environment without a fault) of a
    three-job LoRA sweep, one job per task order."""
    orders = ["sst-para-sts", "sts-para-sst", "para-sst-sts"]
    sweep = tmp_path / "sweep"
    args = [sys.executable, "train.py", "-m", *smoke_overrides(root, *STEPS, "peft=lora"),
            f"order={','.join(orders)}", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in os.environ.items() if k != "MINBERT_FAULT"}
    return orders, sweep, args, env


def test_a_relaunched_sweep_skips_resumes_and_runs(root, reference, tmp_path):
    """Three jobs; the second is killed mid-training. Run again with the same sweep dir: the first
    is skipped, the second resumed, the third run, each as an uninterrupted run would end."""
    orders, sweep, args, env = three_job_sweep(root, tmp_path)
    killed = subprocess.run(args, cwd=REPO, env={**env, "MINBERT_FAULT": "step@23"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL  # job 0 has 18 steps: killed at job 1's 5th
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()
    first = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert f"{sweep / '0'} has finished already" in log
    assert "resuming from" in log and (sweep / "0" / "metrics.json").stat().st_mtime_ns == first
    for job, order in enumerate(orders):
        assert_identical(sweep / str(job), reference("peft=lora", f"order={order}"))


def test_a_stop_signal_stops_the_sweep_and_a_relaunch_continues_it(root, reference, tmp_path):
    """SIGTERM (`kill`, a cluster's preemption) during a sweep's second job: a checkpoint, then the
    sweep stops, not only that job (the third never starts); run again, it ends as uninterrupted."""
    orders, sweep, args, env = three_job_sweep(root, tmp_path)
    stopped = subprocess.run(args, cwd=REPO, env={**env, "MINBERT_FAULT": "step@23:TERM"},
                             capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 1 and "stopped by SIGTERM after a checkpoint" in stopped.stderr
    assert "the sweep stops here" in stopped.stderr
    assert checkpoint_files(sweep / "1") and not (sweep / "1" / "error.txt").exists()
    assert not (sweep / "2").exists()
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for job, order in enumerate(orders):
        assert_identical(sweep / str(job), reference("peft=lora", f"order={order}"))


def test_wandb_continues_the_same_run(root, tmp_path):
    run_dir = tmp_path / "run"
    assert launch(root, run_dir, "peft=lora", "logger=wandb",
                  fault="step@5").returncode == -signal.SIGKILL
    first = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    launch(root, run_dir, "peft=lora", "logger=wandb")
    assert json.loads((run_dir / "run.json").read_text())["wandb_id"] == first
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(first) for name in runs)


# --- optimizer states ------------------------------------------------------------------------

def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
    "adamw8": lambda params: AdamW8bit([{"params": params}], lr=1e-2, min_8bit_size=64),
    "galore32": lambda params: GaLoreAdamW(_galore_groups(params), lr=1e-2),
    "galore8": lambda params: GaLoreAdamW(_galore_groups(params), lr=1e-2, state_bits=8,
                                          min_8bit_size=64),
}


def _galore_groups(params):
    params = list(params)
    weights = [p for p in params if p.dim() == 2]
    return [{"params": [p for p in params if p.dim() != 2]},
            {"params": weights, "rank": 4, "update_proj_gap": 3, "scale": 0.5,
             "proj_type": "std"}]


def _steps(model, optimizer, n: int, start: int) -> None:
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 96, generator=g), torch.randn(16, 8, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_round_trips_exactly(name, tmp_path):
    """k steps, save, load into a fresh model and optimizer (weights_only), m more steps: equal
    to k + m uninterrupted steps, bit for bit, across GaLore's projector refreshes."""
    k, m = 4, 5
    straight = _model()
    opt = OPTIMIZERS[name](straight.parameters())
    _steps(straight, opt, k + m, 0)

    first = _model()
    opt = OPTIMIZERS[name](first.parameters())
    _steps(first, opt, k, 0)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    second = _model(seed=1)  # other weights: everything must come from the checkpoint
    second.load_state_dict(saved["model"])
    opt = OPTIMIZERS[name](second.parameters())
    opt.load_state_dict(saved["optimizer"])
    _steps(second, opt, m, k)
    for (n, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), n


def test_the_round_trip_check_can_fail(tmp_path):
    """Dropping the 8-bit moments from the checkpoint (what a lossy save would do) breaks it."""
    first, straight = _model(), _model()
    opt_a = OPTIMIZERS["adamw8"](straight.parameters())
    _steps(straight, opt_a, 6, 0)
    opt_b = OPTIMIZERS["adamw8"](first.parameters())
    _steps(first, opt_b, 3, 0)
    state = opt_b.state_dict()
    state["state"] = {i: {k: v for k, v in s.items() if k == "step"}
                      for i, s in state["state"].items()}
    fresh = OPTIMIZERS["adamw8"](first.parameters())
    fresh.load_state_dict(state)
    _steps(first, fresh, 3, 3)  # the moments restart from zero
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), first.parameters()))


# --- random kills ------------------------------------------------------------------------------

STRATEGIES = {"sequential": [], "single": ["trainer=single", "trainer.task=sts"],
              "interleaved": ["trainer=interleaved"], "pcgrad": ["trainer=interleaved",
                                                                 "trainer.combiner=pcgrad"],
              "gradvac": ["trainer=interleaved", "trainer.combiner=gradvac"],
              "eoe": ["trainer=eoe"], "fedavg": ["trainer=fedavg"], "orthoada": ["trainer=orthoada"]}
METHODS = {"full": ["peft=none"], "lora": ["peft=lora"],
           "galore": ["peft=galore", "peft.update_proj_gap=3"],
           "8bit": ["peft=lora", "optim.state_bits=8"]}
# Every strategy with LoRA; each other method with three strategies, one of each shape of training
# state: one phase (sequential, single, interleaved), a gradient combiner's (pcgrad, gradvac), and
# per-task experts (eoe, fedavg). OrthoAda needs LoRA. (The full product, 30 cells, took 11 of the
# suite's 32 minutes; every cell of it had passed.)
COVER = {"full": ("sequential", "pcgrad", "eoe"), "galore": ("single", "interleaved", "fedavg"),
         "8bit": ("interleaved", "gradvac", "eoe")}
MATRIX = [(s, "lora") for s in STRATEGIES] + [(s, m) for m, ss in COVER.items() for s in ss]


def _kill_and_resume(root: Path, run_dir: Path, reference: Path, strategy: str,
                     method: str) -> str | None:
    """One cell of the matrix: killed at 2-5 random steps (sometimes inside a checkpoint write),
    relaunched each time; None if the finished run equals the uninterrupted one."""
    overrides = (*STRATEGIES[strategy], *METHODS[method])
    rng = random.Random(f"{strategy}-{method}")
    total = 6 if strategy == "single" else 18  # optimizer steps in 2 epochs of 3 batches a task
    kills = sorted(rng.sample(range(1, total), rng.randint(2, 5)))
    faults = [f"step@{k - prev}" if rng.random() < 0.8 else "checkpoint-write@1"
              for prev, k in zip([0] + kills, kills)]
    try:
        resume_until_done(root, run_dir, *overrides, faults=faults)
        assert_identical(run_dir, reference)
    except AssertionError as e:
        return f"{strategy} x {method} (faults {faults}): {e}"
    return None


@pytest.mark.slow  # about 85 short runs of train.py, three at a time: about 6 minutes
def test_random_kills_resume_bit_identically(root, tmp_path):
    """Every trainer strategy with LoRA, and full fine-tuning, GaLore and 8-bit states each with
    three strategies (`COVER`): each run killed at random steps and relaunched until it finishes
    ends byte for byte as an uninterrupted one."""
    from concurrent.futures import ThreadPoolExecutor

    def cell(pair):
        strategy, method = pair
        ref, run_dir = tmp_path / f"ref-{strategy}-{method}", tmp_path / f"{strategy}-{method}"
        launch(root, ref, *STRATEGIES[strategy], *METHODS[method])
        return _kill_and_resume(root, run_dir, ref, strategy, method)

    with ThreadPoolExecutor(max_workers=3) as pool:
        failures = [f for f in pool.map(cell, MATRIX) if f]
    assert not failures, "\n".join(failures)
    assert len(MATRIX) == 17 and {s for s, _ in MATRIX} == set(STRATEGIES)


def killed_run(tmp_path: Path) -> tuple[Path, Path]:
    """(its own data root, a run killed at its 3rd step, after a checkpoint)."""
    data = write_synthetic_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = launch(data, run_dir, "peft=lora", fault="step@3")
    assert proc.returncode != 0 and checkpoint_files(run_dir)
    return data, run_dir


def test_resume_refuses_changed_data_naming_the_file_unless_allowed(tmp_path):
    data, run_dir = killed_run(tmp_path)
    recorded = json.loads((run_dir / "run.json").read_text())
    assert set(recorded["data"]) >= {"sst/train", "sst/dev", "para/train", "sts/dev"}
    train = data / "ids-sst-train.csv"
    train.write_text(train.read_text().replace("movie number 1\t", "film number 1\t"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused = launch(data, run_dir, "peft=lora", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "started on other data: sst/train (ids-sst-train.csv, changed)" in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    launch(data, run_dir, "peft=lora", "data.allow_changed=true")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["data"] == recorded["data"]  # what the run started on
    assert [c["files"] for c in record["data_changed"]] == [["sst/train (ids-sst-train.csv, "
                                                              "changed)"]]
    assert (run_dir / "metrics.json").is_file()
    assert "continues on changed data" in (run_dir / "train.log").read_text()


def test_deleted_checkpoints_are_said_before_starting_again(tmp_path):
    data, run_dir = killed_run(tmp_path)
    for path in checkpoint_files(run_dir):
        path.unlink()
    proc = launch(data, run_dir, "peft=lora")
    assert "holds a started run but no checkpoint" in proc.stdout + proc.stderr
    assert (run_dir / "metrics.json").is_file()
    assert len(list((run_dir / ".hydra").glob("resume-*"))) == 1  # this invocation's own files
