"""The contract between PEFT methods and the training loop (`minbert.peft.contract`): every method
a `conf/peft/*.yaml` builds declares its name, its Capabilities and merge_eval on its own class,
its hooks are `TrainingHooks` (its own when it subclasses `NoHooks`, the no-op default otherwise),
and the check that says so fails for a class that breaks the contract."""
from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

import pytest
import torch
import yaml

from conftest import CONF
from minbert.peft.contract import (HOOKS, NO_HOOKS, Capabilities, NoHooks, TrainingHooks,
                                   capabilities, declaration_problems, training_hooks)
from peft_cases import CONFIGS, METHODS

WITH_HOOKS = {"adalora", "dylora", "galore", "gradnormlorp"}  # the methods whose hooks do something


def method_class(config: str) -> type:
    target = yaml.safe_load((CONF / "peft" / f"{config}.yaml").read_text())["_target_"]
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_configured_method_keeps_the_contract(config):
    cls = method_class(config)
    assert declaration_problems(cls) == []
    method = METHODS[config]()
    hooks = training_hooks(method)
    assert isinstance(hooks, TrainingHooks)
    assert isinstance(capabilities(method), Capabilities)
    assert isinstance(method.name, str) and isinstance(method.merge_eval, bool)
    assert (hooks is method) == (config in WITH_HOOKS), "a method with hooks subclasses NoHooks"
    assert (hooks is NO_HOOKS) == (config not in WITH_HOOKS)
    assert isinstance(hooks.state_dict(), dict)  # never None, even before apply
    if not capabilities(method).mergeable:
        assert method.merge_eval is False


def test_the_configs_names_are_the_methods_names():
    """`peft=<file>` builds a method that calls itself <file> (adapter metadata, messages), or,
    for a file that configures another file's method with other options (pissa: lora's class with
    init=pissa), that file's name."""
    for config in CONFIGS:
        name = METHODS[config]().name
        assert name == config or (name in CONFIGS and method_class(name) is method_class(config))
    assert METHODS["pissa"]().name == "lora"


def test_own_optimizer_methods_tag_their_groups_for_galore_adamw():
    own = {c for c in CONFIGS if capabilities(METHODS[c]()).own_optimizer}
    assert own == {"galore", "gradnormlorp"}
    exported = {c for c in CONFIGS if capabilities(METHODS[c]()).peft_export}
    assert {"lora", "lora_fa", "dora", "peft"} <= exported
    seams = {c: capabilities(METHODS[c]()).seam for c in CONFIGS}
    assert {c: s for c, s in seams.items() if s} == {"houlsby": "residual", "pfeiffer": "residual",
                                                     "prefix": "kv_prefix", "prompt": "prompt"}


# ---- the check can fail --------------------------------------------------------------------------
@dataclasses.dataclass
class HiddenHooks:
    """A method that defines hooks but does not subclass NoHooks: the loop would adapt it to the
    no-op default and never call them."""

    merge_eval: bool = True
    name: ClassVar[str] = "hidden"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def apply(self, encoder):
        return encoder

    def after_step(self, model, step, total_steps, generator):
        raise AssertionError("never called")

    def extra_loss(self, model):
        return torch.zeros(())


class Parent(NoHooks):
    name: ClassVar[str] = "parent"
    capabilities: ClassVar[Capabilities] = Capabilities()
    merge_eval: ClassVar[bool] = False


class Undeclared(Parent):
    """Inherits its parent's declarations instead of making its own, and renames a hook's
    parameters."""

    def after_step(self, model, i, n, generator):
        return None


class Claims(Parent):
    """Claims an optimizer and an export it has no means for."""

    name: ClassVar[str] = "claims"
    capabilities: ClassVar[Capabilities] = Capabilities(own_optimizer=True, peft_export=True)


class Child(HiddenHooks):
    pass


def test_the_contract_check_catches_hooks_without_nohooks():
    assert training_hooks(HiddenHooks()) is NO_HOOKS  # what the loop would do with it
    problems = declaration_problems(HiddenHooks)
    assert problems == ["HiddenHooks defines extra_loss, after_step without subclassing NoHooks: "
                        "the loop would never call them"]
    assert any("without subclassing NoHooks" in p for p in declaration_problems(Child))


def test_the_contract_check_catches_missing_declarations():
    assert declaration_problems(Parent) == []
    problems = declaration_problems(Undeclared)
    assert len(problems) == 3
    assert "Undeclared declares no `name: ClassVar[str]` of its own" in problems
    assert "Undeclared declares no `capabilities: ClassVar[Capabilities]` of its own" in problems
    assert any("Undeclared.after_step(self, model, i, n, generator) does not keep the Protocol's "
               "after_step(self, model: 'nn.Module', step: 'int'" in p for p in problems)
    assert declaration_problems(Claims) == [
        "Claims declares own_optimizer but no param_groups hook to tag its groups",
        "Claims declares peft_export but has no peft_adapter(encoder)"]

    class Merging(NoHooks):
        name: ClassVar[str] = "merging"
        capabilities: ClassVar[Capabilities] = Capabilities(not_mergeable="it cannot")
        merge_eval = True

    assert declaration_problems(Merging) == [
        "Merging evaluates merged by default, but declares it cannot merge"]
    assert set(HOOKS) == {"param_groups", "start_training", "extra_loss", "after_step",
                          "state_dict", "load_state_dict", "variants", "report_variants",
                          "report"}
