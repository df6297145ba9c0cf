"""Saving and restoring optimizer states that hold objects, exactly and safely.

GaLoreAdamW keeps a `GaLoreProjector` per projected weight and both 8-bit optimizers keep
`QuantizedTensor` moments: Python objects that `torch.save` would pickle as code references, which
`torch.load(weights_only=True)` rightly refuses. `PlainStateDict` is a mixin for such optimizers:
`state_dict()` turns each object into a tagged dict of tensors and plain values, and
`load_state_dict()` turns it back, bit for bit (the projector's bases keep their memory layout,
which decides how their matmuls round). torch's own loader is kept away from those entries: it
would cast the uint8 codes of a QuantizedTensor to the parameter's float dtype.
"""
from __future__ import annotations

import torch

from minbert.optim.quant import QuantizedTensor

KIND = "__kind__"
PACKABLE: dict[str, type] = {}  # kind -> a class with to_state() and from_state(fields)


def packable(cls: type) -> type:
    """Class decorator: state objects of this class are saved as `{__kind__: name, **to_state()}`
    and rebuilt by `cls.from_state(fields)` (how GaLore's projector registers itself, so that this
    module needs no import of the optimizers that use it)."""
    PACKABLE[cls.__name__] = cls
    return cls


def pack(value):
    """A state value as something `torch.load(weights_only=True)` reads back."""
    if isinstance(value, QuantizedTensor):
        return {KIND: "QuantizedTensor", "codes": value.codes, "absmax": value.absmax,
                "shape": list(value.shape), "block_size": value.block_size,
                "scheme": value.scheme, "signed": value.signed}
    if PACKABLE.get(type(value).__name__) is type(value):
        return {KIND: type(value).__name__, **value.to_state()}
    return value


def unpack(value):
    if not (isinstance(value, dict) and KIND in value):
        return value
    fields = {k: v for k, v in value.items() if k != KIND}
    if value[KIND] == "QuantizedTensor":
        return QuantizedTensor(fields["codes"], fields["absmax"], torch.Size(fields["shape"]),
                               fields["block_size"], fields["scheme"], fields["signed"])
    if value[KIND] in PACKABLE:
        return PACKABLE[value[KIND]].from_state(fields)
    raise ValueError(f"unknown packed optimizer state {value[KIND]!r}")


def _is_packed(value) -> bool:
    return isinstance(value, dict) and KIND in value


class PlainStateDict:
    """Mixin (before torch.optim.Optimizer in the bases) for optimizers whose per-parameter state
    holds QuantizedTensors or GaLoreProjectors."""

    def state_dict(self) -> dict:
        sd = super().state_dict()
        return {**sd, "state": {i: {k: pack(v) for k, v in s.items()}
                                for i, s in sd["state"].items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        packed = {i: {k: v for k, v in s.items() if _is_packed(v)}
                  for i, s in state_dict["state"].items()}
        plain = {i: {k: v for k, v in s.items() if not _is_packed(v)}
                 for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": plain})
        params = [p for group in self.param_groups for p in group["params"]]
        for i, entries in packed.items():
            self.state[params[int(i)]].update({k: unpack(v) for k, v in entries.items()})
