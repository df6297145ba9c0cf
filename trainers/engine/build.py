"""Building a run's parts from its composed Hydra config: any `_target_` node (with errors that
name the config key), the seeds, the device, the PEFT method, the model (encoder, method, one head
per task), the tasks a run trains and its tokenized data. Shared by `trainers.engine.run` (training) and
`trainers.engine.record` (rebuilding a finished run)."""
from __future__ import annotations

import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from minbert.checkpoint import load_tokenizer
from common.errors import ConfigError, MinbertError
from minbert.peft import PeftMethod
from tasks.registry import get_tasks
from tasks.base import Task
from tasks.batching import EncodedSplit
from tasks.model import MultitaskModel


def build(node: DictConfig, key: str, **kwargs):
    """`hydra.utils.instantiate`, with errors that name the config key instead of a deep trace."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MinbertError):
            message = str(cause)
            raise type(cause)(message if message.startswith(key) else f"{key}: {message}"
                              ) from cause
        raise ConfigError(f"cannot build `{key}` from its config: {e}") from e


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`device=`: auto (a GPU if one is visible, else the CPU), cpu, cuda or cuda:<n>, mps; a
    device that this machine does not have is refused, naming what it has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:<n>"
                          ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or "
                              "auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name!r} but this machine has {count} GPU(s): "
                              f"cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use device=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r}: minBERT runs on cpu, cuda or mps; use device=auto")
    return device


def run_tasks(cfg: DictConfig, trainer) -> list[Task]:
    """The tasks a run trains, in order, each read from its `task/<name>.yaml`: the trainer's own
    (`trainer=single trainer.task=sts`), else `tasks` (which `order=` presets set)."""
    names = trainer.tasks or cfg.get("tasks")
    if not names:
        raise ConfigError("tasks: no tasks to train; set tasks=[sst,para,sts] or order=...")
    return get_tasks(list(names))


def check_head(heads, task: Task) -> None:
    """`heads` (the config's node) has an entry for the task's kind, with every key the task
    file's `head:` sets."""
    node = heads.get(task.kind)
    if node is None:
        raise ConfigError(f"heads={heads.get('design')} has no `{task.kind}` entry, the head "
                          f"settings of task {task.name}'s kind; add one to conf/heads/")
    unknown = [k for k in task.head if k not in node]
    if unknown:
        raise ConfigError(f"{task.file}: head.{unknown[0]}: heads.{task.kind} "
                          f"({node.get('_target_')}) has no such setting; it has "
                          f"{[k for k in node if k != '_target_']}")


def build_head(cfg: DictConfig, task: Task, hidden_size: int) -> nn.Module:
    """The task's head: `heads.<its kind>` with the task file's `head:` keys over it, sized from
    the task: its outputs, and for a head with an aggregator on a regression task, the label_range
    the scaled cosine spans."""
    check_head(cfg.heads, task)
    node = OmegaConf.merge(cfg.heads[task.kind], task.head)
    sizes = {"num_outputs": task.num_outputs}
    if task.is_regression and "aggregator" in node:
        sizes["label_range"] = list(task.label_range)
    return build(node, f"heads.{task.kind} (task {task.name})", hidden_size=hidden_size, **sizes)


def build_method(cfg: DictConfig) -> PeftMethod:
    method = build(cfg.peft, "peft")
    if not isinstance(method, PeftMethod):
        raise ConfigError(f"peft: {type(method).__name__} has no apply(encoder) method")
    return method


def build_model(cfg: DictConfig, tasks, method: PeftMethod | None = None,
                encoder: nn.Module | None = None) -> MultitaskModel:
    """The encoder (`cfg.model.encoder`, unless one is given) with the PEFT method applied, and a
    fresh (trainable) head per task."""
    encoder = encoder if encoder is not None else build(cfg.model.encoder, "model.encoder")
    try:
        encoder = (method or build_method(cfg)).apply(encoder)
    except ConfigError as e:
        raise ConfigError(f"peft: {e}") from e
    heads = {t.name: build_head(cfg, t, encoder.hidden_size) for t in tasks}
    return MultitaskModel(encoder, heads, pooling=cfg.model.pooling)


def encode_data(cfg: DictConfig, model: MultitaskModel, raw: dict) -> dict:
    """split -> task -> EncodedSplit, tokenized once, pairs encoded as each head needs."""
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    out: dict[str, dict[str, EncodedSplit]] = {}
    for task_name, splits in raw.items():
        joint = getattr(model.heads[task_name], "joint", False)
        for split, data in splits.items():
            out.setdefault(split, {})[task_name] = EncodedSplit(data, tokenizer,
                                                                cfg.model.max_length, joint)
    return out
