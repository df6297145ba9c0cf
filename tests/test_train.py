"""End-to-end runs through Hydra's compose API and the real `train.py`, on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, smoke_overrides
from common.errors import TrainingError
from tasks.base import Task
from tasks.registry import get_tasks
from trainers.engine.run import build_model, run

METRIC_KEYS = {"sst/dev/acc", "para/dev/acc", "sts/dev/pearson", "dev/overall",
               "params/trainable", "params/total", "params/updated_pct",
               "memory/param_bytes", "memory/trainable_param_bytes", "memory/grad_bytes",
               "memory/optimizer_state_bytes", "memory/peak_bytes", "train/examples_per_s",
               "adapter/file_bytes"}


@pytest.mark.parametrize("heads", ["concat", "separate", "joint"])
def test_smoke_run_writes_metrics_predictions_and_checkpoint(compose_cfg, synthetic_root, tmp_path,
                                                             heads):
    cfg = compose_cfg(smoke_overrides(synthetic_root, f"heads={heads}"))
    score = run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert score == metrics["dev/overall"]
    assert 0 <= metrics["sst/dev/acc"] <= 1 and -1 <= metrics["sts/dev/pearson"] <= 1
    want = (metrics["sst/dev/acc"] + metrics["para/dev/acc"] + (metrics["sts/dev/pearson"] + 1) / 2) / 3
    assert metrics["dev/overall"] == pytest.approx(want)
    assert metrics["params/updated_pct"] == 100.0 and metrics["params/trainable"] > 2_000_000
    n_tensors = sum(1 for _ in build_model(cfg, get_tasks(["sst", "para", "sts"])).parameters())
    assert metrics["memory/param_bytes"] == metrics["memory/grad_bytes"] == 4 * metrics["params/total"]
    # torch AdamW: exp_avg and exp_avg_sq per parameter, and a float32 tensor `step` per tensor
    assert metrics["memory/optimizer_state_bytes"] == 2 * 4 * metrics["params/total"] + 4 * n_tensors
    assert metrics["memory/peak_bytes"] >= 0  # RSS growth during training; 0 if none
    assert metrics["train/examples_per_s"] > 0
    assert metrics["adapter/file_bytes"] == (tmp_path / "run" / "adapter.safetensors").stat().st_size
    for name in ["sst-dev", "sst-test", "para-dev", "para-test", "sts-dev", "sts-test"]:
        lines = (tmp_path / "run" / "predictions" / f"{name}-output.csv").read_text().splitlines()
        assert lines[0].startswith("id \t Predicted_") and len(lines) == 41
    sst_dev = (tmp_path / "run" / "predictions" / "sst-dev-output.csv").read_text().splitlines()
    assert [l.split(" , ")[0] for l in sst_dev[1:]] == [f"sdev{i}" for i in range(40)]
    assert {l.split(" , ")[1].strip() for l in sst_dev[1:]} <= {"0", "1", "2", "3", "4"}
    state = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert "heads.sst.out.weight" in state and "encoder.layers.0.attn.query.weight" in state
    history = [json.loads(l) for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    assert (tmp_path / "run" / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_a_dev_only_run_reads_no_test_set_and_writes_dev_predictions(compose_cfg, synthetic_root,
                                                                     tmp_path, caplog):
    """data.predict_test=false (the zoo's sweeps): the same dev scores, no leaderboard files."""
    scores = {}
    for predict in (True, False):
        cfg = compose_cfg(smoke_overrides(synthetic_root, "heads=joint",
                                          f"data.predict_test={str(predict).lower()}"))
        with caplog.at_level("INFO", logger="tasks.data"):
            scores[predict] = run(cfg, tmp_path / str(predict))
        written = {p.name for p in (tmp_path / str(predict) / "predictions").iterdir()}
        dev = {f"{t}-dev-output.csv" for t in ("sst", "para", "sts")}
        assert written == (dev | {f"{t}-test-output.csv" for t in ("sst", "para", "sts")}
                           if predict else dev)
        assert ("test" in caplog.text) == predict  # the test files are not even read
        caplog.clear()
    assert scores[True] == scores[False]


@pytest.mark.parametrize("heads", [("heads=separate", "heads.pair_regression.same_init=false"),
                                   ("heads=joint",)])
def test_scoring_in_length_order_gives_each_example_its_file_order_prediction(
        compose_cfg, data_root, tmp_path, heads):
    """`predict` cuts eval batches in order of length (less padding) and puts the predictions back
    in file order: example by example what batches in file order give (the real data: its
    sentences differ in length, the synthetic ones do not)."""
    from trainers.engine.evaluate import predict
    from trainers.engine.run import setup
    _, _, ctx = setup(compose_cfg(smoke_overrides(data_root, *heads,
                                                  "data.eval_batch_size=8", "data.limit_train=16",
                                                  "data.limit_eval=64")), tmp_path)
    ctx.model.eval()
    for task in ctx.tasks:
        data = ctx.data["dev"][task.name]
        lengths = [max(len(ids[i]) for ids, _ in data.segments) for i in range(len(data))]
        order = data.length_order().tolist()
        assert len(set(lengths)) > 1 and sorted(order) == list(range(len(data)))
        assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
        n = data.num_batches(8)
        with torch.inference_mode():
            want = torch.cat([task.predict(ctx.model(task.name, data.batch(i, 8)).float())
                              for i in range(n)]).numpy()
        if task.name == "sts":  # the untrained model's scores differ: a shuffle would show
            assert np.ptp(want) > 1e-3
        got = predict(ctx, task, data)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), task.name
        padded = [sum(batch(i, 8).attention_mask.numel() for i in range(n))
                  for batch in (data.batch, data.sorted_batch)]
        assert padded[1] < padded[0], task.name


