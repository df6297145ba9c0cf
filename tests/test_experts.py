"""The expert strategies end to end on the tiny model: Ensemble of Experts scores each task with its
own expert, FedAvg's merge is exactly Σ λ_i s B_i A_i in weight space, OrthoAda's blocks are
orthogonal and keep each task's update in its own subspace, `scripts/merge.py` re-merges saved
experts, and every trainer option runs and writes metrics.json."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, smoke_overrides, trained_run
from common.errors import ConfigError
from minbert.peft import adapter_layers, merge
from minbert.peft.io import read_metadata
from minbert.peft.layer import replace_module
from minbert.peft.lora import Lora, LoraLinear
from tasks.registry import get_tasks
from trainers.strategies.experts import encoder_state, merge_experts
from trainers.engine.build import build_model
from trainers.engine.loop import fit
from trainers.engine.run import run, setup

LAYER = "layers.0.attn.query"


def run_trainer(compose_cfg, root, out, *overrides):
    return trained_run(root, out, "trainer.epochs=2", *overrides)[1]


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
    assert files == {"init.safetensors", "sst.safetensors", "para.safetensors", "sts.safetensors"}
    sst = load_file(str(tmp_path / "experts" / "sst.safetensors"))
    assert any(k.startswith("heads.sst.") for k in sst)
    assert not any(k.startswith(("heads.para.", "heads.sts.")) for k in sst)


def test_fedavg_merge_is_exact_in_weight_space(compose_cfg, synthetic_root, tmp_path):
    run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=fedavg", "peft=lora",
                "trainer.finisher.weights=[0.5,0.3,0.2]")
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
    r = merge("--method", "ties")  # TIES's published default: keep the top 20 %
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "merges" / "ties.json").read_text())["density"] == 0.2
    r = merge("--method", "linear", "--density", "0.5")
    assert r.returncode == 1 and "merge 'linear' takes no option ['density']" in r.stderr


@pytest.mark.parametrize("overrides", [
    ["trainer=eoe", "peft=vera"],
    ["trainer=fedavg", "peft=none"],
    ["trainer=fedavg", "peft=dora", "trainer.finisher.merge=dare", "trainer.finisher.density=0.5"],
    ["trainer=single", "trainer.task=sts", "peft=lora"],
    ["trainer=ties", "peft=lora"],
])
def test_every_expert_trainer_runs(compose_cfg, synthetic_root, tmp_path, overrides):
    metrics = run_trainer(compose_cfg, synthetic_root, tmp_path, *overrides)
    assert 0 < metrics["params/updated_pct"] <= 100 and "dev/overall" in metrics
    if "peft=none" in overrides:
        assert metrics["params/updated_pct"] == pytest.approx(100.0)  # three full copies


def test_expert_trainer_config_errors(compose_cfg, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.finisher.merge=linear: merge 'linear' takes no option "
                                          r"\['density'\]"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=fedavg", "trainer.finisher.density=0.3")),
            tmp_path)
    with pytest.raises(ConfigError, match="orthoada needs LoRA adapters"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=orthoada", "peft=dora")),
            tmp_path)
    with pytest.raises(ConfigError, match=r"no task 'qqp'.*the tasks there are \['cfimdb', 'nli', 'para', 'sst', 'sts'\]"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=single", "trainer.task=qqp")),
            tmp_path)


@pytest.mark.parametrize("overrides", [
    ["trainer.schedule.sampler=temperature"],
    ["trainer.schedule.sampler=annealed"],
    ["trainer.schedule.sampler=round_robin", "trainer.combiner=pcgrad", "peft=lora"],
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
    with pytest.raises(ConfigError, match=r"trainer.schedule.sampler='uniform'; use one of"):
        run(compose_cfg(smoke_overrides(synthetic_root, "trainer=interleaved",
                                        "trainer.schedule.sampler=uniform")), tmp_path)


def test_expert_counts_match_the_reports_three_lora_experts(compose_cfg):
    """Three r=64 all-linear LoRA experts on bert-base (built on the meta device, no download)."""
    from minbert.model import BertConfig, BertModel
    from minbert.peft.lora import Lora
    from tasks.model import MultitaskModel
    from trainers.strategies.experts import expert_counts
    from trainers.engine.build import build_head
    cfg = compose_cfg(["model=bert-base"])
    with torch.device("meta"):
        encoder = Lora(rank=64, targets="all_linear").apply(BertModel(BertConfig()))
        heads = {t.name: build_head(cfg, t, 768) for t in get_tasks(["sst", "para", "sts"])}
        model = MultitaskModel(encoder, heads, pooling="pooler")
    per_expert = 12 * (4 * 64 * 1536 + 2 * 64 * (768 + 3072))  # 10,616,832
    counts = expert_counts(model, per_expert, 3)
    head_params = sum(p.numel() for p in model.heads.parameters())
    assert counts["params/trainable"] == 3 * per_expert + head_params
    assert counts["params/total"] == 109_482_240 + 3 * per_expert + head_params
    assert round(counts["params/updated_pct"], 1) == 22.6  # the report: 22.8 %, with its heads


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def fitted(compose_cfg, root, tmp_path, *overrides):
    """(the run context, the FitResult, the model's state before training) of a smoke run."""
    trainer, _, ctx = setup(compose_cfg(smoke_overrides(root, *overrides)), tmp_path)
    before = snapshot(ctx.model)
    return ctx, fit(trainer, ctx), before


def test_eoe_experts_are_loaded_only_inside_their_context(compose_cfg, synthetic_root, tmp_path):
    """The expert context restores the model on exit: after a run the model holds the initial
    state, not silently the last expert."""
    ctx, result, before = fitted(compose_cfg, synthetic_root, tmp_path, "trainer=eoe", "peft=lora")
    assert_same(snapshot(ctx.model), before)
    for task in ("sts", "sst"):
        expert = load_file(str(tmp_path / "experts" / f"{task}.safetensors"))
        with result.weights(task):
            for name, t in expert.items():
                assert torch.equal(ctx.model.state_dict()[name], t), name
        assert_same(snapshot(ctx.model), before)


def test_fedavg_leaves_no_layer_merged_and_a_later_merge_works(compose_cfg, synthetic_root,
                                                              tmp_path):
    ctx, result, before = fitted(compose_cfg, synthetic_root, tmp_path, "trainer=fedavg",
                                 "peft=lora")
    layers = dict(adapter_layers(ctx.model.encoder))
    assert not any(m.merged for m in layers.values())
    assert_same(snapshot(ctx.model), before)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    with result.weights("sst"):  # W0 + the merged ΔW, in every layer
        layer = layers[LAYER]
        assert layer.merged
        torch.testing.assert_close(layer.weight, before[f"encoder.{LAYER}.base_layer.weight"]
                                   + merged[f"encoder.{LAYER}.delta_weight"])
    assert not any(m.merged for m in layers.values())
    assert_same(snapshot(ctx.model), before)
    with torch.no_grad():
        layers[LAYER].lora_B.fill_(0.5)
    merge(ctx.model)  # the layer's own update folds in, as it would in any other run
    torch.testing.assert_close(layers[LAYER].weight, before[f"encoder.{LAYER}.base_layer.weight"]
                               + layers[LAYER].delta_weight())


class ExtraLora(LoraLinear):
    """LoRA with one more trained tensor that is not part of ΔW (a per-layer output shift)."""

    adapter_tensors = ("lora_A", "lora_B", "shift")
    delta_names = ("lora_A", "lora_B")

    def __init__(self, base):
        super().__init__(base, rank=2, scaling=1.0)
        self.shift = torch.nn.Parameter(torch.zeros(()))


def test_a_merge_handles_every_trained_tensor(compose_cfg):
    """Tensors a method declares outside ΔW merge as task vectors: two experts whose extra tensor
    is 1 and 3 merge (linear, 1/2 each) to 2, not back to the initial 0."""
    cfg = compose_cfg(["model=tiny"])
    model = build_model(cfg, get_tasks(["sst"]), Lora(rank=2, targets=["layers.0.attn.query"]))
    replace_module(model.encoder, LAYER, ExtraLora(model.encoder.get_submodule(LAYER).base_layer))
    init = encoder_state(model)
    experts = []
    for value in (1.0, 3.0):
        state = dict(init)
        state[f"encoder.{LAYER}.shift"] = torch.tensor(value)
        state[f"encoder.{LAYER}.lora_B"] = torch.full_like(init[f"encoder.{LAYER}.lora_B"], value)
        experts.append(state)
    merged = merge_experts(model, init, experts, "linear", [0.5, 0.5], {})
    assert merged[f"encoder.{LAYER}.shift"] == 2.0  # a task vector: 0 + (1 + 3) / 2
    want = 0.5 * sum(v * torch.ones(64, 2) @ init[f"encoder.{LAYER}.lora_A"] for v in (1, 3))
    torch.testing.assert_close(merged[f"encoder.{LAYER}.delta_weight"], want)


@pytest.mark.parametrize("merge_name,density", [("ties", 0.2), ("dare", 0.1)])
def test_ties_and_dare_take_the_published_density(compose_cfg, synthetic_root, tmp_path,
                                                  merge_name, density):
    run_trainer(compose_cfg, synthetic_root, tmp_path, "trainer=fedavg", "peft=lora",
                f"trainer.finisher.merge={merge_name}")
    meta = read_metadata(tmp_path / "merged.safetensors")
    assert meta["merge"] == merge_name and json.loads(meta["density"]) == density
