"""PiSSA (Meng et al., 2024), LoRA's `init=pissa` (`peft=pissa`), against peft's own
`LoraConfig(init_lora_weights="pissa")` on `transformers.BertModel` with the same base weights.

- The init is peft's: A = diag(√S_r) Vh_r and B = U_r diag(√S_r) from the SVD of W0 (S_r divided by
  the scale), the residual W_res = W0 - s B A in the base layer; the oracle computes its own.
- Hidden states and the gradients of A and B agree within 1e-4 at init and after the factors
  moved (copied into peft's), on the tiny model and on MiniLM; the oracle fails for LoRA's own
  init and for a wrong scale.
- Merging: merged equals unmerged, unmerge restores W_res bit for bit, and ΔW (what merges of
  experts and TIES/DARE read) is the update against W0: s (B A - B0 A0).
- Export: peft's conversion of a PiSSA adapter for the original weights, a LoRA of rank 2r
  (A' = [A; A0], B' = [B, -B0]), the tensors and config peft's own
  `save_pretrained(path_initial_model_for_weight_conversion=...)` writes, which
  `peft.PeftModel.from_pretrained` loads on the untouched transformers model with our outputs.
"""
from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from common.errors import ConfigError
from minbert.peft import adapter_layers, adapter_state_dict, merged, trainable_params
from minbert.peft.io import export_peft, load_adapter, save_adapter
from minbert.peft.lora import Lora, PissaLinear
from peft_cases import (PACKAGE, base_encoder, batch, hf_base, hf_module_name, hidden, loss,
                        model_ids, perturb)

ATOL = 1e-4  # the oracle's differences are printed (pytest -s)


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def ours(model: str, init: str = "pissa", alpha: float = 16.0, **kw):
    method = Lora(rank=8, alpha=alpha, targets="all_linear", init=init, **kw)
    return method, method.apply(base_encoder(model))


def peft_twin(model: str, encoder, init="pissa", **kw):
    targets = sorted(hf_module_name(n) for n, _ in adapter_layers(encoder))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                             init_lora_weights=init, **kw)
    return peft.get_peft_model(hf_base(model), config).eval()


def peft_layer(pm, name: str):
    return pm.base_model.model.get_submodule(hf_module_name(name))


def hf_hidden(out, b) -> torch.Tensor:
    return torch.cat([out.last_hidden_state[b["attention_mask"].bool()], out.pooler_output])


def differences(encoder, pm, nonzero: bool = True) -> dict[str, float]:
    """Max |ours - peft's| of the hidden states and of the gradients of every A and B (the
    gradients relative to max(1, |peft's|)); `nonzero`: every gradient of ours is."""
    b = batch()
    h, ref = hidden(encoder, b), hf_hidden(pm(**b), b)
    loss(h).backward()
    loss(ref).backward()
    grads = 0.0
    for name, p in trainable_params(encoder):
        module, _, leaf = name.rpartition(".")
        want = getattr(peft_layer(pm, module), leaf)["default"].weight.grad
        assert p.grad.abs().max() > 0 or not nonzero, f"{name}: no gradient"
        grads = max(grads, ((p.grad - want).abs().max() / max(1.0, want.abs().max())).item())
    return {"hidden": (h - ref).abs().max().item(), "grads": grads}


@model_ids
def test_init_is_peft_s(model):
    _, encoder = ours(model)
    pm = peft_twin(model, encoder)
    factors = 0.0
    for name, layer in adapter_layers(encoder):
        theirs = peft_layer(pm, name)
        assert isinstance(layer, PissaLinear)
        for mine, ref in ((layer.lora_A, theirs.lora_A["default"].weight),
                          (layer.lora_B, theirs.lora_B["default"].weight),
                          (layer.weight, theirs.base_layer.weight)):  # W_res
            factors = max(factors, (mine - ref).abs().max().item())
    assert factors < 1e-5
    diffs = differences(encoder, pm)
    print(f"\nPiSSA vs peft, {model}, at init: {diffs | {'factors': factors}}")
    assert diffs["hidden"] < ATOL and diffs["grads"] < ATOL


