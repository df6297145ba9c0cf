"""Data-parallel runs for real: `torchrun --nproc_per_node=2 train.py ...` on the CPU (gloo), each
rank one thread, against the same run in one process. With dropout off the two train the same
steps: the losses and dev metrics agree within 1e-5 on MiniLM (full fine-tuning and LoRA); every
PEFT method and every strategy trains under DDP in a sweep (on the tiny random encoder, whose
near-constant STS predictions make the Pearson correlation ill-conditioned, so its metrics are
held to 1e-4 and its losses to 1e-5). A 2-process run killed at a random step (one rank, or a
preemption signal to one rank) resumes to the uninterrupted 2-process run's files byte for byte;
resuming with another number of processes is refused. The same run as a submitit job of two
tasks (`hydra/launcher=local_ddp`, slurm_ddp's code path), preempted and requeued, ends as the
torchrun run does. One metrics.json, one W&B run and one set of predictions per run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, options, write_synthetic_data
from test_resume import assert_identical

pytestmark = pytest.mark.slow  # each test starts torchrun and Python processes that import torch

NO_DROPOUT = ["heads.dropout=0", "progress=false"]
TINY_NO_DROPOUT = [*NO_DROPOUT, "+model.encoder.hidden_dropout_prob=0",
                   "+model.encoder.attention_probs_dropout_prob=0"]
MINILM = [*NO_DROPOUT, "model.encoder.hidden_dropout_prob=0",
          "model.encoder.attention_probs_dropout_prob=0", "logger=none", "trainer.epochs=1",
          "data.limit_train=48", "data.limit_eval=64", "data.batch_size=16"]


def launch(args: list[str], procs: int, fault: str | None = None, rank: int | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """train.py in `procs` processes (torchrun, one thread each) or one (plain Python)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINBERT_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["MINBERT_FAULT"] = fault
    if rank is not None:
        env["MINBERT_FAULT_RANK"] = str(rank)
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable])
    proc = subprocess.run([*runner, "train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    if check and not fault and proc.returncode != 0:
        raise AssertionError(f"train.py ({procs} processes) failed:\n{proc.stderr[-4000:]}")
    return proc


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(the largest difference of a dev metric, of a training loss) between two runs."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    metrics = [abs(ma[k] - mb[k]) for k in ma if "/dev/" in k or k == "dev/overall"]
    ha, hb = history(a), history(b)
    assert len(ha) == len(hb) and metrics
    losses = [abs(x[k] - y[k]) for x, y in zip(ha, hb) for k in x if k.endswith("/train/loss")]
    assert losses
    return max(metrics), max(losses)


def predictions(run_dir: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted((run_dir / "predictions").glob("*"))}


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_two_processes_train_what_one_does(tmp_path, peft):
    """MiniLM, the same global batch of 16, dropout off: 1 process vs 2 (each 8 examples)."""
    logger = ["logger=wandb", "logger.mode=offline"] if peft == "lora" else []
    one, two = tmp_path / "one", tmp_path / "two"
    launch([*MINILM, f"peft={peft}", f"hydra.run.dir={one}"], 1)
    launch([*MINILM, f"peft={peft}", *logger, f"hydra.run.dir={two}"], 2)
    metric, loss = differences(one, two)
    assert metric < 1e-5 and loss < 1e-5, (metric, loss)
    a, b = predictions(one), predictions(two)
    assert a.keys() == b.keys() and len(a) >= 3  # one set: dev (and test) per task, from rank 0
    for name in a:
        assert len(a[name]) == len(b[name])
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
    if logger:  # one W&B run, rank 0's
        assert len(list((two / "wandb").glob("offline-run-*"))) == 1
    assert (two / ".hydra" / "config.yaml").is_file() and (two / "train.log").is_file()


def sweep_pairs(tmp_path: Path, sweep: list[str], common: list[str]) -> list[tuple[Path, Path]]:
    """The same multirun in one process and in two; the pairs of run dirs, job by job."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(["-m", *sweep, *common, f"hydra.sweep.dir={one}"], 1)
    launch(["-m", *sweep, *common, f"hydra.sweep.dir={two}"], 2)
    jobs = sorted(p.name for p in one.iterdir() if p.name.isdigit())
    assert jobs == sorted(p.name for p in two.iterdir() if p.name.isdigit()) and jobs
    return [(one / j, two / j) for j in jobs]


def test_every_peft_method_trains_data_parallel_in_a_sweep(tmp_path, shared_synthetic_root):
    methods = options("peft")
    common = ["debug=smoke", *TINY_NO_DROPOUT, f"data.root={shared_synthetic_root}",
              "data.batch_size=8"]
    pairs = sweep_pairs(tmp_path, [f"peft={','.join(methods)}"], common)
    assert len(pairs) == len(methods)
    for (a, b), method in zip(pairs, methods):
        metric, loss = differences(a, b)
        assert metric < 1e-4 and loss < 1e-5, (method, metric, loss)


def test_every_strategy_trains_data_parallel(tmp_path, shared_synthetic_root):
    common = ["scale=smoke", *TINY_NO_DROPOUT, f"data.root={shared_synthetic_root}",
              "data.batch_size=8", "peft=lora"]
    trainers = "trainer=sequential,interleaved,eoe,fedavg,orthoada,ties"
    pairs = sweep_pairs(tmp_path, [trainers], common)
    pairs += sweep_pairs(tmp_path / "combiners", ["trainer=interleaved",
                                                  "trainer.combiner=pcgrad,gradvac"], common)
    assert len(pairs) == 8
    for a, b in pairs:
        metric, loss = differences(a, b)
        assert metric < 1e-4 and loss < 1e-5, (a, metric, loss)


@pytest.fixture(scope="module")
def kill_root(tmp_path_factory) -> Path:
    return write_synthetic_data(tmp_path_factory.mktemp("data"))


def kill_args(root: Path, run_dir: Path) -> list[str]:
    return ["debug=smoke", f"data.root={root}", "data.batch_size=16", "progress=false",
            "peft=lora", "trainer.epochs=2", "checkpoint.every_n_steps=2",
            f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def two_process_reference(kill_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    launch(kill_args(kill_root, run_dir), 2)
    return run_dir


def test_a_killed_two_process_run_resumes_identically(kill_root, two_process_reference,
                                                     tmp_path):
    """Rank 1 killed (SIGKILL) at a random step: torchrun ends rank 0 too. One process may not
    resume it; two do, to the uninterrupted run's files byte for byte."""
    steps = history(two_process_reference)[-1]["step"]
    step = random.Random(os.environ.get("PYTEST_SEED", "ddp")).randint(2, steps - 2)
    run_dir = tmp_path / "run"
    killed = launch(kill_args(kill_root, run_dir), 2, fault=f"step@{step}", rank=1)
    assert killed.returncode != 0 and not (run_dir / "metrics.json").exists()
    refused = launch(kill_args(kill_root, run_dir), 1, check=False)
    assert refused.returncode == 1 and "written by 2 process(es)" in refused.stderr, \
        refused.stderr[-2000:]
    assert "torchrun --nproc_per_node=2" in refused.stderr
    launch(kill_args(kill_root, run_dir), 2)
    assert_identical(run_dir, two_process_reference)


def test_a_preemption_signal_to_one_rank_stops_both_after_one_checkpoint(
        kill_root, two_process_reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(kill_args(kill_root, run_dir), 2, fault="step@5:USR2", rank=1)
    assert proc.returncode != 0
    assert "stopped by SIGUSR2 after a checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "checkpoints").is_dir() and not (run_dir / "metrics.json").exists()
    launch(kill_args(kill_root, run_dir), 2)
    assert_identical(run_dir, two_process_reference)


def test_a_submitit_ddp_job_preempted_and_requeued_ends_as_the_torchrun_run(
        kill_root, two_process_reference, tmp_path):
    """`hydra/launcher=local_ddp` (slurm_ddp's code path on submitit's local executor): the job's
    two tasks join one process group from submitit's environment and train what torchrun's two
    processes train. USR2 to both tasks at step 12 of 18 (a Slurm preemption): a checkpoint,
    submitit's handler requeues the job from rank 0, and the requeued tasks resume it to the
    uninterrupted torchrun run's files; only rank 0 wrote the log."""
    sweep = tmp_path / "sweep"
    args = [a for a in kill_args(kill_root, tmp_path) if not a.startswith("hydra.run.dir=")]
    proc = launch(["-m", "hydra/launcher=local_ddp", *args, f"hydra.sweep.dir={sweep}"], 1,
                  fault="step@12:USR2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "this job is preempted" in logs and "Requeued job" in logs, logs[-3000:]
    assert_identical(sweep / "0", two_process_reference)
    assert (sweep / "0" / "train.log").read_text().count("process group: 2 ranks over gloo") == 2


def test_a_launcher_that_starts_its_own_processes_is_refused_under_torchrun(
        tmp_path, shared_synthetic_root):
    proc = launch(["-m", "debug=smoke", f"data.root={shared_synthetic_root}",
                   "hydra/launcher=parallel", "seed=1,2", f"hydra.sweep.dir={tmp_path}"], 2,
                  check=False)
    assert proc.returncode != 0 and "under torchrun" in proc.stderr, proc.stderr[-2000:]


def test_a_global_batch_smaller_than_the_processes_is_refused(tmp_path, shared_synthetic_root):
    proc = launch(["debug=smoke", f"data.root={shared_synthetic_root}", "data.batch_size=1",
                   f"hydra.run.dir={tmp_path}"], 2, check=False)
    assert proc.returncode != 0 and "data.batch_size=1 is the global batch" in proc.stderr


def test_rank_overrides_move_the_other_ranks_hydra_files_away(monkeypatch):
    from trainers.engine.launch import rank_overrides

    argv = ["peft=lora", "hydra.run.dir=outputs/x"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_overrides(argv) == argv  # no torchrun: unchanged
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    got = rank_overrides(argv)
    assert got[0] == "peft=lora" and "hydra.run.dir=outputs/x" not in got
    assert "hydra.output_subdir=null" in got and "hydra/job_logging=none" in got
    monkeypatch.setenv("RANK", "0")
    assert rank_overrides(argv) == argv  # rank 0 keeps the user's folders


def test_sharing_a_batch_covers_every_example_once():
    """The ranks' shares of a batch partition it; an empty share runs one example at weight 0."""
    import torch

    from tasks.batching import Batch
    from trainers.engine.parallel import DataParallel

    n = 5
    batch = Batch(torch.arange(2 * n)[:, None], torch.ones(2 * n, 1), torch.zeros(2 * n, 1),
                  torch.arange(n), torch.arange(n), segments=2)
    for world in (1, 2, 3, 5, 7):
        seen, total = [], 0.0
        for rank in range(world):
            part = DataParallel.__new__(DataParallel)
            part.rank, part.world = rank, world
            local, weight = part.share(batch)
            assert local.input_ids.shape[0] == 2 * len(local.index)  # both sentences kept
            assert torch.equal(local.input_ids[len(local.index):, 0], local.index + n)
            total += weight
            if weight:
                seen += local.index.tolist()
        assert sorted(seen) == list(range(n)) and abs(total - 1.0) < 1e-12, world