def test_training_learns_the_synthetic_tasks(compose_cfg, synthetic_root, tmp_path):
    """Several epochs on data with an obvious signal must beat chance: the loop really trains."""
    cfg = compose_cfg(smoke_overrides(synthetic_root, "trainer.epochs=6", "heads=joint",
                                      "trainer.optimizer.lr=1e-3", "heads.dropout=0.0"))
    run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6
    assert metrics["dev/overall"] == max(h["dev/overall"] for h in history)  # best state restored
    assert metrics["para/dev/acc"] > 0.75 and metrics["sts/dev/pearson"] > 0.5


def test_sequential_order_and_one_persistent_optimizer(compose_cfg, synthetic_root, tmp_path,
                                                       monkeypatch, recorded_logger):
    recorder, made = recorded_logger, []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(1) or real_adamw(*a, **k))
    cfg = compose_cfg(smoke_overrides(synthetic_root, "order=sts-sst-para", "trainer.epochs=2",
                                      "data.limit_train=32"))
    run(cfg, tmp_path)
    epoch = ["sts"] * 2 + ["sst"] * 2 + ["para"] * 2  # 32 examples / batch 16 = 2 steps a task
    assert recorder.steps == epoch * 2
    assert len(made) == 1 and recorder.ok and "dev/overall" in recorder.summaries[0]


def test_nan_loss_stops_with_a_clear_error(compose_cfg, synthetic_root, tmp_path):
    cfg = compose_cfg(smoke_overrides(synthetic_root, "trainer.epochs=3",
                                      "trainer.optimizer.lr=1e30", "heads.dropout=0.0"))
    with pytest.raises(TrainingError) as e:
        run(cfg, tmp_path)
    msg = str(e.value)
    assert "loss became nan at epoch 1" in msg and "trainer.optimizer.lr" in msg
    assert "no best state yet" in msg


def test_nan_loss_after_an_epoch_keeps_the_best_state(compose_cfg, synthetic_root, tmp_path,
                                                      monkeypatch):
    """A loss that turns NaN in epoch 2 stops the run; epoch 1's state and scores stay on disk."""
    real_loss, calls = Task.loss, []

    def flaky_loss(task, logits, y):  # 3 SST steps an epoch: the 4th is in epoch 2
        loss = real_loss(task, logits, y)
        if task.name != "sst":
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(Task, "loss", flaky_loss)
    cfg = compose_cfg(smoke_overrides(synthetic_root, "trainer.epochs=3", "data.limit_train=48"))
    with pytest.raises(TrainingError, match="loss became nan at epoch 2") as e:
        run(cfg, tmp_path)
    assert "best state so far is kept in" in str(e.value)
    assert "heads.sst.out.weight" in load_file(str(tmp_path / "adapter.safetensors"))
    history = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]


def test_wandb_offline_logger_writes_a_local_run(compose_cfg, synthetic_root, tmp_path):
    overrides = [o for o in smoke_overrides(synthetic_root) if o != "logger=none"]
    cfg = compose_cfg(overrides + ["logger=wandb"])
    assert cfg.logger.mode == "offline"
    run(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _train(*args, cwd=REPO, env_extra=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_multirun_sweeps_orders(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    p = _train("-m", "order=sst-para-sts,para-sts-sst", *smoke_overrides(synthetic_root),
               "data.limit_train=32", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-2000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    orders = [(r.parent / ".hydra" / "overrides.yaml").read_text() for r in runs]
    assert "order=sst-para-sts" in orders[0] and "order=para-sts-sst" in orders[1]


def test_cli_bad_input_is_one_clear_line(tmp_path):
    p = _train(*smoke_overrides(tmp_path / "nowhere"), f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 1
    assert "error: data folder" in p.stderr and "does not exist" in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_unknown_choice_lists_valid_ones(tmp_path):
    p = _train("peft=lorax", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "Could not find 'peft/lorax'" in p.stderr and "none" in p.stderr


def test_throughput_counts_every_training_example_once(compose_cfg, synthetic_root, tmp_path):
    """`train/examples_per_s` is the examples the steps trained over the steps' time: two epochs
    of sequential training see every training example twice, and nothing else is counted."""
    from trainers.engine.loop import StopSignals, train
    from trainers.engine.run import cost_metrics, setup
    from trainers.engine.state import TrainState

    cfg = compose_cfg(smoke_overrides(synthetic_root, "trainer.epochs=2"))
    trainer, _, ctx = setup(cfg, tmp_path)
    state = TrainState()
    trainer.start(ctx, state)
    trainer.begin_phase(ctx, state, 0)
    with StopSignals() as stop:
        train(trainer, ctx, state, stop)
    examples, seconds = state.throughput
    assert examples == 2 * sum(len(d) for d in ctx.data["train"].values()) == 240
    assert cost_metrics(tmp_path, state)["train/examples_per_s"] == examples / seconds
