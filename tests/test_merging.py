"""Adapter merging (`minbert.peft.merging`): every merge in weight-delta space, checked by hand.

The linear (FedAvg) merge of small LoRA layers equals Σ λ_i s_i B_i A_i and, applied to a plain
base model, gives those weights; averaging A and B separately does not (the cross terms). TIES is
worked out by hand on three 6-entry task vectors and compared with peft's `ties` on random ones;
DARE is reproducible from its seed, equals `linear` at density 1, keeps about a `density` fraction
of entries and preserves the mean, and draws the same masks as peft's `dare_linear` from the same
seed. Bad experts, weights and options fail with messages that name what is wrong.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import minbert.peft
from minbert.peft import merging
from minbert.peft.lora import LoraLinear
from minbert.peft.merging import (MERGES, MergeError, apply_deltas, dare, dare_ties, layer_deltas,
                                linear, merge_deltas, task_arithmetic, ties)

SCALINGS = (2.0, 0.5, 1.0)


def base_model(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"q": nn.Linear(5, 4), "v": nn.Linear(5, 3)}).double()


def expert(base: nn.ModuleDict, scaling: float, seed: int) -> nn.ModuleDict:
    """A LoRA expert on a copy of `base`, with random A and B (B is zero at init)."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for name in ("q", "v"):
        layer = LoraLinear(model[name], rank=2, scaling=scaling)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        model[name] = layer
    return model


def experts(base):
    return [expert(base, s, seed=i) for i, s in enumerate(SCALINGS)]


def test_linear_merge_is_the_weighted_sum_of_the_products():
    base = base_model()
    models, weights = experts(base), [0.5, 0.3, 0.2]
    merged = linear([layer_deltas(m) for m in models], weights)
    plain = apply_deltas(copy.deepcopy(base), merged)
    for name in ("q", "v"):
        want = sum(w * m[name].scaling * m[name].lora_B @ m[name].lora_A
                   for w, m in zip(weights, models))
        torch.testing.assert_close(merged[name], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(plain[name].weight, base[name].weight + want)
        assert torch.equal(plain[name].bias, base[name].bias)
    torch.testing.assert_close(task_arithmetic([layer_deltas(m) for m in models], weights,
                                               scale=0.7)["q"], 0.7 * merged["q"])


def test_a_single_applied_expert_reproduces_its_forward():
    base = base_model()
    model = expert(base, 2.0, seed=5)
    plain = apply_deltas(copy.deepcopy(base), layer_deltas(model))
    x = torch.randn(7, 5, dtype=torch.float64)
    for name in ("q", "v"):
        torch.testing.assert_close(plain[name](x), model[name](x))


def test_averaging_the_factors_separately_adds_cross_terms():
    models = experts(base_model())
    n = len(models)
    fedavg = linear([layer_deltas(m) for m in models], [1 / n] * n)["q"]
    factors = [(m["q"].scaling, m["q"].lora_A, m["q"].lora_B) for m in models]
    mean_A = sum(s ** 0.5 * A for s, A, _ in factors) / n  # as peft's "linear": √s on A and B
    mean_B = sum(s ** 0.5 * B for s, _, B in factors) / n
    assert (mean_B @ mean_A - fedavg).abs().max() > 0.1 * fedavg.abs().max()


# TIES by hand: density 0.5 keeps the top 3 of 6 entries of each task vector.
TAUS = [torch.tensor([[4.0, -1.0, 0.5], [3.0, 0.1, -2.0]]),   # trimmed [4, 0, 0, 3, 0, -2]
        torch.tensor([[2.0, 5.0, -0.3], [-1.0, 0.2, -3.0]]),   # trimmed [2, 5, 0, 0, 0, -3]
        torch.tensor([[-1.0, -4.0, 0.4], [0.2, 0.1, 6.0]])]    # trimmed [-1, -4, 0, 0, 0, 6]
# sums [5, 1, 0, 3, 0, 1]: every elected sign is + (0 elects +). Entry 0 averages 4 and 2; entries
# 1 and 5 keep only the positive value; entries 2 and 4 have nothing left and are 0.


def test_ties_by_hand():
    got = ties([{"w": t} for t in TAUS], [1.0, 1.0, 1.0], density=0.5)["w"]
    assert torch.equal(got, torch.tensor([[3.0, 5.0, 0.0], [3.0, 0.0, 6.0]]))


def test_ties_elects_on_unweighted_values_then_averages_weighted_ones():
    # weighted [2, 0, 0, 1.5, 0, -1], [2, 5, 0, 0, 0, -3], [-2, -8, 0, 0, 0, 12]. Election on the
    # unweighted sums (as peft) keeps entry 1 at +5; electing on weighted sums would give -8.
    got = ties([{"w": t} for t in TAUS], [0.5, 1.0, 2.0], density=0.5)["w"]
    assert torch.equal(got, torch.tensor([[2.0, 5.0, 0.0], [1.5, 0.0, 12.0]]))


def test_ties_sign_tie_elects_plus():
    got = ties([{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([-2.0, 3.0])}],
               [1.0, 1.0], density=1.0)["w"]
    assert torch.equal(got, torch.tensor([2.0, 3.0]))


def random_deltas(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(8, 6, generator=g), "b": torch.randn(5, 7, generator=g)}
            for _ in range(n)]


