"""Every PEFT method end to end: through sequential multi-task training on the tiny model, to
`metrics.json`, an adapter file that rebuilds the run's predictions on a fresh base model, and
(LoRA/DoRA) a peft export of the finished run."""
import json
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers
from hydra.utils import instantiate
from safetensors.torch import load_file

from conftest import REPO, smoke_overrides, trained_run
from minbert.checkpoint import minbert_to_hf_key
from common.errors import ConfigError
from minbert.peft import adapter_state_dict, param_counts
from minbert.peft.io import load_adapter, read_metadata
from tasks.registry import get_tasks
from trainers.engine.context import RunContext
from trainers.engine.evaluate import predict
from tasks.data import load_task_data
from trainers.engine.build import build, build_method, build_model, encode_data
from peft_cases import CONFIGS, FROZEN, FULL_PARAMETER, LORA_LAYERS, MERGEABLE, METHODS

# Every conf/peft method that trains part of the model (full fine-tuning and GaLore train it all:
# tests/test_resume.py and test_memory_methods.py run them), and what the capabilities it declares
# make of each strategy.
TRAINED = sorted(set(CONFIGS) - FULL_PARAMETER - FROZEN)  # frozen: test_frozen_encoder_...
NOT_MERGEABLE = set(CONFIGS) - MERGEABLE


def read_predictions(path) -> np.ndarray:
    """The values of a CS224N leaderboard file (`id , value` lines after a header)."""
    return np.array([float(line.split(" , ")[1]) for line in path.read_text().splitlines()[1:]])


def run_method(compose_cfg, root, out, method, *extra):
    return trained_run(root, out, f"peft={method}", "trainer.epochs=2", *extra)


@pytest.mark.parametrize("method", TRAINED)
def test_method_trains_end_to_end_and_its_adapter_rebuilds_the_run(compose_cfg, synthetic_root,
                                                                   tmp_path, method):
    cfg, metrics = run_method(compose_cfg, synthetic_root, tmp_path, method)
    tasks = get_tasks(list(cfg.tasks))
    fresh = build_model(cfg, tasks, build_method(cfg))
    counts = param_counts(fresh)
    assert metrics["params/trainable"] == counts["params/trainable"]
    assert metrics["params/updated_pct"] == pytest.approx(counts["params/updated_pct"])
    assert 0 < metrics["params/updated_pct"] < 50
    assert metrics["memory/trainable_param_bytes"] == 4 * counts["params/trainable"]
    assert 0 < metrics["memory/optimizer_state_bytes"] < 3 * metrics["memory/trainable_param_bytes"]

    state = load_file(str(tmp_path / "adapter.safetensors"))
    full = sum(t.numel() for t in fresh.state_dict().values())
    assert sum(t.numel() for t in state.values()) < full / 5  # adapters and heads, not W0
    init = adapter_state_dict(fresh)
    assert any(not torch.equal(state[k], init[k]) for k in state if k.startswith("encoder."))
    meta = json.loads(read_metadata(tmp_path / "adapter.safetensors")["peft"])
    assert meta["name"] == METHODS[method]().name

    load_adapter(fresh, tmp_path / "adapter.safetensors")  # one base model, many adapters
    raw = load_task_data(tasks, synthetic_root, None, None)
    data = encode_data(cfg, fresh, raw)
    ctx = RunContext.for_scoring(fresh, tasks, data, tmp_path, eval_batch_size=128)
    for task in tasks:
        want = read_predictions(tmp_path / "predictions" / f"{task.name}-dev-output.csv")
        got = predict(ctx, task, data["dev"][task.name])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_merged_and_unmerged_evaluation_agree(compose_cfg, synthetic_root, tmp_path):
    _, merged = run_method(compose_cfg, synthetic_root, tmp_path / "a", "dora")
    _, unmerged = run_method(compose_cfg, synthetic_root, tmp_path / "b", "dora",
                             "peft.merge_eval=false")
    for key in ("sst/dev/acc", "para/dev/acc"):
        assert merged[key] == unmerged[key]
    assert merged["sts/dev/pearson"] == pytest.approx(unmerged["sts/dev/pearson"], abs=1e-5)


def test_the_peft_lr_sets_the_optimizer_lr_unless_overridden(compose_cfg):
    assert compose_cfg(["peft=lora"]).trainer.optimizer.lr == 1.5e-3
    assert compose_cfg(["peft=none"]).trainer.optimizer.lr == 1e-5
    cfg = compose_cfg(["peft=lora", "trainer.optimizer.lr=3e-3"])
    assert cfg.trainer.optimizer.lr == 3e-3


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_export_script_writes_an_adapter_peft_loads(compose_cfg, synthetic_root, tmp_path, method):
    cfg, _ = run_method(compose_cfg, synthetic_root, tmp_path / "run", method,
                        "peft.targets=all_linear", "peft.bias=all")
    out = tmp_path / "export"
    subprocess.run([sys.executable, "scripts/export_peft.py", str(tmp_path / "run"), str(out)],
                   cwd=REPO, check=True, capture_output=True)
    ours = build_model(cfg, get_tasks(list(cfg.tasks)), build_method(cfg)).eval()
    load_adapter(ours, tmp_path / "run" / "adapter.safetensors")
    hf = transformers.BertModel(transformers.BertConfig(**{
        k: getattr(ours.encoder.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "intermediate_size",
                                                     "max_position_embeddings")}))
    base = build(cfg.model.encoder, "model.encoder")  # the tiny run's base weights (seeded)
    hf.load_state_dict({minbert_to_hf_key(k): v for k, v in base.state_dict().items()})
    pm = peft.PeftModel.from_pretrained(hf.eval(), str(out)).eval()
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = ours.encoder(ids, mask).last_hidden_state
        b = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b).abs().max() < 1e-4
    assert set(load_file(str(out / "minbert_heads.safetensors"))) >= {"sst.out.weight"}


