"""BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only bias terms train, the weights stay frozen.

`biases` says which count: `attention` (query, key, value and the attention output projection),
`ffn` (the FFN's up and down projections) and `layernorm` (every LayerNorm's β, the embeddings'
included); by default all three, the paper's "all bias terms" of the encoder. The pooler's bias is
not among them (the pooler is part of the heads' input, not of the encoder's layers). Its update
lives in existing parameters, so merging experts merges those biases as task vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities

GROUPS = {
    "attention": (".attn.query.bias", ".attn.key.bias", ".attn.value.bias", ".attn.out.bias"),
    "ffn": (".ffn.up.bias", ".ffn.down.bias"),
    "layernorm": ("_norm.bias", "embeddings.norm.bias"),
}


@dataclass
class BitFit:
    """`peft=bitfit`: the bias terms of the groups in `biases` train."""

    biases: object = ("attention", "ffn", "layernorm")
    lr: float | None = None
    name: ClassVar[str] = "bitfit"
    capabilities: ClassVar[Capabilities] = Capabilities()  # its biases merge as task vectors
    merge_eval: ClassVar[bool] = False  # no adapter layers to merge

    def __post_init__(self):
        self.biases = [self.biases] if isinstance(self.biases, str) else list(self.biases)
        unknown = [b for b in self.biases if b not in GROUPS]
        if unknown or not self.biases:
            raise ConfigError(f"biases={self.biases!r}: choose among {sorted(GROUPS)}")

    def apply(self, encoder: nn.Module) -> nn.Module:
        suffixes = tuple(s for group in self.biases for s in GROUPS[group])
        for name, p in encoder.named_parameters():
            p.requires_grad_(name.endswith(suffixes) and not name.startswith("pooler."))
        return encoder
