"""Merging per-task adapters into one update, in weight-delta space.

Each expert (one adapter per task, same base model) is read as its per-layer update
ΔW_i = W_i - W0, [out, in] (for LoRA ΔW_i = s_i B_i A_i), and the experts are combined layer by
layer. The product is formed first and combined second, so every merge here is exact: `linear`
gives Σ λ_i s_i B_i A_i to rounding. Combining the factors instead, as peft's
`add_weighted_adapter(combination_type="linear")` does (A' = Σ c_i A_i, B' = Σ c_i B_i with
c_i = √(λ_i s_i)), is wrong: B'A' = Σ_ij c_i c_j B_i A_j, and the cross terms B_i A_j (i ≠ j) are
updates no expert learned. The price of exactness: the result is a full-rank ΔW per layer, not a
LoRA adapter (peft's `*_svd` variants refactor such a ΔW with a truncated SVD).

| name            | per layer                                         | paper                     |
|-----------------|---------------------------------------------------|---------------------------|
| linear          | Σ λ_i ΔW_i (FedAvg: λ_i = n_i / n, or 1/n)        | McMahan et al., 2017      |
| task_arithmetic | scale · Σ λ_i ΔW_i                                | Ilharco et al., 2023      |
| ties            | trim, elect sign, disjoint mean                   | Yadav et al., 2023        |
| dare            | drop w.p. 1 - density, rescale 1/density, Σ λ_i   | Yu et al., 2024 (DARE)    |
| dare_ties       | DARE's drop, then TIES's election and mean        | Yu et al., 2024           |

(TIES-Merging: "Resolving Interference When Merging Models"; DARE: "Language Models are Super
Mario: Absorbing Abilities from Homologous Models as a Free Lunch".)

TIES and DARE follow peft's `peft.utils.merge_utils` (`ties`, `dare_linear`, `dare_ties`), and
the tests check them against it: trimming keeps the top k = int(density · numel) entries of each
expert's tensor by magnitude; the sign is elected per entry from the sum of the trimmed values
*before* the weights λ_i are applied (ties: sum ≥ 0 elects +); the disjoint mean averages the
weighted values of the experts whose trimmed value is nonzero and has the elected sign, and is 0
where none has. Deviations: DARE draws its masks from a seeded `torch.Generator` (peft uses the
global RNG), in float32 whatever the delta dtype; only peft's "total" sign election is offered.
The TIES paper's final scale λ is the weights' job: scaling every λ_i by c > 0 scales the result
by c.

The module is `merging`, not `merge`: a submodule `merge` would replace the package's `merge`
function (which `minbert.peft.merged` calls) as soon as it was imported.

Use: `deltas = [layer_deltas(m) for m in experts]`, `merged = merge_deltas("ties", deltas,
[1.0] * n, density=0.2)`, then `apply_deltas(plain_base_model, merged)` and evaluate that model.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import nn

from common.errors import ConfigError
from minbert.peft import adapter_layers
from minbert.peft.layer import AdapterLinear

Deltas = dict[str, torch.Tensor]  # module name -> ΔW [out, in]


class MergeError(ConfigError, ValueError):
    """Experts, weights or options that cannot be merged (a ValueError, printed cleanly by
    train.py as a ConfigError)."""


@torch.no_grad()
def layer_deltas(model: nn.Module) -> Deltas:
    """ΔW of every adapter layer of `model`, by module name. Refuses merged layers: their `weight`
    already holds W0 + ΔW, and updates defined through it (DoRA's) would come out wrong."""
    deltas = {}
    for name, layer in adapter_layers(model):
        if layer.merged:
            raise MergeError(f"adapter layer {name!r} is merged; call minbert.peft.unmerge(model) "
                             "before reading its delta")
        deltas[name] = layer.delta_weight().detach()
    if not deltas:
        raise MergeError("the model has no adapter layers, so there is no delta to read")
    return deltas


def _check(deltas: Sequence[Deltas], weights: Sequence[float]) -> list[float]:
    """The weights as floats, once the experts are known to agree on their layers and shapes."""
    if not deltas:
        raise MergeError("no experts to merge: `deltas` is empty")
    if len(weights) != len(deltas):
        raise MergeError(f"{len(weights)} weights for {len(deltas)} experts; give one per expert")
    first = deltas[0]
    for i, other in enumerate(deltas[1:], start=1):
        if lacks := sorted(first.keys() - other.keys()):
            raise MergeError(f"expert {i} has no delta for layer {lacks[0]!r} (expert 0 has)")
        if extra := sorted(other.keys() - first.keys()):
            raise MergeError(f"expert {i} has a delta for layer {extra[0]!r} that expert 0 lacks")
        for key, t in first.items():
            if other[key].shape != t.shape:
                raise MergeError(f"layer {key!r}: expert {i} has shape {tuple(other[key].shape)}, "
                                 f"expert 0 has {tuple(t.shape)}")
    return [float(w) for w in weights]


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise MergeError(f"density={density!r} must be in (0, 1]: the fraction of entries kept")


def _combine(deltas: Sequence[Deltas], weights: Sequence[float], prepare: Callable,
             reduce: Callable) -> Deltas:
    """Per layer: `prepare` each expert's tensor, stack them [n, out, in], and `reduce` the stack
    with the weights shaped [n, 1, 1]."""
    weights = _check(deltas, weights)
    out = {}
    for key, t in deltas[0].items():
        stack = torch.stack([prepare(d[key]) for d in deltas])
        w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
        out[key] = reduce(stack, w.view(-1, *[1] * t.dim()))
    return out


def _weighted_sum(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (stack * w).sum(dim=0)


def _disjoint_mean(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TIES's elect + disjoint merge: the sign of the sum of the (unweighted) trimmed values wins,
    ties go to +; the weighted values that are nonzero and agree with it are averaged."""
    elected = torch.where(stack.sum(dim=0) >= 0, 1, -1)
    agree = stack.sign() == elected  # zeros never agree
    return (stack * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the int(density · numel) entries of largest magnitude, zeroes the rest."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _dropper(density: float, generator: torch.Generator | None, seed: int) -> Callable:
    """DARE's drop: keeps each entry with probability `density` and rescales it by 1/density, so
    the expectation is unchanged. Without a generator, one seeded by `seed` is made on the device
    of the first tensor dropped."""
    state = {"g": generator}

    def drop(t: torch.Tensor) -> torch.Tensor:
        if density >= 1:
            return t
        if state["g"] is None:
            state["g"] = torch.Generator(device=t.device).manual_seed(seed)
        probs = torch.full(t.shape, density, dtype=torch.float32, device=t.device)
        mask = torch.bernoulli(probs, generator=state["g"]).to(t.dtype)
        return t * mask / density

    return drop


def linear(deltas: Sequence[Deltas], weights: Sequence[float]) -> Deltas:
    """Σ λ_i ΔW_i per layer. FedAvg is this with λ_i = n_i / Σ n_j (or 1/n)."""
    return _combine(deltas, weights, lambda t: t, _weighted_sum)


def task_arithmetic(deltas: Sequence[Deltas], weights: Sequence[float],
                    scale: float = 1.0) -> Deltas:
    """scale · Σ λ_i τ_i, the task vectors τ_i being the experts' ΔW."""
    return {k: scale * v for k, v in linear(deltas, weights).items()}


def ties(deltas: Sequence[Deltas], weights: Sequence[float], density: float) -> Deltas:
    """TIES-Merging: trim each expert to its top-`density` entries by magnitude, elect a sign per
    entry, average the agreeing weighted entries (see the module docstring for the details)."""
    _check_density(density)
    return _combine(deltas, weights, lambda t: _trim(t, density), _disjoint_mean)


def dare(deltas: Sequence[Deltas], weights: Sequence[float], density: float,
         generator: torch.Generator | None = None, seed: int = 0) -> Deltas:
    """DARE: drop each entry of each expert with probability 1 - density, rescale the survivors
    by 1/density, then Σ λ_i. Masks are drawn layer by layer, expert by expert, so a generator in
    the same state (or the same `seed`) gives the same merge; density=1 is `linear` exactly."""
    _check_density(density)
    return _combine(deltas, weights, _dropper(density, generator, seed), _weighted_sum)


def dare_ties(deltas: Sequence[Deltas], weights: Sequence[float], density: float,
              generator: torch.Generator | None = None, seed: int = 0) -> Deltas:
    """DARE's drop and rescale, then TIES's sign election and disjoint mean (peft's dare_ties)."""
    _check_density(density)
    return _combine(deltas, weights, _dropper(density, generator, seed), _disjoint_mean)


MERGES: dict[str, Callable[..., Deltas]] = {
    "linear": linear, "task_arithmetic": task_arithmetic, "ties": ties, "dare": dare,
    "dare_ties": dare_ties,
}
# The published defaults of the options a merge cannot do without, used where none is given.
# TIES keeps the top 20 % of each task vector (Yadav et al., 2023: k = 20, their default and the
# best value of their sweep). DARE drops 90 % (Yu et al., 2024: a drop rate p = 0.9 loses nothing
# for fine-tuned language models in their Figure 2, and is the rate their merges use).
DEFAULTS: dict[str, dict[str, float]] = {"ties": {"density": 0.2}, "dare": {"density": 0.1},
                                         "dare_ties": {"density": 0.1}}


def default_options(method: str, given: dict) -> dict:
    """The published defaults (`DEFAULTS`) of the options of `method` that `given` lacks."""
    return {k: v for k, v in DEFAULTS.get(method, {}).items() if k not in given}


def check_merge_options(method: str, options: dict) -> None:
    """Raises MergeError for an unknown method, an option it does not take, or a missing one."""
    if method not in MERGES:
        raise MergeError(f"unknown merge method {method!r}; use one of {sorted(MERGES)}")
    params = list(inspect.signature(MERGES[method]).parameters.values())[2:]
    allowed = [p.name for p in params]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise MergeError(f"merge {method!r} takes no option {unknown}; its options are {allowed}")
    missing = [p.name for p in params if p.default is p.empty and p.name not in options]
    if missing:
        raise MergeError(f"merge {method!r} needs the option(s) {missing}")


def merge_deltas(method: str, deltas: Sequence[Deltas], weights: Sequence[float],
                 **options) -> Deltas:
    """Merges by the method named `method` (a key of MERGES) with its `options` (density, scale,
    generator, seed), checking the options by name first."""
    check_merge_options(method, options)
    return MERGES[method](deltas, weights, **options)


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Deltas) -> nn.Module:
    """Adds each ΔW to the weight of the plain `nn.Linear` of the same name, in place: a base model
    (no adapters, module names as in the experts, e.g. a fresh copy of the model the experts were
    built from) becomes W0 + ΔW_merged. Biases and other tensors are left as they are. Everything
    is checked before any weight is written, so a bad name leaves the model untouched."""
    targets = []
    for name, delta in deltas.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"the model has no module {name!r} to apply the delta to") from None
        if isinstance(module, AdapterLinear):
            raise MergeError(f"{name!r} is an adapter layer; apply merged deltas to a plain base "
                             "model (a copy of the encoder before any adapter was applied)")
        if not isinstance(module, nn.Linear):
            raise MergeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
        if module.weight.shape != delta.shape:
            raise MergeError(f"{name!r}: delta shape {tuple(delta.shape)} does not match the "
                             f"weight's {tuple(module.weight.shape)}")
        targets.append((module.weight, delta))
    for weight, delta in targets:
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    return model
