"""Saving and restoring optimizer states that hold objects, exactly and safely.

GaLoreAdamW keeps a `GaLoreProjector` per projected weight and both 8-bit optimizers keep
`QuantizedTensor` moments: Python objects that `torch.save` would pickle as code references, which
`torch.load(weights_only=True)` rightly refuses. Such a class registers itself with `@packable`
and says how it becomes plain data (`to_state()`: tensors and plain values) and back
(`from_state(fields)`), so this module knows none of them. `PlainStateDict` is a mixin for the
optimizers: `state_dict()` turns each registered object into a dict tagged with its class's name,
and `load_state_dict()` turns it back, bit for bit (the projector's bases keep their memory
layout, which decides how their matmuls round). torch's own loader is kept away from those
entries: it would cast the uint8 codes of a QuantizedTensor to the parameter's float dtype.
"""
from __future__ import annotations

KIND = "__kind__"
PACKABLE: dict[str, type] = {}  # class name -> the registered class


def packable(cls: type) -> type:
    """Class decorator: instances of `cls` in an optimizer's state are saved as
    `{KIND: cls.__name__, **obj.to_state()}` and restored by `cls.from_state(fields)`."""
    PACKABLE[cls.__name__] = cls
    return cls


def pack(value):
    """A state value as something `torch.load(weights_only=True)` reads back."""
    kind = type(value).__name__
    if PACKABLE.get(kind) is type(value):
        return {KIND: kind, **value.to_state()}
    return value


def unpack(value):
    if not _is_packed(value):
        return value
    cls = PACKABLE.get(value[KIND])
    if cls is None:
        raise ValueError(f"unknown packed optimizer state {value[KIND]!r}")
    return cls.from_state({k: v for k, v in value.items() if k != KIND})


def _is_packed(value) -> bool:
    return isinstance(value, dict) and KIND in value


class PlainStateDict:
    """Mixin (before torch.optim.Optimizer in the bases) for optimizers whose per-parameter state
    holds packable objects (QuantizedTensors, GaLoreProjectors)."""

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
