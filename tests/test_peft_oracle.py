"""The oracle: every method against `peft` on `transformers.BertModel` with the same base weights.

Our adapter tensors are copied into peft's, module by module (not through our export code), then
the hidden states and the gradients of every trainable tensor must agree within 1e-4. VeRA's shared
projections must come out of the same seed identical to peft's. A layer-level test checks DoRA's
and LoRA's dropout path in training, where peft and the DoRA authors feed the dropped input to both
the rescaled base term and the LoRA term. Export is checked by loading our files with
`peft.PeftModel.from_pretrained`.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

from minbert.checkpoint import minbert_to_hf_key
from minbert.peft import adapter_layers, trainable_params
from minbert.peft.dora import DoraLinear
from minbert.peft.io import export_peft
from minbert.peft.lora import LoraLinear
from minbert.peft.vera import Vera
from peft_cases import (METHODS, PACKAGE, base_encoder, batch, hf_base, hf_module_name,
                        hidden, lora_family_ids, loss, model_ids, perturb)

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def peft_config(method, targets: list[str]):
    if isinstance(method, Vera):
        return peft.VeraConfig(r=method.rank, target_modules=targets, d_initial=method.d_initial,
                               projection_prng_key=method.seed, save_projection=True)
    return peft.LoraConfig(r=method.rank, lora_alpha=method.alpha, target_modules=targets,
                           use_rslora=method.rslora, bias=method.bias, lora_dropout=0.0,
                           use_dora=method.name == "dora")


def peft_tensor(pm, name: str) -> torch.Tensor:
    """peft's counterpart of our parameter `name` (e.g. `layers.0.attn.query.lora_A`)."""
    module, _, leaf = name.rpartition(".")
    m = pm.base_model.model.get_submodule(hf_module_name(module))
    return {"lora_A": lambda: m.lora_A["default"].weight,
            "lora_B": lambda: m.lora_B["default"].weight,
            "magnitude": lambda: m.lora_magnitude_vector["default"].weight,
            "lambda_b": lambda: m.vera_lambda_b["default"],
            "lambda_d": lambda: m.vera_lambda_d["default"],
            }.get(leaf, lambda: getattr(getattr(m, "base_layer", m), leaf))()


def twins(method_name: str, model: str):
    """(ours, peft's) with identical, perturbed adapter weights."""
    method = METHODS[method_name]()
    ours = method.apply(base_encoder(model))
    targets = sorted(hf_module_name(n) for n, _ in adapter_layers(ours))
    pm = peft.get_peft_model(hf_base(model), peft_config(method, targets)).eval()
    if method_name == "lora_fa":
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    perturb(ours)
    with torch.no_grad():
        for name, p in trainable_params(ours):
            peft_tensor(pm, name).copy_(p)
        for name, layer in adapter_layers(ours):
            if isinstance(layer, LoraLinear) and not layer.lora_A.requires_grad:
                peft_tensor(pm, f"{name}.lora_A").copy_(layer.lora_A)
    return ours, pm


def test_vera_projections_are_peft_s_for_the_same_seed():
    method = METHODS["vera"]()
    ours = method.apply(base_encoder("tiny"))
    targets = sorted(hf_module_name(n) for n, _ in adapter_layers(ours))
    pm = peft.get_peft_model(hf_base("tiny"), peft_config(method, targets))
    assert torch.equal(ours.vera.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(ours.vera.vera_B, pm.base_model.vera_B["default"])
    layer = ours.get_submodule("layers.0.attn.query")
    peft_layer = pm.base_model.model.get_submodule(hf_module_name("layers.0.attn.query"))
    assert torch.equal(layer.lambda_d, peft_layer.vera_lambda_d["default"])
    assert torch.equal(layer.lambda_b, peft_layer.vera_lambda_b["default"])


@lora_family_ids
@model_ids
def test_hidden_states_and_gradients_match_peft(method, model):
    ours, pm = twins(method, model)
    assert {n for n, _ in trainable_params(ours)}.__len__() == sum(
        1 for _, p in pm.named_parameters() if p.requires_grad)
    b = batch()
    h_ours = hidden(ours, b)
    out = pm(**b)
    h_peft = torch.cat([out.last_hidden_state[b["attention_mask"].bool()], out.pooler_output])
    assert (h_ours - hidden(base_encoder(model), b)).abs().max() > 1e-3  # the adapter acts
    assert (h_ours - h_peft).abs().max() < ATOL
    loss(h_ours).backward()
    loss(h_peft).backward()
    for name, p in trainable_params(ours):
        ref = peft_tensor(pm, name).grad
        scale = max(1.0, ref.abs().max().item())
        assert (p.grad - ref).abs().max() < ATOL * scale, f"{name}: gradients differ"
        assert p.grad.abs().max() > 0, f"{name}: no gradient"


class FixedMask(nn.Module):
    """A dropout with a fixed mask, so that ours and peft drop the same inputs."""

    def __init__(self, shape, p=0.5):
        super().__init__()
        self.mask = (torch.rand(shape, generator=torch.Generator().manual_seed(5)) > p) / (1 - p)

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_matches_peft_layer(dora):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("lin", nn.Linear(16, 8))
    ours_cls = DoraLinear if dora else LoraLinear
    ours = ours_cls(nn.Linear(16, 8), rank=4, scaling=2.0, dropout=0.5).train()
    ours.weight.data.copy_(net.lin.weight)
    ours.bias.data.copy_(net.lin.bias)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"],
                                                  lora_dropout=0.5, use_dora=dora)).train()
    layer = pm.base_model.model.lin
    perturb(ours)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        if dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    ours.dropout = layer.lora_dropout["default"] = FixedMask((5, 16))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    y_ours, y_peft = ours(x), pm(x)
    assert (y_ours - y_peft).abs().max() < 1e-5
    undropped = copy.deepcopy(ours)
    undropped.dropout = nn.Identity()
    assert (y_ours - undropped(x)).abs().max() > 1e-3  # the dropout path really ran
    y_ours.pow(2).sum().backward()
    y_peft.pow(2).sum().backward()
    assert torch.allclose(ours.lora_A.grad, layer.lora_A["default"].weight.grad, atol=1e-5)
    assert torch.allclose(ours.lora_B.grad, layer.lora_B["default"].weight.grad, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora_all_bias_rs", "lora_fa", "dora"])
def test_exported_adapter_loads_in_peft_with_the_same_outputs(method, tmp_path):
    ours = METHODS[method]().apply(base_encoder("minilm"))
    perturb(ours)
    export_peft(ours, METHODS[method](), tmp_path, base_model=PACKAGE)
    pm = peft.PeftModel.from_pretrained(hf_base("minilm"), str(tmp_path)).eval()
    b = batch()
    with torch.no_grad():
        h_ours = hidden(ours, b)
        out = pm(**b)
    h_peft = torch.cat([out.last_hidden_state[b["attention_mask"].bool()], out.pooler_output])
    assert (h_ours - hidden(base_encoder("minilm"), b)).abs().max() > 1e-3
    assert (h_ours - h_peft).abs().max() < ATOL


def test_export_refuses_vera(tmp_path):
    from common.errors import CheckpointError
    ours = METHODS["vera"]().apply(base_encoder("tiny"))
    with pytest.raises(CheckpointError, match="peft=vera has no peft format to export to"):
        export_peft(ours, METHODS["vera"](), tmp_path)
