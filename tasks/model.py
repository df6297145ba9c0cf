"""The multi-task model: one shared encoder, one head per task (the CS224N minBERT multitask
classifier). Sentence vectors come from BERT's pooled [CLS] (`pooler`, as in the CS224N starter
code), the raw last-layer [CLS] (`cls`), or the mean of the token states (`mean`, as Sentence-BERT
and all-MiniLM-L6-v2 do)."""
from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError
from tasks.batching import Batch

POOLINGS = ("pooler", "cls", "mean")


class MultitaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], pooling: str = "pooler"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown model.pooling={pooling!r}; valid: {list(POOLINGS)}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.pooling = pooling

    def sentence_vectors(self, batch: Batch) -> torch.Tensor:
        out = self.encoder(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        if self.pooling == "pooler":
            return out.pooler_output  # [B', H]
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]  # [B', H]
        m = batch.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # [B', T, 1]
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B', H]

    def forward(self, task: str, batch: Batch) -> torch.Tensor:
        h = self.sentence_vectors(batch)
        # Under mixed precision the encoder runs in bf16 (fp16); the small heads run in fp32, so
        # that a score (STS's scaled cosine) keeps its resolution.
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            if batch.segments == 2:
                return self.heads[task](*h.chunk(2))  # first sentences, second sentences
            return self.heads[task](h)
