"""Parameter-efficient fine-tuning methods for minBERT, one module per method.

The contract is small and made of separate capabilities (after torchtune's adapter protocol):

- a method (`PeftMethod`) is any object with `apply(encoder) -> encoder` that transforms the
  encoder in place and leaves `requires_grad=True` on exactly the parameters it trains;
- a module a method adds is an `AdapterModule`: `adapter_params()` names the tensors it trains or
  draws at random, which adapter files save (`adapter_state_dict`);
- a module whose update folds into base weights is also `Mergeable`: `delta()` (ΔW, Δb),
  `merge()`, `unmerge()`. Methods that adapt Linear layers wrap them in `AdapterLinear`s
  (`minbert.peft.layer`), which are;
- a method declares, once on its class (`minbert.peft.contract`), its `name`, its
  `capabilities` (why it cannot merge, if it cannot: bottleneck adapters, prefix and prompt
  tuning; whether it exports to peft's format; whether it needs its own optimizer; the encoder
  seam it enters through) and `merge_eval`; `check_mergeable` turns a missing merge into an error
  for anything that needs one (FedAvg, OrthoAda, TIES/DARE, merged evaluation);
- a method with training hooks (`extra_loss`, `after_step`, `param_groups`, `state_dict`, ...)
  subclasses `minbert.peft.contract.NoHooks`, which the loop adapts every method to.

Free functions read all of that back, whatever the method: `trainable_params`, `param_counts`,
`merge`/`unmerge`/`merged`, `adapter_state_dict`. Methods are built from config by Hydra
(`peft=lora`, `peft=ia3`, ...), so adding one is adding a module and a `conf/peft/<name>.yaml`.

The methods are the `conf/peft/*.yaml` files, each naming its class (`_target_`); the README's
"PEFT methods" table gives each one's family and paper.

GaLore and GradNormLoRP also shape the optimizer: they declare `own_optimizer` (the trainer builds
GaLoreAdamW) and their `param_groups` hook tags the parameters whose gradients are projected.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import capabilities
from minbert.peft.layer import AdapterLinear, replace_module


@runtime_checkable
class PeftMethod(Protocol):
    def apply(self, encoder: nn.Module) -> nn.Module:
        """Transforms `encoder` in place and marks the parameters it trains."""
        ...


@runtime_checkable
class AdapterModule(Protocol):
    def adapter_params(self) -> tuple[str, ...]:
        """The local names of the tensors this module trains or draws (and so saves)."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    merged: bool

    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW [out, in], Δb [out] or None): the update the module folds into its base."""
        ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


def check_mergeable(method, wanted: str) -> None:
    """A ConfigError naming the method and the reason, if `wanted` (say `trainer=fedavg`) needs
    the method's update to fold into the base weights and it does not."""
    reason = capabilities(method).not_mergeable
    if reason:
        raise ConfigError(f"{wanted} merges in weight space, which peft={method.name} cannot: "
                          f"{reason}. "
                          "Use a method whose update folds into the weights (lora, dora, vera, "
                          "ia3, bitfit, none, ...) or another trainer")


def trainable_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs the optimizer updates."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> dict[str, float]:
    """The report's "Parameters updated": trainable over all parameters (base, adapters and
    heads), in percent. Frozen random projections (VeRA's) are buffers, not parameters; a
    quantized base weight (QLoRA's) counts as the parameters it stands for (`frozen_numel`)."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(getattr(m, "frozen_numel", 0) for m in model.modules())
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
    """The mergeable adapter layers (`AdapterLinear`s), by module name."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear))


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module a method added (an `AdapterModule`), by module name."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule))


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
    live = [n for n, m in adapter_modules(model)
            if not isinstance(m, AdapterLinear) and not getattr(m, "used_by_layers", False)]
    live += [n for n, m in model.named_modules()  # a peft tuner's layers merge only through peft
             if callable(getattr(m, "merge", None)) and not isinstance(m, AdapterLinear)]
    if live:
        raise ConfigError(f"cannot merge and unload {live[0]}: its update does not fold into the "
                          "base weights, so the base architecture cannot hold it")
    for name, layer in list(adapter_layers(model)):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        was_merged = layer.merged
        layer.merge()
        linear.weight.copy_(layer.weight)
        linear.weight.requires_grad_(False)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
            linear.bias.requires_grad_(layer.bias.requires_grad)
        if not was_merged:
            layer.unmerge()
        replace_module(model, name, linear)
    for name, m in list(adapter_modules(model)):
        if name:  # what is left: shared tensors such as VeRA's
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the methods' modules name in `adapter_params()`, by full name."""
    return {f"{prefix}.{local}" if prefix else local: functools.reduce(getattr, local.split("."),
                                                                       module)
            for prefix, module in adapter_modules(model) for local in module.adapter_params()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a run changes or draws at random, and so what an adapter file holds: every trainable
    parameter (adapters, biases under `bias=all`, task heads) plus the frozen tensors methods add
    (LoRA-FA's A, VeRA's shared projections). For full fine-tuning that is the whole model."""
    state = {n: p for n, p in trainable_params(model)}
    for name, tensor in adapter_tensors(model).items():
        state.setdefault(name, tensor)
    return {n: t.detach() for n, t in state.items()}
