"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): `num_virtual_tokens` learned embeddings in front of every input sequence, the model
frozen.

The soft prompt enters through the encoder's `prompt` seam: it replaces the word embeddings of n
extra positions in front of the sequence, which then get position ids 0..n-1 and token type 0 (the
real tokens n..n+T-1, with their own token types), as peft places them. The encoder's output keeps
the real tokens only, so the [CLS] vector, the pooler and mean pooling the heads read stay the
real ones. Initialisation: `vocab`, the embeddings of random vocabulary tokens (drawn with `seed`;
the paper's "sampled vocabulary", peft's SAMPLE_VOCAB), or `text`, the embeddings of `init_text`'s
tokens ([CLS] and [SEP] included, cut or repeated to n, as peft's TEXT init). A prompt is not a
weight update, so there is nothing to merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities

INITS = ("vocab", "text")


class SoftPrompt(nn.Module):
    """B -> [B, n, H]: the same learned prompt for every sequence."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.detach().clone())  # [n, H]

    def adapter_params(self) -> tuple[str, ...]:
        return ("embeddings",)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(batch_size, -1, -1)


@dataclass
class Prompt:
    """`peft=prompt`: a soft prompt of `num_virtual_tokens` embeddings."""

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tokenizer: str | None = None  # for init=text; the configs pass the model's
    seed: int = 0
    lr: float | None = None
    name: ClassVar[str] = "prompt"
    capabilities: ClassVar[Capabilities] = Capabilities(
        not_mergeable="its soft prompt is extra input embeddings, not a weight update",
        seam="prompt")
    merge_eval: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive "
                              "integer")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}; use one of {list(INITS)}")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ConfigError("init=text needs init_text (and the model's tokenizer)")

    def token_ids(self, vocab_size: int) -> list[int]:
        n = self.num_virtual_tokens
        if self.init == "vocab":
            g = torch.Generator().manual_seed(self.seed)
            return torch.randint(vocab_size, (n,), generator=g, device="cpu").tolist()
        from minbert.checkpoint import load_tokenizer

        ids = load_tokenizer(self.tokenizer)(self.init_text)["input_ids"]
        return (ids * math.ceil(n / len(ids)))[:n]

    def apply(self, encoder: nn.Module) -> nn.Module:
        for p in encoder.parameters():
            p.requires_grad_(False)
        word = encoder.embeddings.word.weight
        ids = torch.tensor(self.token_ids(word.shape[0]), device="cpu").to(word.device)
        encoder.prompt = SoftPrompt(word.index_select(0, ids))
        return encoder