@model_ids
def test_moved_factors_match_peft(model):
    _, encoder = ours(model)
    pm = peft_twin(model, encoder)
    perturb(encoder)  # as training would move them
    with torch.no_grad():
        for name, p in trainable_params(encoder):
            module, _, leaf = name.rpartition(".")
            getattr(peft_layer(pm, module), leaf)["default"].weight.copy_(p)
        moved = (hidden(encoder, batch()) - hidden(base_encoder(model), batch())).abs().max()
    assert moved > 1e-3  # the adapter acts
    diffs = differences(encoder, pm)
    print(f"\nPiSSA vs peft, {model}, factors moved: {diffs}")
    assert diffs["hidden"] < ATOL and diffs["grads"] < ATOL


def test_the_oracle_fails_for_lora_s_init_and_a_wrong_scale():
    _, plain = ours("tiny", init="kaiming")
    pm = peft_twin("tiny", plain)
    assert differences(plain, pm, nonzero=False)["grads"] > 100 * ATOL  # B = 0: no gradient for A
    _, scaled = ours("tiny", alpha=8.0)  # S_r / s with the wrong s
    pm = peft_twin("tiny", scaled)
    layer, theirs = scaled.get_submodule("layers.0.attn.query"), None
    theirs = peft_layer(pm, "layers.0.attn.query").lora_A["default"].weight
    assert (layer.lora_A - theirs).abs().max() > 1e-2
    assert differences(scaled, pm)["grads"] > 10 * ATOL


def test_fast_svd_and_bad_inits():
    method, encoder = ours("tiny", init="pissa_niter_4")
    _, exact = ours("tiny")
    b = batch()
    with torch.no_grad():  # the fast SVD is another factorisation of W0, the model the same
        assert (hidden(encoder, b) - hidden(base_encoder("tiny"), b)).abs().max() < 1e-5
    a, e = encoder.get_submodule("layers.0.ffn.up"), exact.get_submodule("layers.0.ffn.up")
    assert not torch.equal(a.lora_A, e.lora_A)  # another factorisation (a random spectrum here)
    again = ours("tiny", init="pissa_niter_4")[1].get_submodule("layers.0.ffn.up")
    assert torch.equal(again.lora_A, a.lora_A)  # seeded: a rebuilt model has the same residual
    for bad, message in (("svd", "init='svd'; use kaiming, pissa or pissa_niter_<n>"),
                         ("pissa_niter_x", "init='pissa_niter_x'; use kaiming")):
        with pytest.raises(ConfigError, match=message):
            Lora(init=bad)
    from minbert.peft.dora import Dora

    with pytest.raises(ConfigError, match="init='pissa' is LoRA's .*peft=dora"):
        Dora(init="pissa")


def test_pissa_merges_against_w0_and_round_trips():
    _, encoder = ours("tiny")
    w0 = {n: m.weight.clone() for n, m in base_encoder("tiny").named_modules()
          if isinstance(m, torch.nn.Linear)}
    perturb(encoder)
    b = batch()
    for name, layer in adapter_layers(encoder):
        init = layer.scaling * (layer.pissa_B0 @ layer.pissa_A0)
        assert (layer.weight + init - w0[name]).abs().max() < 1e-5  # W_res + s B0 A0 = W0
        update = layer.scaling * (layer.lora_B @ layer.lora_A) - init
        assert (layer.delta_weight() - update).abs().max() < 1e-6  # ΔW against W0
    residual = {n: m.weight.clone() for n, m in adapter_layers(encoder)}
    with torch.no_grad():
        unmerged = hidden(encoder, b)
        with merged(encoder):
            merged_out = hidden(encoder, b)
        assert (merged_out - unmerged).abs().max() < 1e-5
        assert torch.equal(hidden(encoder, b), unmerged)
    assert all(torch.equal(m.weight, residual[n]) for n, m in adapter_layers(encoder))
    layer = encoder.get_submodule("layers.1.ffn.down")  # a merge of experts gives ΔW against W0
    delta = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    layer.merge(delta)
    assert (layer.weight - (w0["layers.1.ffn.down"] + delta)).abs().max() < 1e-5
    layer.unmerge()
    assert torch.equal(layer.weight, residual["layers.1.ffn.down"])


