"""Parameter-efficient fine-tuning methods for minBERT, one module per method.

The contract is small (after torchtune): a method is any object with `apply(encoder) -> encoder`
that transforms the encoder in place and leaves `requires_grad=True` on exactly the parameters it
trains. Free functions read that declaration back. Methods are built from config by Hydra
(`peft=none`, and `peft=lora`, `peft=dora`, ... as they land), so adding one is adding a module and
a `conf/peft/<name>.yaml`.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class PeftMethod(Protocol):
    def apply(self, encoder: nn.Module) -> nn.Module:
        """Transforms `encoder` in place and marks the parameters it trains."""
        ...


def trainable_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs the optimizer updates."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> dict[str, float]:
    """The report's "Parameters updated": trainable over total, heads included, in percent."""
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
