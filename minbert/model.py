"""minBERT: a small, readable BERT encoder (Devlin et al., 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding") that loads real HF-format checkpoints.

Ordered from parts to whole, nanoGPT-style:
  BertConfig -> Embeddings -> SelfAttention -> FeedForward -> Layer -> Pooler -> BertModel.

Attention uses torch.nn.functional.scaled_dot_product_attention. Module names are short and our own;
`minbert.checkpoint` maps them to and from the HF names, so LoRA targets read as `query`, `value`,
`up`, `down` rather than `intermediate.dense`.

Seams for PEFT methods (unused, and free, otherwise): `BertModel.kv_prefix` (a module giving each
layer extra keys and values: prefix tuning), `BertModel.prompt` (a module giving embeddings to put
in front of the sequence: prompt tuning; the output keeps the real tokens only, so [CLS] and
pooling stay the real ones), and each layer's `attn_out` / `ffn_out` residual blocks,
`norm(h + r)`, which bottleneck adapters wrap.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "BertConfig":
        """Reads an HF `config.json`, keeping the fields BertConfig knows; `overrides` win."""
        raw = json.loads(Path(path).read_text())
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported, "
                             f"not {raw['position_embedding_type']!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # [B, T, H]
    pooler_output: torch.Tensor  # [B, H]


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                position_ids: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """`words` ([N, H]) replaces the word embeddings of `input_ids` (soft prompts)."""
        words = self.word(input_ids) if words is None else words
        # word + token type + position, in HF's order: float sums are then bit-identical to HF's
        x = words + self.token_type(token_type_ids) + self.position(position_ids)
        return self.dropout(self.norm(x))  # [N, H]


class Tokens:
    """Where the real tokens of a padded [B, T] batch are. Every per-token op (embeddings,
    projections, LayerNorm, FFN) runs on the N real tokens only, packed as [N, H]; attention pads
    them back to [B, T] (Zhai et al., 2023, "ByteTransformer", call this padding-free)."""

    def __init__(self, attention_mask: torch.Tensor | None, B: int, T: int):
        self.B, self.T = B, T
        self.index = self.mask = None  # no padding: packed order == [B, T] order
        if attention_mask is not None and not bool(attention_mask.all()):
            self.index = attention_mask.reshape(-1).nonzero().squeeze(1)  # [N]
            self.mask = attention_mask[:, None, None, :].bool()  # [B, 1, 1, T], True = attend

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]"""
        t = t.reshape(self.B * self.T, *t.shape[2:])
        return t if self.index is None else t.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [B, T, H], zeros at padding."""
        if self.index is not None:
            x = x.new_zeros(self.B * self.T, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(self.B, self.T, -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention followed by its output projection (`out`)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        H = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, tokens: Tokens,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`prefix`: extra (keys, values), [B, nh, P, hd] each, that every token attends to."""
        B, T, H = tokens.B, tokens.T, x.shape[-1]
        heads = (B, T, self.n_head, H // self.n_head)
        q = tokens.unpack(self.query(x)).view(heads).transpose(1, 2)  # [N, H] -> [B, nh, T, hd]
        k = tokens.unpack(self.key(x)).view(heads).transpose(1, 2)
        v = tokens.unpack(self.value(x)).view(heads).transpose(1, 2)
        mask = tokens.mask
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
            if mask is not None:  # [B, 1, 1, P + T]: the prefix is never padding
                mask = torch.cat([mask.new_ones(B, 1, 1, prefix[0].shape[2]), mask], dim=-1)
        p = self.attn_dropout if self.training else 0.0
        with _attention_kernel(q):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(tokens.pack(y.transpose(1, 2)).reshape(-1, H))  # [B, nh, T, hd] -> [N, H]


def _attention_kernel(q: torch.Tensor):
    """SDPA's own choice, except in bf16/fp16 on a CPU: there its math kernel (two batched
    matmuls and a softmax, on AMX) trains about 1.7x faster than the flash kernel, whose backward
    is slow in low precision (scripts/bench_encoder.py measures the step)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel([SDPBackend.MATH])
    return nullcontext()


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # [N, H] -> [N, 4H] -> [N, H]


class Residual(nn.Module):
    """A sublayer's output h joining its input r: norm(h + r). A seam bottleneck adapters wrap."""

    def forward(self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(h + r)


class Layer(nn.Module):
    """One post-norm transformer block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.attn_out, self.ffn_out = Residual(), Residual()

    def forward(self, x: torch.Tensor, tokens: Tokens, prefix=None) -> torch.Tensor:
        x = self.attn_out(self.dropout(self.attn(x, tokens, prefix)), x, self.attn_norm)  # [N, H]
        return self.ffn_out(self.dropout(self.ffn(x)), x, self.ffn_norm)


class Pooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # [B, T, H] -> [B, H], from [CLS]


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config)
        self.kv_prefix: nn.Module | None = None  # B -> [(keys, values)] per layer
        self.prompt: nn.Module | None = None  # B -> [B, n, H] embeddings before the sequence

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        B, T = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if self.prompt is not None:
            return self._with_prompt(input_ids, attention_mask, token_type_ids)
        tokens = Tokens(attention_mask, B, T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embeddings(tokens.pack(input_ids), tokens.pack(token_type_ids),
                            tokens.pack(positions))  # [N, H], the real tokens only
        x = tokens.unpack(self._layers(x, tokens, B))  # [B, T, H], zeros at padding
        return BertOutput(last_hidden_state=x, pooler_output=self.pooler(x))

    def _layers(self, x: torch.Tensor, tokens: Tokens, B: int) -> torch.Tensor:
        prefixes = self.kv_prefix(B) if self.kv_prefix is not None else [None] * len(self.layers)
        for layer, prefix in zip(self.layers, prefixes):
            x = layer(x, tokens, prefix)
        return x

    def _with_prompt(self, input_ids, attention_mask, token_type_ids) -> BertOutput:
        """n prompt vectors in front of every sequence, at positions 0..n-1 with token type 0
        (the real tokens at n..n+T-1, as peft places them); the output drops them again."""
        B, T = input_ids.shape
        prompt = self.prompt(B)  # [B, n, H]
        n = prompt.shape[1]
        if n + T > self.config.max_position_embeddings:
            raise ValueError(f"{n} prompt tokens + {T} tokens exceed the model's "
                             f"{self.config.max_position_embeddings} positions")
        mask = torch.ones(B, n + T, dtype=torch.long, device=input_ids.device)
        if attention_mask is not None:
            mask[:, n:] = attention_mask
        tokens = Tokens(mask, B, n + T)
        words = torch.cat([prompt, self.embeddings.word(input_ids)], dim=1)  # [B, n + T, H]
        types = torch.cat([token_type_ids.new_zeros(B, n), token_type_ids], dim=1)
        positions = torch.arange(n + T, device=input_ids.device).expand(B, n + T)
        x = self.embeddings(None, tokens.pack(types), tokens.pack(positions),
                            words=tokens.pack(words))
        x = tokens.unpack(self._layers(x, tokens, B))[:, n:]  # [B, T, H]: the real tokens
        return BertOutput(last_hidden_state=x, pooler_output=self.pooler(x))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: BertConfig | None = None, seed: int | None = None,
                    **fields) -> "BertModel":
        """A randomly initialised model (BERT's init: N(0, 0.02), zero bias, unit LayerNorm)."""
        config = config or BertConfig(**fields)
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config)
        model.apply(model._init_weights)
        return model

    def _init_weights(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides) -> "BertModel":
        """Loads an HF-format BERT (`config.json` + safetensors or .bin) from a folder, a
        `package:<module>` that ships one, or a hub name in the local HF cache.
        `overrides` replace config fields, e.g. hidden_dropout_prob=0.3."""
        from minbert.checkpoint import load_hf_state_dict, resolve_checkpoint

        folder = resolve_checkpoint(name_or_path)
        config = BertConfig.from_json(folder / "config.json", **overrides)
        model = cls(config)
        state = load_hf_state_dict(folder, expected=model.state_dict())
        model.load_state_dict(state, strict=True)
        return model