def test_adapter_files_carry_the_initial_factors(tmp_path):
    _, encoder = ours("tiny")
    perturb(encoder)
    state = adapter_state_dict(encoder)
    assert {"layers.0.attn.query.pissa_A0", "layers.0.attn.query.pissa_B0"} <= set(state)
    assert not any(p.requires_grad for n, p in encoder.named_buffers())
    path = save_adapter(encoder, tmp_path / "a.safetensors", {"peft": {"name": "lora"}})
    _, fresh = ours("tiny")
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(hidden(fresh, batch()), hidden(encoder, batch()))


@pytest.mark.parametrize("model,rslora,bias", [("minilm", False, "none"), ("tiny", True, "none"),
                                              ("tiny", False, "all")])
def test_export_is_peft_s_conversion_and_loads_on_the_original_weights(model, rslora, bias,
                                                                      tmp_path):
    method, encoder = ours(model, rslora=rslora, bias=bias)
    pm = peft_twin(model, encoder, use_rslora=rslora, bias=bias)
    pm.peft_config["default"].init_lora_weights = True  # as peft's docs: save the init as LoRA
    pm.save_pretrained(str(tmp_path / "peft_init"))
    perturb(encoder)  # trained
    with torch.no_grad():
        for name, p in trainable_params(encoder):
            module, _, leaf = name.rpartition(".")
            if leaf in ("lora_A", "lora_B"):
                getattr(peft_layer(pm, module), leaf)["default"].weight.copy_(p)
    export_peft(encoder, method, tmp_path / "ours", base_model=PACKAGE)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    lora = {k for k in mine if ".lora_" in k}
    assert config["r"] == 16 and config["init_lora_weights"] is True
    assert all(mine[k].shape[0 if "lora_A" in k else 1] == 16 for k in lora)
    assert set(mine) - lora == ({k for k in mine if k.endswith(".bias")} if bias == "all" else set())
    if bias == "none":  # peft's conversion refuses trained biases (two adapters with a bias)
        pm.save_pretrained(str(tmp_path / "peft"),
                           path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
        theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (theirs["r"], theirs["lora_alpha"])
        ref = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        assert lora == set(ref)
        assert max((mine[k] - ref[k]).abs().max().item() for k in ref) < 1e-6

    loaded = peft.PeftModel.from_pretrained(hf_base(model), str(tmp_path / "ours")).eval()
    b = batch()
    with torch.no_grad():
        h, ref_h = hidden(encoder, b), hf_hidden(loaded(**b), b)
    assert (h - hidden(base_encoder(model), b)).abs().max() > 1e-3
    diff = (h - ref_h).abs().max().item()
    print(f"\nPiSSA export loaded by peft on the original {model} (rslora={rslora}, bias={bias}): "
          f"{diff}")
    assert diff < ATOL


def test_qlora_takes_pissa_s_init_on_its_quantized_residual():
    """QPiSSA (the paper's QLoRA variant): the residual, not W0, is stored in NF4."""
    from minbert.peft.qlora import Linear4bit, QLora

    encoder = QLora(init="pissa", targets="all_linear").apply(base_encoder("tiny"))
    layers = dict(adapter_layers(encoder))
    assert all(isinstance(m, PissaLinear) and isinstance(m.base_layer, Linear4bit)
               for m in layers.values())
    perturb(encoder)
    b = batch()
    with torch.no_grad():
        unmerged = hidden(encoder, b)
        with merged(encoder):
            assert (hidden(encoder, b) - unmerged).abs().max() < 1e-5
        assert torch.equal(hidden(encoder, b), unmerged)
