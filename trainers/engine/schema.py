"""The run's config schema, checked once, right after Hydra composes the config and before anything
is built, read or written (the "check before you act" of torchtune's recipes and
lightning-hydra-template's validated configs; the types and ranges by pydantic, Colvin et al.).

Three layers, each refusing with one `error:` line per problem that names the key, the value,
what is allowed and, for an unknown key, the closest known one:

- the plain sections (`data`, `checkpoint`, `optim`, `model`, `heads`, the top-level keys):
  pydantic models below, strict (no `"3"` for 3, no 1.5 for an integer) and closed (a key added
  with `+` that nothing reads is refused);
- the `_target_` nodes (`peft`, `trainer` and its parts, `logger`, `model.encoder`, the heads):
  the schema of each is its target's own signature and annotations (a PEFT method's dataclass,
  `Strategy` and its `TrainOptions`, ...), so a method's options live in one place, its class;
  their ranges are the checks their constructors make, run here by building the cheap parts once
  (`trainers.engine.recipe` reuses them; nothing is built twice);
- the rules across keys (`check_rules`): tasks that exist, the single task against `tasks`,
  merge weights one per task, `max_length` within the encoder's positions, a device that exists,
  the precision for that device, a mergeable method for a merging strategy, a heads entry for
  every task's kind.

Defaults live in the YAML files of `conf/` alone: the schema declares no defaults, so a key
missing from the composed config is an error here rather than a value made up in code.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, lt=1)]
TargetNode = dict[str, Any]  # a `_target_` node: checked against its target (targets.py)


class Section(BaseModel):
    """A closed, strict config section: unknown keys and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DataSection(Section):
    root: str | None
    batch_size: PositiveInt
    eval_batch_size: PositiveInt
    limit_train: PositiveInt | None
    limit_eval: PositiveInt | None
    predict_test: bool
    cache_dir: str | None
    download: Literal["auto", "never"]
    allow_changed: bool  # a resumed run may read changed data files


class CheckpointSection(Section):
    every_n_steps: Annotated[int, Field(ge=0)]  # 0: at epoch ends only
    keep: PositiveInt


class OptimSection(Section):
    state_bits: Literal[32, 8]


class ModelSection(Section):
    name: str
    tokenizer: str
    pooling: Literal["pooler", "cls", "mean"]
    max_length: Annotated[int, Field(ge=2)]  # [CLS] and [SEP] at least
    encoder: TargetNode


class HeadsSection(Section):
    design: str
    dropout: Probability
    proj_dim: PositiveInt | None = None  # concat projects nothing
    single_classification: TargetNode | None = None  # a heads config may leave a kind out
    single_regression: TargetNode | None = None
    pair_classification: TargetNode | None = None
    pair_regression: TargetNode | None = None


class RunSchema(Section):
    """The composed config of `train.py` (conf/config.yaml and its groups), Hydra's node aside."""

    tasks: Annotated[list[str], Field(min_length=1)]
    seed: Annotated[int, Field(ge=0, lt=2**32)]  # numpy's seeds
    experiment_name: str | None
    device: str
    precision: Literal["fp32", "auto", "bf16", "fp16"]
    progress: bool
    optim: OptimSection
    checkpoint: CheckpointSection
    resume: str | None
    model: ModelSection
    peft: TargetNode
    heads: HeadsSection
    trainer: TargetNode
    data: DataSection
    logger: TargetNode


HINTS = {  # what to write instead, for the mistakes people make
    ("tasks", "list_type"): "give a list: tasks=[sst] or tasks=[sst,para,sts]",
    ("seed", "less_than"): "seeds are in [0, 2**32)",
    ("seed", "greater_than_equal"): "seeds are in [0, 2**32)",
}


PLAIN = {  # pydantic's messages for a wrong type, in the words of a config
    "int_type": "must be a whole number", "int_from_float": "must be a whole number",
    "int_parsing": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "string_type": "must be a string",
    "list_type": "must be a list, e.g. [a,b]", "dict_type": "must be a mapping {key: value}",
    "finite_number": "must be a finite number",
}


def plain(error: dict) -> str:
    """What a value must be, from one pydantic error."""
    return PLAIN.get(error["type"]) or error["msg"].replace("Input should be", "must be").replace(
        " should ", " must ", 1)


def closest(key: str, known) -> str:
    """`; did you mean `x`?` for the closest of `known` to `key`, else `; the keys here are ...`."""
    known = sorted(k for k in known if not k.startswith("_"))
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else f"; the keys here are {known}"


def dotted(loc) -> str:
    return ".".join(str(p) for p in loc)


def describe(error: dict, prefix: str = "", known=None) -> str:
    """One line for one pydantic error: the key, the value, what is allowed."""
    key = prefix + dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key{closest(str(error['loc'][-1]), known or [])}"
    if error["type"] == "missing":
        return f"{key}: missing; every run needs it (set it in conf/ or on the command line)"
    hint = HINTS.get((key, error["type"]))
    what = plain(error)
    return f"{key}={error['input']!r}: {what}" + (f" ({hint})" if hint else "")


def section_keys(model: type[BaseModel], loc) -> list[str]:
    """The keys the section at `loc` (a path of field names) declares."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def check_sections(config: dict) -> RunSchema:
    """The plain sections and top-level keys against `RunSchema`; every problem found, one line
    each, in one ConfigError."""
    try:
        return RunSchema.model_validate(config)
    except ValidationError as e:
        lines = [describe(err, known=section_keys(RunSchema, err["loc"])) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
