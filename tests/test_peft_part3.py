"""Oracles for the methods beyond a fixed-rank LoRA, each against an independent reference on
`transformers.BertModel` (hidden states and gradients within 1e-4), each shown to fail when
the reference is wrong:

- AdaLoRA against peft's AdaLoRA: forward, gradients (the orthogonality penalty included: peft
  adds it to a loss the model returns, so the reference returns one), and the singular-value masks
  after several rank-allocation steps.
- DyLoRA at every fixed rank b against peft's LoRA with r = b and the same α on the truncated
  factors, and its "frozen" mode's gradients (only the b-th row and column).
- Hydra against transformers run with the merged weights W0 + A_up A_down + B_up B_down W0 through
  `torch.func.functional_call` (outputs and gradients); its parallel branch alone is peft's LoRA.
- DVoRA against the merged weights m (W0 + ΔV) / ‖W0 + ΔV‖, ΔV our peft-checked VeRA delta.
"""
from __future__ import annotations

import peft
import pytest
import torch
import transformers
from torch.func import functional_call

from minbert.checkpoint import minbert_to_hf_key
from minbert.peft import adapter_layers, trainable_params
from minbert.peft.adalora import AdaLora
from minbert.peft.dylora import DyLora
from common.errors import ConfigError
from minbert.peft.hydra import Hydra
from peft_cases import base_encoder, batch, hf_base, hf_module_name, hidden, loss, model_ids, perturb

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def hf_hidden(out, b) -> torch.Tensor:
    return torch.cat([out.last_hidden_state[b["attention_mask"].bool()], out.pooler_output])


def assert_grads(ours: dict, theirs: dict) -> None:
    for name, p in ours.items():
        want = theirs[name]
        scale = max(1.0, want.abs().max().item())
        assert (p.grad - want).abs().max() < ATOL * scale, f"{name}: gradients differ"


# ---- AdaLoRA -------------------------------------------------------------------------------------
ADA = dict(init_r=6, target_r=2, alpha=8, tinit=2, tfinal=3, deltaT=2, orth_reg_weight=0.5)
TOTAL = 12


def adalora_twins(model: str):
    method = AdaLora(targets="attn_qv", **ADA)
    ours = method.apply(base_encoder(model)).eval()  # no dropout: both see the same function
    perturb(ours)
    layers = dict(adapter_layers(ours))
    config = peft.AdaLoraConfig(target_modules=[hf_module_name(n) for n in layers],
                                init_r=6, target_r=2, lora_alpha=8, tinit=2, tfinal=3, deltaT=2,
                                total_step=TOTAL, orth_reg_weight=0.5, lora_dropout=0.0)
    pm = peft.get_peft_model(hf_base(model), config).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = pm.base_model.model.get_submodule(hf_module_name(name))
            for leaf in ("lora_A", "lora_E", "lora_B"):
                getattr(theirs, leaf)["default"].copy_(getattr(layer, leaf))

    bert = pm.base_model.model
    forward = bert.forward

    def with_loss(**kwargs):  # peft adds its penalty only to a loss the model returns
        out = forward(**kwargs)
        out["loss"] = loss(hf_hidden(out, kwargs))
        return out

    bert.forward = with_loss  # AdaLoraModel calls model.forward itself, past any hook
    return method, ours, pm, layers


def peft_params(pm, layers) -> dict:
    return {f"{n}.{leaf}": getattr(pm.base_model.model.get_submodule(hf_module_name(n)),
                                   leaf)["default"]
            for n in layers for leaf in ("lora_A", "lora_E", "lora_B")}


@model_ids
def test_adalora_matches_peft_forward_and_gradients(model):
    method, ours, pm, layers = adalora_twins(model)
    b = batch()
    h = hidden(ours, b)
    out = pm.base_model(**b)  # AdaLoraModel.forward, which adds the penalty
    assert (h - hf_hidden(out, b)).abs().max() < ATOL
    (loss(h) + method.extra_loss(ours)).backward()
    out.loss.backward()
    theirs = {n: p.grad for n, p in peft_params(pm, layers).items()}
    assert_grads(dict(trainable_params(ours)), theirs)


def test_adalora_masks_match_peft_after_allocation_steps():
    method, ours, pm, layers = adalora_twins("tiny")
    ours_opt = torch.optim.SGD([p for _, p in trainable_params(ours)], lr=0.05)
    peft_opt = torch.optim.SGD(list(peft_params(pm, layers).values()), lr=0.05)
    b = batch()
    method.start_training(ours, TOTAL, None)
    for step in range(TOTAL + 1):  # step TOTAL - tfinal forces the target budget
        ours_opt.zero_grad()
        peft_opt.zero_grad()
        (loss(hidden(ours, b)) + method.extra_loss(ours)).backward()
        pm.base_model(**b).loss.backward()
        ours_opt.step()
        peft_opt.step()
        method.after_step(ours, step, TOTAL, None)
        pm.base_model.update_and_allocate(step)
        theirs = peft_params(pm, layers)
        for name, layer in layers.items():
            assert torch.equal(layer.lora_E == 0, theirs[f"{name}.lora_E"] == 0), (name, step)
            assert (layer.lora_E - theirs[f"{name}.lora_E"]).abs().max() < 1e-4
    assert sum(layer.rank() for layer in layers.values()) == 2 * len(layers)  # the target
    assert any(layer.rank() != 2 for layer in layers.values())  # reallocated, not uniform


