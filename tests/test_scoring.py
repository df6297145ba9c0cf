"""Dev scored inside epochs (`trainer.eval_every_n_steps`) and early stopping (`trainer.patience`):
the evaluations land in history.jsonl at the right steps, the best of them is the state the run
ends with, scoring leaves training exactly as it would have been without it (eval mode, merged
adapters and the generators all put back), and a run out of patience stops, saying so in the
history and the log. Resuming such runs bit-identically is in test_resume's matrix."""
from __future__ import annotations

import json
import logging

import pytest
from safetensors import safe_open

from conftest import compose_config, smoke_overrides, trained_run
from common.errors import ConfigError
from trainers.engine.run import run

# 40 synthetic examples a task, batch 16: 3 batches a task, 9 steps an epoch (sequential)
COMMON = ("peft=lora", "trainer.epochs=2", "trainer.optimizer.lr=1e-2", "heads=joint")


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_dev_is_scored_every_n_steps_and_the_best_evaluation_is_kept(synthetic_root, tmp_path):
    _, metrics = trained_run(synthetic_root, tmp_path, *COMMON, "trainer.eval_every_n_steps=2")
    rows = history(tmp_path)
    assert [(r["epoch"], r["step"]) for r in rows if "epoch_step" in r] == [
        (1, 2), (1, 4), (1, 6), (1, 8), (2, 10), (2, 12), (2, 14), (2, 16)]
    assert [r["step"] for r in rows if "epoch_step" not in r] == [9, 18]  # the epoch ends
    best = max(rows, key=lambda r: r["dev/overall"])
    assert metrics["dev/overall"] == best["dev/overall"]  # the run ends on the best state
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (json.loads(meta["step"]), json.loads(meta["epoch"])) == (best["step"], best["epoch"])


def test_scoring_inside_epochs_leaves_training_as_it_was(synthetic_root, tmp_path):
    """LoRA merges for scoring and unmerges after, the model goes to eval mode and back: the
    epoch ends of a run that also scores every 2 steps equal those of one that does not."""
    trained_run(synthetic_root, tmp_path / "plain", *COMMON)
    trained_run(synthetic_root, tmp_path / "often", *COMMON, "trainer.eval_every_n_steps=2")
    ends = [r for r in history(tmp_path / "often") if "epoch_step" not in r]
    assert ends == history(tmp_path / "plain")


def test_a_run_out_of_patience_stops_and_says_so(synthetic_root, tmp_path, caplog):
    """lr 0: dev never improves after the first evaluation, so patience 2 stops the run at the
    third evaluation, step 6 of 18."""
    caplog.set_level(logging.INFO, logger="trainers.engine.scoring")
    _, metrics = trained_run(synthetic_root, tmp_path, "trainer.epochs=2",
                             "trainer.optimizer.lr=0.0", "trainer.head_lr=0.0",
                             "trainer.eval_every_n_steps=2", "trainer.patience=2")
    rows = history(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6, 6]
    stop = rows[-1]
    assert stop["event"] == "early_stop" and stop["patience"] == 2
    assert (stop["best_step"], stop["best_score"]) == (2, rows[0]["dev/overall"])
    assert "early stopping the run at epoch 1, step 6" in caplog.text
    assert metrics["dev/overall"] == rows[0]["dev/overall"]
    assert (tmp_path / "training.png").is_file()


def test_patience_counts_epoch_ends_without_eval_every(synthetic_root, tmp_path):
    trained_run(synthetic_root, tmp_path, "trainer.epochs=4", "trainer.optimizer.lr=0.0",
                "trainer.head_lr=0.0", "trainer.patience=1")
    assert [r.get("event") for r in history(tmp_path)] == [None, None, "early_stop"]


def test_experts_each_stop_on_their_own(synthetic_root, tmp_path):
    """Ensemble of experts: patience ends one expert's phase, and the next expert starts with
    its own count."""
    trained_run(synthetic_root, tmp_path, "trainer=eoe", "peft=lora", "trainer.epochs=3",
                "trainer.optimizer.lr=0.0", "trainer.head_lr=0.0", "trainer.patience=1")
    stops = [r["expert"] for r in history(tmp_path) if r.get("event") == "early_stop"]
    assert stops == ["sst", "para", "sts"]


@pytest.mark.parametrize("override", ["trainer.eval_every_n_steps=0", "trainer.patience=-1",
                                      "trainer.patience=1.5"])
def test_bad_values_are_config_errors(synthetic_root, tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* must be a whole number"):
        run(compose_config(smoke_overrides(synthetic_root, override)), tmp_path)
