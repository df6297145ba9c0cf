"""A run built once, in order, after its config is checked (torchtune's recipes: `_setup_model`,
`_setup_optimizer`, `_setup_data`, each part built once from a validated config).

`check_config(cfg)` is the one check of a composed config: the schema (`trainers.engine.schema`,
`trainers.engine.targets`), then the rules across keys, building on the way the parts that cost
nothing (the strategy, the PEFT method, the logger, the task list, the device), which it returns
as a `Checked` run. Nothing is read from the data folder or written anywhere before it passes.
`setup(checked, ...)` then builds the rest (the model, the data, the `RunContext`) exactly once.
`train.py`, `trainers.engine.run`, `trainers.engine.record.load_run`, the scripts and the
benchmarks all come through here.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import CheckpointError, ConfigError
from minbert.model import BertConfig
from minbert.peft import PeftMethod, check_mergeable
from tasks.base import Task
from trainers.engine.build import build, build_method, check_head, resolve_device, run_tasks
from trainers.engine.optim import optimizer_choice
from trainers.engine.precision import check_precision
from trainers.engine.schema import RunSchema, check_sections, closest
from trainers.engine.targets import HYDRA_KEYS, check_target, check_value

HEAD_SIZES = ("hidden_size", "num_outputs", "label_range")  # a head's sizes come from the run
KINDS = ("single_classification", "single_regression", "pair_classification", "pair_regression")


@dataclass(frozen=True)
class Checked:
    """A config that passed every check, with the parts built while checking it (once)."""

    cfg: DictConfig
    schema: RunSchema
    tasks: list[Task]
    trainer: object
    method: PeftMethod
    logger: object
    device: torch.device
    encoder: BertConfig | None  # the encoder's config, read without loading its weights


def as_container(cfg: DictConfig) -> dict:
    """The config resolved to plain containers; a broken interpolation or a `???` is an error
    naming its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "(config)"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def check_config(cfg: DictConfig, overrides: list[str] | None = None) -> Checked:
    """The whole config checked (see the module docstring); `overrides`: the command line's, for
    the rules about keys given together."""
    container = as_container(cfg)
    container.pop("hydra", None)
    schema = check_sections(container)
    problems = check_target(container["peft"], "peft") + check_target(
        container["trainer"], "trainer") + check_target(container["logger"], "logger")
    for kind in KINDS:
        node = container["heads"].get(kind)
        if node is not None:
            problems += check_target(node, f"heads.{kind}", filled=HEAD_SIZES)
    if problems:
        raise ConfigError("\n".join(problems))
    device = resolve_device(schema.device)
    check_precision(schema.precision, device)
    encoder = encoder_config(container["model"]["encoder"])
    check_max_length(schema.model.max_length, encoder)
    check_lrs(container)
    trainer, method = build_parts(cfg)
    logger = build(cfg.logger, "logger")
    check_task_keys(cfg, overrides or [])
    tasks = run_tasks(cfg, trainer)
    trainer.check_tasks([t.name for t in tasks])
    for task in tasks:
        check_head(container["heads"], task)
    if trainer.merges:
        check_mergeable(method, trainer.merges)
    optimizer_choice(trainer.options.optimizer, method, schema.optim.state_bits)
    return Checked(cfg, schema, tasks, trainer, method, logger, device, encoder)


def build_parts(cfg: DictConfig) -> tuple[object, PeftMethod]:
    """The strategy and the PEFT method, built from a config that passed the schema (here, and
    in `trainers.engine.record.load_run` from a finished run's saved config)."""
    return build(cfg.trainer, "trainer"), build_method(cfg)


def encoder_config(node: dict) -> BertConfig | None:
    """The config of the encoder `model.encoder` builds, checked key by key against `BertConfig`
    (and its checkpoint found), without loading any weight; None for an encoder of another kind
    (its own target's signature is checked instead)."""
    target = str(node.get("_target_", ""))
    given = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    own = {"from_pretrained": ("name_or_path",), "from_config": ("seed", "config")}
    kind = next((k for k in own if target == f"minbert.BertModel.{k}"
                 or target == f"minbert.model.BertModel.{k}"), None)
    if kind is None:
        problems = check_target(node, "model.encoder")
        if problems:
            raise ConfigError("\n".join(problems))
        return None
    fields = {f.name for f in dataclasses.fields(BertConfig)}
    hints = typing.get_type_hints(BertConfig)
    problems = []
    for key, value in given.items():
        if key in own[kind]:
            continue
        if key not in fields:
            problems.append(f"model.encoder.{key}: unknown key; BertModel.{kind} takes "
                            f"{list(own[kind])} and BertConfig's fields"
                            f"{closest(key, list(fields) + list(own[kind]))}")
        elif value is not None:
            problems += check_value(f"model.encoder.{key}", value, hints[key])
    if problems:
        raise ConfigError("\n".join(problems))
    fields_given = {k: v for k, v in given.items() if k not in own[kind]}
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = fields_given.get(key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"model.encoder.{key}={value!r} must be in [0, 1)")
    try:
        if kind == "from_config":
            return BertConfig(**fields_given)
        from minbert.checkpoint import resolve_checkpoint

        folder = resolve_checkpoint(str(given.get("name_or_path")))
        return BertConfig.from_json(folder / "config.json", **fields_given)
    except CheckpointError as e:
        raise type(e)(f"model.encoder: {e}") from None
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"model.encoder: {e}") from None


def check_max_length(max_length: int, encoder: BertConfig | None) -> None:
    if encoder is not None and max_length > encoder.max_position_embeddings:
        raise ConfigError(f"model.max_length={max_length}: the encoder has "
                          f"{encoder.max_position_embeddings} position embeddings; use at most "
                          f"model.max_length={encoder.max_position_embeddings}")


def check_lrs(container: dict) -> None:
    """The optimizer's lr and weight decay, and the method's lr: what AdamW would refuse only
    once training starts. An lr of 0 is allowed: it trains nothing (an evaluation of the start,
    or a test of early stopping)."""
    optimizer = container["trainer"].get("optimizer") or {}
    for key, value in (("peft.lr", container["peft"].get("lr")),
                       ("trainer.optimizer.lr", optimizer.get("lr")),
                       ("trainer.optimizer.weight_decay", optimizer.get("weight_decay"))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not 0 <= value < math.inf:
            raise ConfigError(f"{key}={value!r} must be a number >= 0")


def check_task_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """`order=` is a preset of `tasks=`, and `trainer.task=` (trainer=single) trains one task
    whatever `tasks` says: given together, or `tasks`/`order` given to a strategy that trains its
    own `trainer.task`, one would silently replace the other, so they are refused."""
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides if "=" in o}
    for a, b in (("order", "tasks"), ("trainer.task", "tasks"), ("trainer.task", "order")):
        if a in given and b in given:
            raise ConfigError(f"`{given[a]}` and `{given[b]}` both choose the tasks of the run; "
                              f"give one of them" + (" (order=x-y-z is tasks=[x,y,z])"
                                                     if a == "order" else ""))
    single = cfg.trainer.get("task")
    chosen = given.get("tasks") or given.get("order")
    if single and chosen and "trainer.task" not in given:
        raise ConfigError(f"`{chosen}` would be ignored: this trainer trains trainer.task="
                          f"{single} alone (trainer=single's default); give trainer.task=<name> "
                          "instead")


def checked(cfg_or_checked) -> Checked:
    """A `Checked` run from a composed config (checked now) or one already checked."""
    return cfg_or_checked if isinstance(cfg_or_checked, Checked) else check_config(cfg_or_checked)