def test_export_script_reports_a_missing_run(tmp_path):
    r = subprocess.run([sys.executable, "scripts/export_peft.py", str(tmp_path), str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "config.yaml not found: pass the folder of a run" in r.stderr


@pytest.mark.parametrize("override,message", [
    ("peft.rank=0", "error: peft: rank=0 must be a positive integer"),
    ("peft.targets=qkv", "error: peft: targets='qkv' is not a preset"),
])
def test_bad_peft_options_fail_with_one_line(synthetic_root, override, message):
    r = subprocess.run([sys.executable, "train.py", *smoke_overrides(synthetic_root, "peft=lora"),
                        override], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("trainer", ["single", "interleaved", "eoe", "fedavg", "orthoada"])
def test_every_strategy_runs_the_method_or_refuses_it_before_training(synthetic_root, tmp_path,
                                                                     method, trainer):
    overrides = [f"peft={method}", f"trainer={trainer}"]
    refused = (trainer == "orthoada" and method not in LORA_LAYERS) or (
        trainer in ("fedavg", "orthoada") and method in NOT_MERGEABLE)
    if refused:
        why = ("merges in weight space, which" if method in NOT_MERGEABLE
               else "trainer=orthoada needs LoRA adapters")
        with pytest.raises(ConfigError, match=why):
            trained_run(synthetic_root, tmp_path, *overrides)
        assert not (tmp_path / "history.jsonl").exists()  # refused before any training
        return
    _, metrics = trained_run(synthetic_root, tmp_path, *overrides)
    assert 0 < metrics["params/updated_pct"] < 100 and 0 <= metrics["dev/overall"] <= 1


def test_frozen_encoder_trains_only_the_heads(synthetic_root, tmp_path):
    """peft=frozen, the heads-only baseline: the run counts only the heads as trained, saves only
    them (moved from their init), and a fresh pretrained encoder with them rebuilds the run's
    predictions: the encoder it scored with was the pretrained one."""
    cfg, metrics = trained_run(synthetic_root, tmp_path, "peft=frozen", "trainer=interleaved")
    tasks = get_tasks(list(cfg.tasks))
    fresh = build_model(cfg, tasks, build_method(cfg))
    init = fresh.state_dict()
    assert metrics["params/trainable"] == sum(p.numel() for p in fresh.heads.parameters())
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert saved and all(k.startswith("heads.") for k in saved)
    assert any(not torch.equal(saved[k], init[k]) for k in saved)
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    data = encode_data(cfg, fresh, load_task_data(tasks, synthetic_root, None, None))
    ctx = RunContext.for_scoring(fresh, tasks, data, tmp_path, eval_batch_size=128)
    for task in tasks:
        want = read_predictions(tmp_path / "predictions" / f"{task.name}-dev-output.csv")
        np.testing.assert_allclose(predict(ctx, task, data["dev"][task.name]), want, atol=1e-5)


@pytest.mark.parametrize("overrides, heads_lr", [
    (["peft.lr=3e-4"], None),  # heads at head_lr=1e-3, peft.lr set nothing: refused
    (["peft.lr=3e-4", "trainer.head_lr=null"], 3e-4),
    (["peft.lr=3e-4", "trainer.head_lr=3e-4"], 3e-4),
    ([], 1e-3)])
def test_a_frozen_encoder_s_heads_learn_at_one_lr_or_the_conflict_is_named(compose_cfg, overrides,
                                                                           heads_lr):
    """With nothing of the encoder training, trainer.head_lr is the heads' lr: a different
    peft.lr would be silently ignored, so it is refused; head_lr=null hands them peft.lr."""
    from trainers.engine.optim import build_optimizer

    cfg = compose_cfg(["peft=frozen", "trainer=interleaved", "model=tiny", *overrides])
    method = build_method(cfg)
    model = build_model(cfg, get_tasks(list(cfg.tasks)), method)
    partial = instantiate(cfg.trainer.optimizer)
    if heads_lr is None:
        with pytest.raises(ConfigError, match=r"head_lr=0.001, so trainer.optimizer.lr=0.0003 "
                                              r"\(peft.lr\) would set nothing"):
            build_optimizer(partial, model, cfg.trainer.head_lr, method)
        return
    optimizer = build_optimizer(partial, model, cfg.trainer.head_lr, method)
    assert [g["lr"] for g in optimizer.param_groups] == [heads_lr]


def test_frozen_encoder_merges_as_a_zero_update(synthetic_root, tmp_path):
    """FedAvg over three heads-only experts: nothing of the encoder to merge, and it says so by
    saving no encoder tensor; the run finishes."""
    _, metrics = trained_run(synthetic_root, tmp_path, "peft=frozen", "trainer=fedavg")
    assert not load_file(str(tmp_path / "merged.safetensors")) and 0 <= metrics["dev/overall"] <= 1
