"""Parameter-efficient fine-tuning methods for minBERT, one module per method.

The contract is small (after torchtune): a method is any object with `apply(encoder) -> encoder`
that transforms the encoder in place and leaves `requires_grad=True` on exactly the parameters it
trains. Methods that adapt Linear layers swap them for `AdapterLinear`s (`minbert.peft.layer`),
which know their update ΔW and can merge it. Free functions read all of that back, whatever the
method: `trainable_params`, `param_counts`, `merge`/`unmerge`/`merged`, `adapter_state_dict`.
Methods are built from config by Hydra (`peft=lora`, `peft=dora`, ...), so adding one is adding a
module and a `conf/peft/<name>.yaml`.

| method  | module     | paper                        |
|---------|------------|------------------------------|
| none    | full.py    | Devlin et al., 2019          |
| lora    | lora.py    | Hu et al., 2021              |
| lora_fa | lora_fa.py | Zhang et al., 2023           |
| dora    | dora.py    | Liu et al., 2024             |
| vera    | vera.py    | Kopiczko et al., 2024        |
| galore  | galore.py  | Zhao et al., 2024            |
| gradnormlorp | gradnormlorp.py | Huang et al., 2025  |

GaLore and GradNormLoRP also shape the optimizer: they add `param_groups(model, groups)`, which
tags the parameters whose gradients are projected (`trainers/optim.py` builds GaLoreAdamW then).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from minbert.peft.layer import AdapterLinear, replace_module


@runtime_checkable
class PeftMethod(Protocol):
    def apply(self, encoder: nn.Module) -> nn.Module:
        """Transforms `encoder` in place and marks the parameters it trains."""
        ...


def trainable_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs the optimizer updates."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> dict[str, float]:
    """The report's "Parameters updated": trainable over all parameters (base, adapters and
    heads), in percent. Frozen random projections (VeRA's) are buffers, not parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for _, p in trainable_params(model))
    return {"params/trainable": trainable, "params/total": total,
            "params/updated_pct": 100.0 * trainable / total if total else 0.0}


def set_trainable(model: nn.Module, names: set[str]) -> None:
    """Freezes every parameter of `model` except those named in `names`."""
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise KeyError(f"no such parameters: {sorted(unknown)[:5]}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear))


def merge(model: nn.Module) -> None:
    """Folds every adapter's ΔW into its frozen weight (the layers then run as plain Linears)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restores the frozen weights exactly as they were before `merge`."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


@contextmanager
def merged(model: nn.Module, enabled: bool = True):
    """`with merged(model): evaluate(...)` runs on merged weights and unmerges afterwards. Layers
    that were merged already (say with a merge of experts) stay as they are."""
    layers = [m for _, m in adapter_layers(model) if enabled and not m.merged]
    for layer in layers:
        layer.merge()
    try:
        yield model
    finally:
        for layer in layers:
            layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Folds every adapter in for good and puts plain `nn.Linear`s back: the base architecture
    with the fine-tuned weights, for deployment or for `transformers`."""
    for name, layer in list(adapter_layers(model)):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(layer.weight + (0 if layer.merged else layer.delta_weight()))
        linear.weight.requires_grad_(False)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
            linear.bias.requires_grad_(layer.bias.requires_grad)
        replace_module(model, name, linear)
    for name, m in list(model.named_modules()):
        if getattr(m, "adapter_names", None) and name:  # shared tensors such as VeRA's
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run changes or draws at random, and so what an adapter file holds: every trainable
    parameter (adapters, biases under `bias=all`, task heads) plus the frozen tensors methods add
    (LoRA-FA's A, VeRA's shared projections). For full fine-tuning that is the whole model."""
    state = {n: p for n, p in trainable_params(model)}
    for prefix, module in model.named_modules():
        for local in getattr(module, "adapter_names", ()):
            tensor = getattr(module, local)
            state.setdefault(f"{prefix}.{local}" if prefix else local, tensor)
    return {n: t.detach() for n, t in state.items()}
