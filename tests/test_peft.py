"""The PEFT test matrix: every method, on the tiny random encoder and on the packaged MiniLM, each
test run for the methods whose declared capabilities it concerns (tests/peft_cases.py).

Init leaves the model unchanged (the methods that promise it); exactly the intended parameters
train; merged equals unmerged and unmerge restores W0 bit for bit (mergeable methods); a method
that cannot merge is refused by everything that merges; one optimizer step changes exactly the
trainable parameters; adapters round-trip through their file; parameter accounting matches
hand-computed counts. The comparisons against independent references are in test_peft_oracle.py.
"""
from __future__ import annotations

import pytest
import torch

from common.errors import CheckpointError, ConfigError
from minbert.model import BertConfig, BertModel
from minbert.peft import (adapter_layers, adapter_state_dict, check_mergeable, merge,
                          merge_and_unload, merged, param_counts, trainable_params, unmerge)
from minbert.peft.io import load_adapter, save_adapter
from minbert.peft.dora import Dora
from minbert.peft.lora import Lora
from minbert.peft.vera import Vera
from peft_cases import (ALL, CASES, CONFIGS, EXPECTED_TRAINABLE, FULL_PARAMETER, IDENTITY_AT_INIT,
                        MERGEABLE, METHODS, TINY, base_encoder, batch, expected_trainable, hidden,
                        layered_ids, loss, method_ids, model_ids, partial_ids, perturb)


def adapted(method: str, model: str):
    return METHODS[method]().apply(base_encoder(model))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_says_what_it_trains(config):
    """The matrix is every conf/peft file: each needs its expected tensors, written by hand."""
    assert isinstance(expected_trainable(config), (set, frozenset))


def test_the_expected_tensors_name_only_cases():
    assert set(EXPECTED_TRAINABLE) <= set(CASES), "an entry for a config that is gone"


def test_a_config_without_expected_tensors_fails_saying_what_to_add(monkeypatch):
    """What a new conf/peft/<name>.yaml gets until its entry is written."""
    import peft_cases

    monkeypatch.delitem(peft_cases.EXPECTED_TRAINABLE, "lora")
    with pytest.raises(pytest.fail.Exception, match=r"conf/peft/lora.yaml has no entry in "
                       r"EXPECTED_TRAINABLE \(tests/peft_cases.py\): add the names of the "
                       r"tensors it trains"):
        test_every_config_says_what_it_trains("lora")


@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT))
@model_ids
def test_output_at_init_equals_the_base_model(method, model):
    b = batch()
    with torch.no_grad():
        want = hidden(base_encoder(model), b)
        got = hidden(adapted(method, model), b)
    assert (got - want).abs().max() < 1e-5  # DoRA: m / ||W0|| = 1, then fp32 rounding


@method_ids
def test_only_the_intended_parameters_train(method):
    encoder = adapted(method, "tiny")
    want = set(expected_trainable(method))
    if want == ALL:  # a method that trains every parameter
        want = {n for n, _ in encoder.named_parameters()}
    if "bias" in want:  # bias=all: every bias trains too
        want = (want - {"bias"}) | {n for n, _ in encoder.named_parameters() if n.endswith("bias")}
    assert {n for n, _ in trainable_params(encoder)} == want


@layered_ids
@model_ids
def test_merged_equals_unmerged_and_unmerge_restores_w0(method, model):
    """Merged and unmerged differ by fp32 rounding only: W + sBA rounds otherwise than W and sBA
    apart, and six LayerNorms carry it (up to 1.4e-5 on MiniLM's outputs of up to 2.2, rsLoRA on
    every linear layer), so the bound is relative as well as absolute; a wrong merge misses by
    orders of magnitude more. The adapter's init is seeded: the case does not depend on the
    tests that ran before it."""
    torch.manual_seed(0)
    encoder = adapted(method, model)
    perturb(encoder)
    frozen = {n: p.clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    b = batch()
    with torch.no_grad():
        unmerged_out = hidden(encoder, b)
        with merged(encoder):
            assert all(layer.merged for _, layer in adapter_layers(encoder))
            merged_out = hidden(encoder, b)
        again = hidden(encoder, b)
    torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-5, atol=1e-5)
    assert (merged_out - unmerged_out).abs().max() > 0 or method == "vera"  # really merged
    assert torch.equal(again, unmerged_out)
    assert all(torch.equal(p, frozen[n]) for n, p in encoder.named_parameters() if n in frozen)


@pytest.mark.parametrize("method", sorted(MERGEABLE - FULL_PARAMETER))
def test_merge_and_unload_leaves_plain_linears_with_the_same_outputs(method):
    encoder = adapted(method, "tiny")
    perturb(encoder)
    b = batch()
    with torch.no_grad():
        want = hidden(encoder, b)
        merge_and_unload(encoder)
        got = hidden(encoder, b)
    assert not list(adapter_layers(encoder)) and not adapter_state_dict(encoder).keys() - {
        n for n, _ in encoder.named_parameters() if n.endswith("bias")}
    assert set(encoder.state_dict()) == set(BertModel.from_config(**TINY).state_dict())
    assert (got - want).abs().max() < 1e-5


