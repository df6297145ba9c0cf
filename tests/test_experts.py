"""The expert strategies end to end on the tiny model: Ensemble of Experts scores each task with its
own expert, FedAvg's merge is exactly Σ λ_i s B_i A_i in weight space, OrthoAda's blocks are
orthogonal and keep each task's update in its own subspace, `scripts/merge.py` re-merges saved
experts, and every trainer option runs and writes metrics.json."""
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, smoke_overrides
from minbert.errors import ConfigError
from minbert.peft import adapter_layers
from trainers.run import run

LAYER = "layers.0.attn.query"


def run_trainer(compose_cfg, root, out, *overrides):
    cfg = compose_cfg(smoke_overrides(root, "trainer.epochs=2", *overrides))
    run(cfg, out)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # as train.py's Hydra would
    return json.loads((out / "metrics.json").read_text())


def expert_delta(out, task, scaling):
    e = load_file(str(out / "experts" / f"{task}.safetensors"))
    return scaling * e[f"encoder.{LAYER}.lora_B"] @ e[f"encoder.{LAYER}.lora_A"]


def test_eoe_scores_each_task_with_its_own_best_expert(compose_cfg, synthetic_root, tmp_path):
    metrics = run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=eoe", "peft=lora")
    history = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    for key in ("sst/dev/acc", "para/dev/acc", "sts/dev/pearson"):
        best = max(h[key] for h in history if key in h)  # that expert's best epoch
        assert metrics[key] == pytest.approx(best, abs=1e-6)
    files = {p.name for p in (tmp_path / "experts").iterdir()}
    assert files == {"sst.safetensors", "para.safetensors", "sts.safetensors"}
    sst = load_file(str(tmp_path / "experts" / "sst.safetensors"))
    assert any(k.startswith("heads.sst.") for k in sst)
    assert not any(k.startswith(("heads.para.", "heads.sts.")) for k in sst)


def test_fedavg_merge_is_exact_in_weight_space(compose_cfg, synthetic_root, tmp_path):
    run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=fedavg", "peft=lora",
                "trainer.weights=[0.5,0.3,0.2]")
    s = 16 / 8  # conf/peft/lora.yaml: alpha / rank
    want = sum(w * expert_delta(tmp_path, t, s)
               for w, t in zip([0.5, 0.3, 0.2], ["sst", "para", "sts"]))
    merged = load_file(str(tmp_path / "merged.safetensors"))[f"encoder.{LAYER}.delta_weight"]
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-7)


def test_orthoada_blocks_are_orthogonal_and_the_merge_keeps_subspaces(compose_cfg, synthetic_root,
                                                                     tmp_path):
    run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=orthoada", "peft=lora")
    experts = {t: load_file(str(tmp_path / "experts" / f"{t}.safetensors"))
               for t in ("sst", "para", "sts")}
    Bs = {t: e[f"encoder.{LAYER}.lora_B"] for t, e in experts.items()}
    for i in Bs:
        for j in Bs:
            gram = Bs[i].T @ Bs[j]
            target = torch.eye(8) if i == j else torch.zeros(8, 8)
            torch.testing.assert_close(gram, target, atol=1e-5, rtol=0)
    merged = load_file(str(tmp_path / "merged.safetensors"))[f"encoder.{LAYER}.delta_weight"]
    for t, e in experts.items():  # B_iᵀ ΔW_merged = s A_i: the others vanish in i's subspace
        torch.testing.assert_close(Bs[t].T @ merged, 2.0 * e[f"encoder.{LAYER}.lora_A"],
                                   atol=1e-5, rtol=1e-4)
        assert e[f"encoder.{LAYER}.lora_A"].abs().sum() > 0  # A_i trained


