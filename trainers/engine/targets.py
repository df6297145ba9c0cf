"""The schema of a `_target_` config node is its target's own signature: the keys it accepts and
their annotations (a PEFT method's dataclass fields, `Strategy` with its `TrainOptions`, a head's
constructor). `check_target` refuses, before anything is built, a key the target does not take
(naming the closest one it does) and a value of the wrong type (pydantic, strict), and checks
nested `_target_` nodes the same way. Ranges are the targets' own constructor checks, which
`trainers.engine.recipe` runs by building the cheap parts once.

A class whose `__init__` forwards `**kwargs` takes its parents' keys too (the MRO is followed), or
the fields of the dataclass its `config_options` names (`Strategy`: `TrainOptions`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Any

import torch
from hydra.utils import get_object
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError, PydanticUserError

from common.errors import ConfigError
from trainers.engine.schema import closest, plain

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
UNCHECKED = (Any, object, inspect.Parameter.empty)
BASES = (object, torch.nn.Module)  # their **kwargs take nothing a config sets


def locate(node: dict, key: str):
    path = node.get("_target_")
    try:
        return get_object(str(path))
    except Exception as e:
        raise ConfigError(f"{key}._target_={path!r}: nothing importable has that name "
                          f"({type(e).__name__}); give a module path such as "
                          "minbert.peft.lora.Lora") from None


def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be resolved here: its type is not checked
        return {}


def accepted(target) -> tuple[dict[str, Any], bool]:
    """(key -> annotation, open): the keys `target` takes; open if it takes any key."""
    params: dict[str, Any] = {}
    functions = [c.__init__ for c in inspect.getmro(target)
                 if "__init__" in vars(c) and c not in BASES] if inspect.isclass(target) \
        else [target]
    for fn in functions:
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, True
        hints, var_kw = _hints(fn), False
        for p in signature.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
                params.setdefault(p.name, hints.get(p.name, p.annotation))
        if not var_kw:
            return params, False
        options = getattr(target, "config_options", None)
        if options is not None and dataclasses.is_dataclass(options):
            hints = _hints(options)
            for f in dataclasses.fields(options):
                params.setdefault(f.name, hints.get(f.name, Any))
            return params, False
    return params, not inspect.isclass(target)  # a class's chain ends in object: closed


@functools.lru_cache(maxsize=None)
def _adapter(annotation) -> TypeAdapter | None:
    if annotation in UNCHECKED or isinstance(annotation, str):
        return None
    try:
        return TypeAdapter(annotation, config=ConfigDict(strict=True, arbitrary_types_allowed=True))
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError):
        return None


def _loose(annotation) -> Any:
    """A tuple annotation also takes a list (YAML has no tuples)."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return list[typing.Union[typing.get_args(annotation)]] if typing.get_args(annotation) \
            else list
    if origin in (typing.Union, types.UnionType):
        args = tuple(_loose(a) for a in typing.get_args(annotation))
        return typing.Union[args]
    return annotation


def check_value(key: str, value, annotation) -> list[str]:
    if isinstance(value, dict) and "_target_" in value:
        return check_target(value, key)
    adapter = _adapter(_loose(annotation))
    if adapter is None:
        return []
    try:
        adapter.validate_python(value)
    except ValidationError as e:
        return [f"{key}={value!r}: {plain(e.errors()[0])}"]
    return []


def check_target(node: dict, key: str, filled: tuple[str, ...] = ()) -> list[str]:
    """The problems of the `_target_` node at `key`, one line each (none: it may be built).
    `filled`: the keys the code passes itself (a head's hidden size), which the config may not
    set."""
    target = locate(node, key)
    params, open_ = accepted(target)
    problems = []
    for name, value in node.items():
        if name in HYDRA_KEYS:
            continue
        if name in filled:
            problems.append(f"{key}.{name}: set by the run itself (from the model and the task); "
                            "remove it from the config")
        elif name not in params:
            if not open_:
                problems.append(f"{key}.{name}: unknown key; {target.__name__} takes no such "
                                f"option{closest(name, [p for p in params if p not in filled])}")
        else:
            problems += check_value(f"{key}.{name}", value, params[name])
    return problems