@method_ids
def test_one_step_changes_exactly_the_trainable_parameters(method):
    encoder = adapted(method, "tiny").train()
    perturb(encoder)  # from B = 0 the gradient of A would be zero
    before = {n: t.clone() for n, t in encoder.state_dict().items()}
    params = [p for _, p in trainable_params(encoder)]
    out = loss(hidden(encoder, batch()))
    if params:  # peft=frozen trains nothing of the encoder: then nothing may change
        out.backward()
        torch.optim.SGD(params, lr=0.1).step()
    changed = {n for n, t in encoder.state_dict().items() if not torch.equal(t, before[n])}
    trainable = {n for n, _ in trainable_params(encoder)}
    # A key bias adds q·b_k to every logit of a query: softmax ignores it, so its gradient is zero
    # up to rounding (BitFit and full fine-tuning train it all the same, as the papers do).
    inert = {n for n in trainable if n.endswith("attn.key.bias")}
    assert trainable - inert <= changed <= trainable


@partial_ids  # an adapter file is small: not for the methods that train every parameter
def test_adapter_file_round_trips(method, tmp_path):
    encoder = adapted(method, "tiny")
    perturb(encoder, seed=1)
    path = save_adapter(encoder, tmp_path / "adapter.safetensors", {"peft": {"name": method}})
    torch.manual_seed(123)  # a different random init of A (and, for VeRA, a different seed below)
    fresh = METHODS[method]()
    if hasattr(fresh, "seed"):  # VeRA's projections, the prompt's vocabulary tokens
        fresh.seed = 99
    fresh = fresh.apply(base_encoder("tiny"))
    b = batch()
    with torch.no_grad():
        assert (hidden(fresh, b) - hidden(encoder, b)).abs().max() > 1e-4
        meta = load_adapter(fresh, path)
        assert torch.equal(hidden(fresh, b), hidden(encoder, b))
    assert meta["peft"] == '{"name": "' + method + '"}'
    full = sum(t.numel() for t in encoder.state_dict().values())
    assert sum(t.numel() for t in adapter_state_dict(encoder).values()) < full / 2


@method_ids
def test_what_cannot_merge_is_refused_by_everything_that_merges(method):
    encoder = adapted(method, "tiny")
    if method in MERGEABLE:
        check_mergeable(METHODS[method](), "trainer=fedavg")
        return
    with pytest.raises(ConfigError, match=f"trainer=fedavg merges in weight space, which "
                                          f"peft={METHODS[method]().name} cannot: its"):
        check_mergeable(METHODS[method](), "trainer=fedavg")
    with pytest.raises(ConfigError, match="does not fold into the base weights"):
        merge_and_unload(encoder)


def test_adapter_file_for_another_config_is_a_clear_error(tmp_path):
    encoder = Lora(rank=4).apply(base_encoder("tiny"))
    path = save_adapter(encoder, tmp_path / "a.safetensors", {"peft": {"name": "lora", "rank": 4}})
    with pytest.raises(CheckpointError, match=r"lora_A has shape \(4, 64\).*expects \(8, 64\)"
                                              r".*saved with peft"):
        load_adapter(Lora(rank=8).apply(base_encoder("tiny")), path)
    with pytest.raises(CheckpointError, match="missing.*layers.0.attn.out.lora_A"):
        load_adapter(Lora(rank=4, targets="all_linear").apply(base_encoder("tiny")), path)
    with pytest.raises(CheckpointError, match="no adapter file"):
        load_adapter(encoder, tmp_path / "nope.safetensors")