def test_adalora_penalty_and_oracle_can_fail():
    """Without our penalty the gradients of A and B differ from peft's (the oracle notices)."""
    method, ours, pm, layers = adalora_twins("tiny")
    b = batch()
    loss(hidden(ours, b)).backward()  # the penalty forgotten
    pm.base_model(**b).loss.backward()
    theirs = {n: p.grad for n, p in peft_params(pm, layers).items()}
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_grads(dict(trainable_params(ours)), theirs)


# ---- DyLoRA --------------------------------------------------------------------------------------
def dylora_at(b_rank: int, model: str, frozen: bool = False, alpha_theirs: float = 16.0):
    method = DyLora(r_max=8, alpha=16, targets="attn_qkv", frozen=frozen)
    ours = method.apply(base_encoder(model)).train()  # the training rank, b: no dropout in
    for m in ours.modules():  # the tiny and MiniLM base encoders' own dropout is off
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for layer in ours.layers:
        layer.attn.attn_dropout = 0.0
    perturb(ours)
    method.ranks.train = b_rank
    layers = dict(adapter_layers(ours))
    config = peft.LoraConfig(r=b_rank, lora_alpha=alpha_theirs, lora_dropout=0.0,
                             target_modules=[hf_module_name(n) for n in layers])
    pm = peft.get_peft_model(hf_base(model), config).eval()
    theirs = {}
    with torch.no_grad():
        for name, layer in layers.items():
            m = pm.base_model.model.get_submodule(hf_module_name(name))
            m.lora_A["default"].weight.copy_(layer.lora_A[:b_rank])
            m.lora_B["default"].weight.copy_(layer.lora_B[:, :b_rank])
            theirs[f"{name}.lora_A"] = m.lora_A["default"].weight
            theirs[f"{name}.lora_B"] = m.lora_B["default"].weight
    return ours, pm, theirs


@pytest.mark.parametrize("b_rank", [1, 3, 8])
@model_ids
def test_dylora_at_each_rank_is_peft_lora_of_that_rank(b_rank, model):
    ours, pm, theirs = dylora_at(b_rank, model)
    b = batch()
    h, out = hidden(ours, b), pm(**b)
    assert (h - hf_hidden(out, b)).abs().max() < ATOL
    loss(h).backward()
    loss(hf_hidden(out, b)).backward()
    for name, p in trainable_params(ours):
        want = theirs[name].grad
        got = p.grad[:b_rank] if name.endswith("lora_A") else p.grad[:, :b_rank]
        assert (got - want).abs().max() < ATOL * max(1.0, want.abs().max().item()), name
        rest = p.grad[b_rank:] if name.endswith("lora_A") else p.grad[:, b_rank:]
        assert not rest.abs().any()  # ranks beyond b get nothing


def test_dylora_frozen_trains_only_the_b_th_row_and_column():
    ours, pm, _ = dylora_at(3, "tiny", frozen=True)
    loss(hidden(ours, batch())).backward()
    for name, p in trainable_params(ours):
        grad = p.grad if name.endswith("lora_A") else p.grad.T  # [r, ·]
        assert grad[2].abs().max() > 0 and not grad[:2].abs().any() and not grad[3:].abs().any()


def test_dylora_oracle_fails_for_the_wrong_scale():
    """peft's LoRA at alpha / r_max instead of alpha / b: the scale the paper corrects."""
    ours, pm, _ = dylora_at(3, "tiny", alpha_theirs=16.0 * 3 / 8)
    b = batch()
    with torch.no_grad():
        assert (hidden(ours, b) - hf_hidden(pm(**b), b)).abs().max() > 1e-3


def test_dylora_samples_ranks_from_the_run_s_generator():
    method = DyLora(r_min=2, r_max=5)
    g = torch.Generator().manual_seed(0)
    ranks = []
    for _ in range(200):
        method.after_step(None, 0, 1, g)
        ranks.append(method.ranks.train)
    assert set(ranks) == {2, 3, 4, 5}
    again = torch.Generator().manual_seed(0)
    method.after_step(None, 0, 1, again)
    assert method.ranks.train == ranks[0]


# ---- Hydra and DVoRA: merged weights through torch.func.functional_call -------------------------
def merged_reference(encoder, model: str, merged_weight) -> tuple:
    """transformers' BertModel with each adapted layer's weight (and bias) replaced by
    `merged_weight(layer)` -> (W', b'), differentiable in our adapter tensors."""
    hf = hf_base(model)
    params = dict(hf.named_parameters())
    for name, layer in adapter_layers(encoder):
        w, bias = merged_weight(layer)
        params[minbert_to_hf_key(f"{name}.weight")] = w
        if bias is not None:
            params[minbert_to_hf_key(f"{name}.bias")] = bias
    return hf, params


