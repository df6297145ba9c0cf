"""Tokenizing a split once and cutting it into padded batches.

Single sentences become `[CLS] x [SEP]`. Pairs are encoded jointly (`[CLS] x1 [SEP] x2 [SEP]` with
token types 0/1) for a joint head, or separately for the others; separate pairs travel as one
[2B, T] batch (all first sentences, then all second ones) so the encoder runs once per step.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from tasks.data import Split, fingerprint


def tokenizer_key(tokenizer) -> str:
    """What identifies a tokenizer's output: its serialized state (vocabulary, normalizer, special
    tokens) without the truncation and padding settings, which each call sets anew (so a used
    tokenizer keys as a fresh one), hashed once per tokenizer object."""
    cached = getattr(tokenizer, "_minbert_key", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            state = json.loads(backend.to_str())
            state = json.dumps({k: v for k, v in state.items() if k not in ("truncation",
                                                                             "padding")})
        else:
            state = repr(sorted(tokenizer.get_vocab()))
        cached = fingerprint(type(tokenizer).__name__, state)
        tokenizer._minbert_key = cached
    return cached


def _tokenize(batch: dict, tokenizer, max_length: int, joint: bool, columns: int) -> dict:
    texts = [batch[f"text_{c}"] for c in range(columns)]
    segments = [texts] if joint else [[column] for column in texts]
    out = {}
    for s, args in enumerate(segments):
        e = tokenizer(*args, truncation=True, max_length=max_length)
        out[f"ids_{s}"], out[f"types_{s}"] = e["input_ids"], e["token_type_ids"]
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B', T], B' = B or 2B
    attention_mask: torch.Tensor  # [B', T]
    token_type_ids: torch.Tensor  # [B', T]
    index: torch.Tensor  # [B], positions in the split
    labels: torch.Tensor | None  # [B]
    segments: int  # 2 when rows [:B] are first sentences and rows [B:] second ones

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, start: int, stop: int) -> "Batch":
        """Examples [start, stop) of the batch (both sentences of a pair), padded as the whole
        batch is: a data-parallel rank's share (trainers.engine.parallel)."""
        n = len(self.index)
        rows = torch.cat([torch.arange(s * n + start, s * n + stop) for s in range(self.segments)])
        labels = None if self.labels is None else self.labels[start:stop]
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.token_type_ids[rows],
                     self.index[start:stop], labels, self.segments)

    def to(self, device) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True),
                     self.attention_mask.to(device, non_blocking=True),
                     self.token_type_ids.to(device, non_blocking=True), self.index, labels,
                     self.segments)


class EncodedSplit:
    """Token ids of one split, ready to batch. `joint` chooses the pair encoding. Tokenizing is a
    `datasets` map cached under the split's fingerprint, the tokenizer's and the settings', so a
    second run of the same task reads the token ids from Arrow files instead of tokenizing."""

    def __init__(self, split: Split, tokenizer, max_length: int, joint: bool):
        self.split, self.joint = split, joint
        pair_joint = split.task.is_pair and joint
        tokenized = split.dataset.map(
            _tokenize, batched=True, remove_columns=split.dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "joint": pair_joint,
                       "columns": len(split.task.text_columns)},
            new_fingerprint=fingerprint(split.dataset._fingerprint, tokenizer_key(tokenizer),
                                        max_length, pair_joint, "tokens"),
            desc=f"tokenizing {split.task.name} {split.name}")
        # [CLS] x1 [SEP] x2 [SEP] with token types 0/1 (joint pairs), else one segment a sentence
        self.segments = [(tokenized[f"ids_{s}"][:], tokenized[f"types_{s}"][:])
                         for s in range(1 if pair_joint else len(split.task.text_columns))]
        self.labels = None if split.labels is None else torch.tensor(split.labels)

    def __len__(self) -> int:
        return len(self.split)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batch(self, i: int, batch_size: int) -> Batch:
        """The i-th batch of the split in file order (what `batches` yields i-th unshuffled)."""
        return self.collate(torch.arange(i * batch_size, min(len(self), (i + 1) * batch_size)))

    def length_order(self) -> torch.Tensor:
        """The split's positions by token length, longest first (ties in file order): batches cut
        from it pad little (dev in file order is 54-65 % padding at 128 a batch, sorted 8-22 %).
        A pair's length is its longer segment's, as a separate pair pads both to one width."""
        if getattr(self, "_length_order", None) is None:
            lengths = torch.tensor([max(len(ids[i]) for ids, _ in self.segments)
                                    for i in range(len(self))])
            self._length_order = torch.sort(lengths, descending=True, stable=True).indices
        return self._length_order

    def sorted_batch(self, i: int, batch_size: int) -> Batch:
        """The i-th batch in `length_order`, for scoring: `Batch.index` says where each row goes."""
        return self.collate(self.length_order()[i * batch_size:(i + 1) * batch_size])

    def batches(self, batch_size: int, shuffle: bool = False, generator=None):
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.collate(order[start:start + batch_size])

    def collate(self, index: torch.Tensor) -> Batch:
        rows = [(seg_ids[i], seg_types[i]) for seg_ids, seg_types in self.segments
                for i in index.tolist()]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        types = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, (row_ids, row_types) in enumerate(rows):
            ids[r, :len(row_ids)] = torch.tensor(row_ids)
            types[r, :len(row_types)] = torch.tensor(row_types)
            mask[r, :len(row_ids)] = 1
        labels = None if self.labels is None else self.labels[index]
        return Batch(ids, mask, types, index, labels, segments=len(self.segments))
