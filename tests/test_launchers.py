"""Sweeps beyond the basic launcher, run for real at smoke scale on the synthetic data: Optuna's
search (two trials, the best value is the best run's dev/overall), submitit's local executor and
joblib's parallel jobs (two each), W&B's group and tags for a sweep's runs (read back from the
offline run files), and `make_tables.py` on a real `experiment=table3 scale=smoke` sweep."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import yaml
# The sweep extra's plugins, imported so that a missing one fails here instead of skipping.
import hydra_plugins.hydra_joblib_launcher  # noqa: F401
import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
import hydra_plugins.hydra_submitit_launcher  # noqa: F401

from conftest import REPO, finished_runs, train_cli

pytestmark = pytest.mark.slow  # each test starts Python processes that import torch


def read_wandb_records(path) -> list:
    """The protobuf records of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then
    LevelDB's log format (32 KiB blocks; chunks of 4-byte CRC, 2-byte length, 1-byte type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_optuna_sweeper_runs_two_trials_and_reports_the_best(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "optuna"
    train_cli("-m", "sweep=optuna_lora", "scale=smoke", "hydra.sweeper.n_trials=2",
              f"data.root={shared_synthetic_root}", f"hydra.sweep.dir={sweep}")
    runs = finished_runs(sweep)
    assert len(runs) == 2
    for run in runs:  # each trial drew its own point of the search space
        peft = run["cfg"]["peft"]
        assert 1e-5 <= peft["lr"] <= 3e-3 and peft["rank"] in (2, 4, 8, 16, 32, 64)
        assert peft["alpha"] in (4, 8, 16, 32, 64) and 0.0 <= peft["dropout"] <= 0.3
        assert run["cfg"]["trainer"]["optimizer"]["lr"] == peft["lr"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(runs, key=lambda r: r["metrics"]["dev/overall"])
    assert result["best_value"] == pytest.approx(best["metrics"]["dev/overall"])
    assert result["best_params"]["peft.rank"] == best["cfg"]["peft"]["rank"]


def test_optuna_search_goes_on_past_failed_trials(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "optuna"
    proc = train_cli("-m", "sweep=optuna_lora", "scale=smoke", "hydra.sweeper.n_trials=2",
                         "peft.bias=bogus", f"data.root={shared_synthetic_root}",
                         f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "2 run(s) of the multirun failed" in proc.stderr
    for job in ("0", "1"):  # the second trial ran although the first had failed
        assert (sweep / job / "error.txt").read_text().startswith("peft: bias='bogus'")
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == (
        float("-inf"))


def test_submitit_local_launcher_runs_two_jobs(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "submitit"
    train_cli("-m", "hydra/launcher=local", "scale=smoke", "order=sst-para-sts,sts-para-sst",
              f"data.root={shared_synthetic_root}", f"hydra.sweep.dir={sweep}")
    runs = finished_runs(sweep)
    assert sorted(r["cfg"]["tasks"][0] for r in runs) == ["sst", "sts"]
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # each ran as a submitit job


def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "joblib"
    proc = train_cli("-m", "hydra/launcher=parallel", "scale=smoke", "heads=concat,joint",
                     f"data.root={shared_synthetic_root}", f"hydra.sweep.dir={sweep}")
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert sorted(r["cfg"]["heads"]["design"] for r in finished_runs(sweep)) == ["concat",
                                                                                  "joint"]


def test_wandb_runs_of_a_sweep_share_a_group_and_carry_tags(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "sweep"
    train_cli("-m", "experiment=table2", "scale=smoke", "logger=wandb", "table2=lora-qkv-r4",
              "trainer.task=sst,sts", "seed=3", f"data.root={shared_synthetic_root}",
              f"hydra.sweep.dir={sweep}")
    groups = set()
    for task in ("sst", "sts"):
        files = list(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
        assert len(files) == 2
        run_file = next(f for f in files if f"trainer.task={task}" in f.parents[2].joinpath(
            ".hydra", "overrides.yaml").read_text())
        records = read_wandb_records(run_file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        groups.add(run.run_group)
        assert {"table2", "peft:lora", "trainer:single", "table2:lora-qkv-r4", "scale:smoke",
                "seed:3"} <= set(run.tags)
        assert f"trainer.task={task}" in run.display_name
        summary = {item.key: json.loads(item.value_json) for r in records
                   if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
        metrics = json.loads((run_file.parents[2] / "metrics.json").read_text())
        assert summary["dev/overall"] == pytest.approx(metrics["dev/overall"])
    assert groups == {f"table2@{sweep.parent.name}_{sweep.name}"}


def test_make_tables_prints_table3_from_a_smoke_sweep(tmp_path, shared_synthetic_root):
    sweep = tmp_path / "table3"
    train_cli("-m", "experiment=table3", "scale=smoke", f"data.root={shared_synthetic_root}",
              f"hydra.sweep.dir={sweep}")
    proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(sweep)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "**Table 3: multi-task strategies (dev)**" in lines
    by_label = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    for run in finished_runs(sweep):
        trainer = run["cfg"]["trainer"]
        finisher = trainer["finisher"]["_target_"].rsplit(".", 1)[1]
        label = ("OrthoAda" if trainer["init"] else
                 {"Experts": "Ensemble of Experts", "MergeExperts": "FedAvg"}.get(
                     finisher, "Sequential (" + " → ".join(run["cfg"]["tasks"]) + ")"))
        cells = [c.strip() for c in by_label[label].split("|")[2:-1]]
        assert cells[-1] == f"{run['metrics']['dev/overall']:.3f}"
        assert cells[0] == f"{run['metrics']['params/updated_pct']:.2f} %"
    assert (sweep / "tables" / "table3.tex").is_file()