def test_merge_script_re_merges_saved_experts(compose_cfg, synthetic_root, tmp_path):
    metrics = run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=fedavg", "peft=lora")
    def merge(*args):
        return subprocess.run([sys.executable, "scripts/merge.py", str(tmp_path), *args,
                               "--data-root", str(synthetic_root)], cwd=REPO,
                              capture_output=True, text=True)
    r = merge()
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "merges" / "linear.json").read_text())
    for key in ("sst/dev/acc", "para/dev/acc", "sts/dev/pearson"):  # the run's own merge back
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)
    r = merge("--method", "ties", "--density", "0.5")
    assert r.returncode == 0 and (tmp_path / "merges" / "ties.json").is_file()
    r = merge("--method", "ties")
    assert r.returncode == 1 and "needs the option(s) ['density']" in r.stderr


@pytest.mark.parametrize("overrides", [
    ["trainer=eoe", "peft=vera"],
    ["trainer=fedavg", "peft=none"],
    ["trainer=fedavg", "peft=dora", "trainer.merge=dare", "trainer.density=0.5"],
    ["trainer=single", "trainer.task=sts", "peft=lora"],
])
def test_every_expert_trainer_runs(compose_cfg, synthetic_root, tmp_path, overrides):
    metrics = run_trainer(compose_cfg, synthetic_root, tmp_path, *overrides)
    assert 0 < metrics["params/updated_pct"] <= 100 and "dev/overall" in metrics
    if "peft=none" in overrides:
        assert metrics["params/updated_pct"] == pytest.approx(100.0)  # three full copies


def test_expert_trainer_config_errors(compose_cfg, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match="trainer.merge=ties needs trainer.density"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=fedavg", "trainer.merge=ties")),
            tmp_path)
    with pytest.raises(ConfigError, match="orthoada needs LoRA adapters"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=orthoada", "peft=dora")),
            tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.task='qqp'; use one of"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=single", "trainer.task=qqp")),
            tmp_path)


@pytest.mark.parametrize("overrides", [
    ["trainer.sampler=temperature"],
    ["trainer.sampler=annealed"],
    ["trainer.sampler=round_robin", "trainer.pcgrad=true", "peft=lora"],
])
def test_interleaved_trainer_runs(compose_cfg, synthetic_root, tmp_path, overrides):
    metrics = run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=interleaved",
                          *overrides)
    assert {"sst/dev/acc", "para/dev/acc", "sts/dev/pearson", "dev/overall"} <= set(metrics)
    history = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    steps_per_epoch = 3 * 3  # 40 examples a task in batches of 16: 3 batches each
    want = 2 * steps_per_epoch
    assert history[-1]["step"] == want


def test_interleaved_sampler_errors(compose_cfg, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.sampler='uniform'; use one of"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=interleaved",
                                        "trainer.sampler=uniform")), tmp_path)


def test_expert_counts_match_the_reports_three_lora_experts(compose_cfg):
    """Three r=64 all-linear LoRA experts on bert-base (built on the meta device, no download)."""
    from minbert.model import BertConfig, BertModel
    from minbert.peft.lora import Lora
    from tasks.model import MultitaskModel
    from trainers.experts import expert_counts
    from trainers.run import build
    cfg = compose_cfg(["model=bert-base"])
    with torch.device("meta"):
        encoder = Lora(rank=64, targets="all_linear").apply(BertModel(BertConfig()))
        heads = {t: build(cfg.heads[t], t, hidden_size=768) for t in ("sst", "para", "sts")}
        model = MultitaskModel(encoder, heads, pooling="pooler")
    per_expert = 12 * (4 * 64 * 1536 + 2 * 64 * (768 + 3072))  # 10,616,832
    counts = expert_counts(model, per_expert, 3)
    head_params = sum(p.numel() for p in model.heads.parameters())
    assert counts["params/trainable"] == 3 * per_expert + head_params
    assert counts["params/total"] == 109_482_240 + 3 * per_expert + head_params
    assert round(counts["params/updated_pct"], 1) == 22.6  # the report: 22.8 %, with its heads
