"""`peft=peft`: any tuner of the `peft` library (Mangrulkar et al., 2022) on minBERT, for the
methods this project does not implement itself (LoHa, LoKr, OFT, BOFT, FourierFT, ...).

    python train.py peft=peft peft.config._target_=peft.LoHaConfig peft.config.r=8 \\
        "peft.config.target_modules=[query,value]"

The options that name modules (`target_modules`, `feedforward_modules`, `modules_to_save`,
`exclude_modules`, and the keys of `rank_pattern` / `alpha_pattern`) use transformers' BERT
names (`query`, `attention.self.query`, `intermediate.dense`, `output.dense`, ...), matched as
peft matches them on `transformers.BertModel` (a name or dotted suffix, or a regex over the full
name), and translated to minBERT's own module names before `peft.inject_adapter_in_model`
applies the tuner; `peft_adapter` gives the result back in peft's own format, under
transformers' names, so `peft.PeftModel.from_pretrained` loads it on `transformers.BertModel`.
Prompt-learning tuners (prompt, prefix, p-tuning) change the inputs, not modules: they cannot go
through this bridge, and `peft=prompt` / `peft=prefix` implement them here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from minbert.checkpoint import minbert_to_hf_key
from common.errors import ConfigError
from minbert.peft.contract import Capabilities

NAMED = ("target_modules", "feedforward_modules", "modules_to_save", "exclude_modules")
PREFIX = "base_model.model."


def hf_names(encoder: nn.Module) -> dict[str, str]:
    """minBERT module name -> transformers' name, for every Linear and LayerNorm (a peft tuner
    layer in place of one included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in encoder.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm, BaseTunerLayer)):
            try:
                out[name] = minbert_to_hf_key(f"{name}.weight").removesuffix(".weight")
            except KeyError:
                continue
    return out


def translate(value, names: dict[str, str], key: str):
    """peft's module option `value` (HF names) -> the same selection in minBERT's names."""
    if value is None:
        return None
    if isinstance(value, str):  # peft: a regex over the full module name
        chosen = [ours for ours, hf in names.items() if re.fullmatch(value, hf)]
    else:
        wanted = list(value)
        chosen = [ours for ours, hf in names.items()
                  if any(hf == t or hf.endswith("." + t) for t in wanted)]
    if not chosen:
        raise ConfigError(f"peft.config.{key}={value!r} matches no module of the encoder; "
                          f"transformers' BERT names look like {sorted(set(names.values()))[:4]}")
    return chosen


@dataclass
class PeftBridge:
    """`peft=peft`: `config` is a peft config object (Hydra builds it from `peft.config`)."""

    config: object = None
    lr: float | None = None
    name: ClassVar[str] = "peft"
    capabilities: ClassVar[Capabilities] = Capabilities(
        not_mergeable="its peft tuner folds in through peft's own merge, which this framework's "
                      "merges do not drive", peft_export=True)
    merge_eval: ClassVar[bool] = False

    def __post_init__(self):
        import peft

        if not isinstance(self.config, peft.PeftConfig):
            raise ConfigError("peft.config must name a peft config, e.g. "
                              "peft.config._target_=peft.LoHaConfig")
        if self.config.is_prompt_learning:
            ours = {"PROMPT_TUNING": "peft=prompt", "PREFIX_TUNING": "peft=prefix"}
            kind = str(self.config.peft_type).split(".")[-1]
            raise ConfigError(f"peft's {kind} is a prompt-learning tuner: it changes the inputs, "
                              "not modules, and cannot go through the bridge; use "
                              f"{ours.get(kind, 'peft=prompt or peft=prefix')}, implemented here")
        self.hf_config = self.config.to_dict()  # the HF-named original, for export

    def apply(self, encoder: nn.Module) -> nn.Module:
        import peft

        for p in encoder.parameters():
            p.requires_grad_(False)
        names = hf_names(encoder)
        for key in NAMED:
            if getattr(self.config, key, None) is not None:
                setattr(self.config, key, translate(getattr(self.config, key), names, key))
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self.config, key, None) or {}
            setattr(self.config, key, {ours: v for k, v in pattern.items()
                                       for ours in translate([k], names, key)} or pattern)
        peft.inject_adapter_in_model(self.config, encoder)
        return encoder

    def peft_adapter(self, encoder: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """What `minbert.peft.io.export_peft` writes: the config as given, with transformers' module
        names, and the trained tensors under transformers' names (the adapter name dropped, as
        peft saves)."""
        names = hf_names(encoder)
        state = {}
        for name, p in encoder.named_parameters():
            if not p.requires_grad:
                continue
            module = max((m for m in names if name.startswith(m + ".") and "base_layer" not in m),
                         key=len, default=None)
            if module is None:
                raise ConfigError(f"{name}: no transformers name for its module")
            leaf = name[len(module) + 1:].replace(".default", "")
            state[f"{PREFIX}{names[module]}.{leaf}"] = p
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in self.hf_config.items()}
        return config, state