def hydra_merged(layer):
    W0, b0 = layer.weight, layer.bias
    seq = layer.b_up @ layer.b_down  # [out, out]
    return W0 + layer.a_up @ layer.a_down + seq @ W0, b0 + seq @ b0


def check_against_merged(encoder, model: str, merged_weight) -> None:
    """Hidden states and the gradients of every trained tensor equal transformers' run with the
    merged weights (differentiated through `merged_weight`)."""
    perturb(encoder)
    b = batch()
    hf, params = merged_reference(encoder, model, merged_weight)
    h, ref = hidden(encoder, b), hf_hidden(functional_call(hf, params, kwargs=b), b)
    assert (h - ref).abs().max() < ATOL
    ours = dict(trainable_params(encoder))
    grads = torch.autograd.grad(loss(ref), list(ours.values()))
    loss(h).backward()
    assert_grads(ours, dict(zip(ours, grads)))


@model_ids
def test_hydra_equals_transformers_with_the_merged_weights(model):
    encoder = Hydra(r_parallel=4, r_sequential=2, targets="all_linear").apply(base_encoder(model))
    check_against_merged(encoder, model, hydra_merged)


def test_hydra_parallel_branch_alone_is_peft_lora():
    encoder = Hydra(r_parallel=4, r_sequential=2, targets="attn_qkv").apply(base_encoder("tiny"))
    perturb(encoder)
    layers = dict(adapter_layers(encoder))
    config = peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                             target_modules=[hf_module_name(n) for n in layers])
    pm = peft.get_peft_model(hf_base("tiny"), config).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            layer.b_up.zero_()  # the sequential branch off
            m = pm.base_model.model.get_submodule(hf_module_name(name))
            m.lora_A["default"].weight.copy_(layer.a_down)
            m.lora_B["default"].weight.copy_(layer.a_up)
        b = batch()
        assert (hidden(encoder, b) - hf_hidden(pm(**b), b)).abs().max() < ATOL


def test_hydra_oracle_fails_for_a_sequential_branch_on_the_input():
    """B_up B_down x instead of B_up B_down (W0 x + b0): a second parallel branch, not Hydra."""
    encoder = Hydra(r_parallel=4, r_sequential=2, targets="all_linear").apply(base_encoder("tiny"))
    perturb(encoder)
    b = batch()

    def wrong(layer):
        seq = layer.b_up @ layer.b_down  # [out, out]: only square layers can take it on x
        sequential = seq @ torch.eye(*layer.weight.shape) if seq.shape[1] == layer.in_features \
            else 0
        return layer.weight + layer.a_up @ layer.a_down + sequential, layer.bias

    hf, params = merged_reference(encoder, "tiny", wrong)
    with torch.no_grad():
        assert (hidden(encoder, b) - hf_hidden(functional_call(hf, params, kwargs=b), b)
                ).abs().max() > 1e-3


def dvora_merged(layer, detach: bool = True):
    V = layer.weight + layer.vera_delta()
    norm = torch.linalg.vector_norm(V, dim=1)
    norm = norm.detach() if detach else norm
    return (layer.magnitude / norm).unsqueeze(1) * V, None


@model_ids
def test_dvora_equals_transformers_with_the_merged_weights(model):
    from minbert.peft.dvora import Dvora

    encoder = Dvora(rank=8, targets="attn_qkv", seed=2).apply(base_encoder(model)).eval()
    check_against_merged(encoder, model, dvora_merged)
    b, ours = batch(), dict(trainable_params(encoder))
    # the norm differentiated (DoRA's section 4.3 says: detach it) gives other gradients
    hf, params = merged_reference(encoder, model, lambda l: dvora_merged(l, detach=False))
    grads = torch.autograd.grad(loss(hf_hidden(functional_call(hf, params, kwargs=b), b)),
                                list(ours.values()))
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_grads(ours, dict(zip(ours, grads)))


def test_dylora_scores_the_curve_at_the_ranks_asked_and_refuses_others():
    """`curve_ranks` picks the ranks a run scores dev at (the rank ladder's 1, 2, 4, ..., 64
    without 64 evaluations); null is every rank; a rank outside [r_min, r_max] is refused."""
    assert list(DyLora(r_min=2, r_max=5).variants()) == [f"dylora/r{b}" for b in (2, 3, 4, 5)]
    method = DyLora(r_max=64, curve_ranks=[1, 2, 4, 64])
    assert list(method.variants()) == ["dylora/r1", "dylora/r2", "dylora/r4", "dylora/r64"]
    with method.variants()["dylora/r4"]:
        assert method.ranks.eval == 4
    assert method.ranks.eval == 64
    for bad in ([0, 4], [65], []):
        with pytest.raises(ConfigError, match="curve_ranks"):
            DyLora(r_max=64, curve_ranks=bad)