def test_unmerge_never_drifts_over_many_merge_cycles():
    encoder = adapted("dora", "tiny")
    perturb(encoder)
    w0 = {n: p.clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    for _ in range(50):
        merge(encoder)
        unmerge(encoder)
    assert all(torch.equal(p, w0[n]) for n, p in encoder.named_parameters() if n in w0)


def test_training_a_merged_layer_is_refused():
    encoder = adapted("lora", "tiny").train()
    merge(encoder)
    with pytest.raises(RuntimeError, match="merged; unmerge it before training"):
        hidden(encoder, batch())


# ---- parameter accounting (the report's Table 2 "Parameters updated") ---------------------------
def bert_base_on_meta(method) -> BertModel:
    with torch.device("meta"):
        return method.apply(BertModel(BertConfig()))


@pytest.mark.parametrize("rank,targets,per_layer", [
    (2, "attn_qkv", 3 * 2 * (768 + 768)),
    (64, "all_linear", 4 * 64 * 1536 + 2 * 64 * (768 + 3072)),
])
def test_lora_param_counts_on_bert_base(rank, targets, per_layer):
    counts = param_counts(bert_base_on_meta(Lora(rank=rank, targets=targets)))
    base = 109_482_240  # bert-base-uncased's BertModel, pooler included
    assert counts["params/trainable"] == 12 * per_layer
    assert counts["params/total"] == base + 12 * per_layer
    if rank == 2:
        assert round(counts["params/updated_pct"], 2) == 0.10  # the report: about 0.1 %


def test_dora_and_vera_param_counts():
    dora = param_counts(bert_base_on_meta(Dora(rank=8, targets="attn_qv")))
    assert dora["params/trainable"] == 12 * 2 * (8 * 1536 + 768)  # A, B and m per layer
    vera = param_counts(bert_base_on_meta(Vera(rank=256, targets="all_linear")))
    assert vera["params/trainable"] == 12 * (4 * (768 + 256) + (3072 + 256) + (768 + 256))
    assert vera["params/total"] == 109_482_240 + vera["params/trainable"]  # A, B are buffers


ADAPTER = 768 * 48 + 48 + 48 * 768 + 768  # a bottleneck of width 768 // 16 = 48


@pytest.mark.parametrize("method,trainable,added", [
    ("ia3", 12 * (768 + 768 + 3072), 12 * (768 + 768 + 3072)),  # l_k, l_v and l_ff per layer
    ("houlsby", 12 * (2 * ADAPTER + 2 * 2 * 768), 12 * 2 * ADAPTER),  # + the layer norms
    ("pfeiffer", 12 * ADAPTER, 12 * ADAPTER),
    ("prefix", 20 * 768 + (768 * 512 + 512) + (512 * 2 * 12 * 768 + 2 * 12 * 768), None),
    ("prompt", 20 * 768, None),
    ("bitfit", 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768, 0),  # + the embeddings' LN β
])
def test_new_families_param_counts_on_bert_base(method, trainable, added):
    from minbert.peft.bitfit import BitFit
    from minbert.peft.bottleneck import Houlsby, Pfeiffer
    from minbert.peft.ia3 import IA3
    from minbert.peft.prefix import Prefix
    from minbert.peft.prompt import Prompt

    make = {"ia3": IA3, "houlsby": Houlsby, "pfeiffer": Pfeiffer, "prefix": Prefix,
            "prompt": Prompt, "bitfit": BitFit}[method]
    counts = param_counts(bert_base_on_meta(make()))  # the configs' defaults
    assert counts["params/trainable"] == trainable
    assert counts["params/total"] == 109_482_240 + (trainable if added is None else added)


# ---- bad config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 0}, "rank=0 must be a positive integer"),
    ({"alpha": 0}, "alpha=0 must be positive"),
    ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"bias": "lora_only"}, r"bias='lora_only'; use one of \['none', 'all'\]"),
])
def test_bad_lora_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Lora(**kwargs)


def test_unknown_targets_are_config_errors():
    with pytest.raises(ConfigError, match=r"targets='qkv' is not a preset.*all_linear"):
        Lora(targets="qkv").apply(base_encoder("tiny"))
    with pytest.raises(ConfigError, match=r"'attn.gate' matches no Linear module.*layers.0.attn"):
        Lora(targets=["attn.query", "attn.gate"]).apply(base_encoder("tiny"))
    encoder = Lora(targets=["layers.1.attn.value", "ffn.up"]).apply(base_encoder("tiny"))
    assert [n for n, _ in adapter_layers(encoder)] == ["layers.0.ffn.up", "layers.1.attn.value",
                                                       "layers.1.ffn.up"]


@pytest.mark.parametrize("make,kwargs,message", [
    ("Hydra", {"r_parallel": 0}, "r_parallel=0 must be a positive integer"),
    ("Hydra", {"r_sequential": 2.5}, "r_sequential=2.5 must be a positive integer"),
    ("DyLora", {"r_max": 0}, "r_max=0 must be a positive integer"),
    ("DyLora", {"r_min": 9}, r"r_min=9 must be an integer in \[1, r_max=8\]"),
    ("AdaLora", {"init_r": -1}, "init_r=-1 must be a positive integer"),
    ("AdaLora", {"target_r": 13}, r"target_r=13 must be an integer in \[1, init_r=12\]"),
    ("Vera", {"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ("Dvora", {"bias": "some"}, r"bias='some'; use one of"),
])
def test_adapter_methods_share_one_validated_config(make, kwargs, message):
    """The shared options (`AdapterConfig`) and each method's own rank options, checked when the
    method is built; no method fakes a `rank` it does not have."""
    from minbert.peft.adalora import AdaLora
    from minbert.peft.dvora import Dvora
    from minbert.peft.dylora import DyLora
    from minbert.peft.hydra import Hydra
    from minbert.peft.layer import AdapterConfig

    cls = {"Hydra": Hydra, "DyLora": DyLora, "AdaLora": AdaLora, "Vera": Vera, "Dvora": Dvora}[make]
    assert issubclass(cls, AdapterConfig)
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)
    method = cls()
    assert hasattr(method, "rank") == ("rank" in cls.rank_options)
    assert method.targets == "attn_qkv" and method.bias == "none" and method.dropout == 0.0
    assert cls(targets=("attn.query",)).targets == ["attn.query"]  # a Hydra list: a plain one
