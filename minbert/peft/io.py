"""Adapters on disk: our own small file, and peft's exchange format.

`save_adapter` writes `adapter_state_dict(model)` (adapters, heads, and any frozen tensors a method
drew at random) as one safetensors file, with the method's config in its metadata, so one base
checkpoint serves many adapters. `export_peft` writes the adapter of a method that declares
`peft_export` (LoRA, LoRA-FA, DoRA, a bridged peft tuner) as peft's `adapter_config.json` +
`adapter_model.safetensors` for `transformers.BertModel` (`peft.PeftModel.from_pretrained`), the
exchange format of the HF ecosystem (Mangrulkar et al., 2022); the method says what goes in
(`peft_adapter(encoder)`). Task heads have no place in that format and stay in our file.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from minbert.checkpoint import minbert_to_hf_key
from common.durable import atomic_write, damaged_file, write_text
from common.errors import CheckpointError
from minbert.peft import adapter_layers, adapter_state_dict
from minbert.peft.contract import capabilities

PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Writes the adapter state of `model` (see `adapter_state_dict`) to `path`."""
    return save_state(adapter_state_dict(model), path, metadata)


def save_state(state: dict[str, torch.Tensor], path: str | Path,
               metadata: dict | None = None) -> Path:
    """Writes named tensors as safetensors, atomically and durably (`common.durable`), with
    JSON-encoded metadata values."""
    path = Path(path)
    state = {n: t.detach().cpu().contiguous() for n, t in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = canonical_header(safetensors_bytes(state, metadata=meta))
    return atomic_write(path, lambda f: f.write(data))  # a kill never leaves a torn file


def canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys in sorted order. safetensors keeps the
    metadata in a Rust HashMap, whose order changes from process to process; sorted, the same
    tensors and metadata always give the same bytes (a resumed run's files equal an uninterrupted
    run's)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


# what a truncated, emptied or overwritten safetensors file raises when read
UNREADABLE = (SafetensorError, OSError, ValueError)


def read_state(path: str | Path, what: str = "saved tensors") -> dict[str, torch.Tensor]:
    """A safetensors file the run wrote, as tensors; a damaged file (truncated, emptied,
    overwritten) is a `DamagedFileError` naming it. `what`: the file in words, for the message."""
    try:
        return load_file(str(path))
    except UNREADABLE as e:
        raise damaged_file(path, e, what) from e


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except UNREADABLE as e:
        raise damaged_file(path, e, "adapter file") from e


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Loads an adapter file into a model built with the same PEFT config; returns its metadata.
    The file must hold exactly the model's adapter tensors, with the same shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no adapter file at {path}")
    expected = adapter_state_dict(model)
    try:
        f = safe_open(str(path), framework="pt")
    except UNREADABLE as e:
        raise damaged_file(path, e, "adapter file") from e
    with f:
        names, meta = set(f.keys()), f.metadata() or {}
        hint = (f" The file was saved with peft {meta['peft']}; build the model with that "
                "config." if "peft" in meta else "")
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit this model: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}.{hint}")
        for name, target in expected.items():
            tensor = f.get_tensor(name)
            if tensor.shape != target.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"expects {tuple(target.shape)}.{hint}")
            with torch.no_grad():
                target.copy_(tensor)
    return meta


def peft_key(name: str, adapted: set[str], leaves: dict[str, str]) -> str:
    """minBERT parameter name -> the key peft saves for `transformers.BertModel`. `adapted`: the
    adapted layers' names; `leaves`: their tensors' leaf names in peft's format (`lora_A` ->
    `lora_A.weight`)."""
    module, _, leaf = name.rpartition(".")
    if module.endswith(".base_layer"):  # an adapted layer's own weight or bias
        module, leaf = module.removesuffix(".base_layer"), f"base_layer.{leaf}"
    hf_module = minbert_to_hf_key(f"{module}.weight").removesuffix(".weight")
    if module in adapted:
        leaf = leaves.get(leaf, leaf)
    return f"{PEFT_PREFIX}{hf_module}.{leaf}"


def export_peft(encoder: nn.Module, method, out_dir: str | Path,
                base_model: str | None = None) -> Path:
    """Writes `encoder`'s adapter in peft's format to `out_dir`, for a method that declares
    `peft_export` (LoRA, LoRA-FA, DoRA, a bridged peft tuner, ...): `method.peft_adapter(encoder)`
    gives peft's config fields and the tensors under peft's names."""
    if not capabilities(method).peft_export:
        raise CheckpointError(f"peft={method.name} has no peft format to export to (the methods "
                              "that declare peft_export have: lora, lora_fa, dora, ...)")
    if any(m.merged for _, m in adapter_layers(encoder)):
        raise CheckpointError("the adapter layers are merged (with their own update, or with a "
                              "merge of experts as trainer=fedavg and orthoada make, whose ΔW is "
                              "full-rank): peft's LoRA format holds only unmerged low-rank "
                              "factors; unmerge them, or export the experts of an eoe run")
    config, state = method.peft_adapter(encoder)
    out = Path(out_dir)
    data = safetensors_bytes({n: t.detach().cpu().contiguous() for n, t in state.items()},
                             metadata={"format": "pt"})
    atomic_write(out / "adapter_model.safetensors", lambda f: f.write(data))
    config = {**config, "base_model_name_or_path": base_model, "inference_mode": True}
    write_text(out / "adapter_config.json", json.dumps(config, indent=2, default=str) + "\n")
    return out


def method_metadata(method) -> dict:
    """The method's config as plain data, for an adapter file's metadata."""
    fields = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}
    return {"peft": {"name": method.name, **fields}}