def peft_merge_utils():
    """peft's merge_utils.py, loaded on its own (it needs only torch): importing `peft` would
    import transformers, seconds of the test's time."""
    spec = importlib.util.find_spec("peft")  # a dev dependency: never skipped
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:The density 1.0")
def test_ties_and_dare_match_peft():
    mu = peft_merge_utils()
    deltas, weights = random_deltas(), [0.7, 1.3, 0.4]
    w = torch.tensor(weights)
    for density in (0.3, 0.5, 1.0):
        got = ties(deltas, weights, density)
        for key in ("a", "b"):
            torch.testing.assert_close(got[key], mu.ties([d[key] for d in deltas], w, density))
    got = dare(deltas, weights, 0.4, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)  # peft draws from the global generator, layer by layer, expert by expert
    for key in ("a", "b"):
        torch.testing.assert_close(got[key], mu.dare_linear([d[key] for d in deltas], w, 0.4))
    got = dare_ties(deltas, weights, 0.4, seed=4)
    torch.manual_seed(4)
    for key in ("a", "b"):
        torch.testing.assert_close(got[key], mu.dare_ties([d[key] for d in deltas], w, 0.4))


def test_dare_is_reproducible_and_equals_linear_at_density_one():
    deltas, weights = random_deltas(), [0.5, 0.25, 0.25]
    first = dare(deltas, weights, 0.5, generator=torch.Generator().manual_seed(1))
    again = dare(deltas, weights, 0.5, generator=torch.Generator().manual_seed(1))
    other = dare(deltas, weights, 0.5, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["a"], other["a"])
    assert all(torch.equal(a, b) for a, b in zip(dare(deltas, weights, 1.0, seed=9).values(),
                                                 linear(deltas, weights).values()))


def test_dare_keeps_a_density_fraction_and_preserves_the_mean():
    t = 1 + torch.rand(1000, 1000, generator=torch.Generator().manual_seed(0))
    got = dare([{"w": t}], [1.0], density=0.3, seed=1)["w"]  # seed 0 would redraw t's uniforms
    kept = got != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # std ≈ 0.0005
    torch.testing.assert_close(got[kept], t[kept] / 0.3)
    assert abs(got.mean().item() / t.mean().item() - 1) < 0.01  # std ≈ 0.001


def test_merge_deltas_dispatches_by_name():
    deltas, weights = random_deltas(), [1.0, 1.0, 1.0]
    assert set(MERGES) >= {"linear", "task_arithmetic", "ties", "dare"}
    assert torch.equal(merge_deltas("ties", deltas, weights, density=0.5)["a"],
                       ties(deltas, weights, 0.5)["a"])
    assert torch.equal(merge_deltas("task_arithmetic", deltas, weights, scale=2.0)["b"],
                       2.0 * linear(deltas, weights)["b"])


@pytest.mark.parametrize("call, match", [
    (lambda d: merge_deltas("mean", d, [1, 1, 1]), r"unknown merge method 'mean'.*'dare'.*'ties'"),
    (lambda d: merge_deltas("ties", d, [1, 1, 1]), r"needs the option\(s\) \['density'\]"),
    (lambda d: merge_deltas("linear", d, [1, 1, 1], density=0.5), r"takes no option \['density'\]"),
    (lambda d: ties(d, [1, 1, 1], density=0.0), r"density=0.0 must be in \(0, 1\]"),
    (lambda d: dare(d, [1, 1, 1], density=1.5), r"density=1.5 must be in \(0, 1\]"),
    (lambda d: linear(d, [1, 1]), r"2 weights for 3 experts"),
    (lambda d: linear([], []), r"no experts"),
    (lambda d: linear([d[0], {"a": d[1]["a"]}], [1, 1]), r"expert 1 has no delta for layer 'b'"),
    (lambda d: linear([d[0], {**d[1], "c": d[1]["a"]}], [1, 1]), r"layer 'c' that expert 0 lacks"),
    (lambda d: linear([d[0], {**d[1], "b": d[1]["a"]}], [1, 1]),
     r"layer 'b': expert 1 has shape \(8, 6\), expert 0 has \(5, 7\)"),
])
def test_bad_merges_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call(random_deltas())


def test_reading_and_applying_deltas_refuse_the_wrong_models():
    base = base_model()
    model = expert(base, 1.0, seed=0)
    deltas = layer_deltas(model)
    with pytest.raises(MergeError, match="no adapter layers"):
        layer_deltas(base)
    model["q"].merge()
    with pytest.raises(MergeError, match=r"'q' is merged; call minbert.peft.unmerge"):
        layer_deltas(model)
    with pytest.raises(MergeError, match=r"'q' is an adapter layer"):
        apply_deltas(model, deltas)
    with pytest.raises(MergeError, match=r"no module 'k'"):
        apply_deltas(base, {**deltas, "k": deltas["q"]})
    plain = copy.deepcopy(base)
    with pytest.raises(MergeError, match=r"'v': delta shape \(4, 5\) does not match"):
        apply_deltas(plain, {"q": deltas["q"], "v": deltas["q"]})
    assert torch.equal(plain["q"].weight, base["q"].weight)  # checked before anything is written


def test_importing_this_module_leaves_the_package_merge_function_alone():
    # a submodule named `merge` would replace `minbert.peft.merge` (the function that `merged`
    # calls) with itself as soon as it is imported; hence the name `merging`
    assert callable(minbert.peft.merge) and "Yadav" in merging.__doc__
    layer = nn.ModuleDict({"q": LoraLinear(nn.Linear(3, 3), rank=2, scaling=1.0)})
    with minbert.peft.merged(layer):
        assert layer["q"].merged
