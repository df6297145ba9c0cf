"""Task samplers (`trainers/strategies/samplers.py`) and PCGrad (`trainers/strategies/pcgrad.py`) for interleaved
multi-task training: sampled task frequencies match the documented probabilities within 5 binomial
standard deviations, schedules are reproducible from the generator's seed, the annealed schedule
flattens monotonically, PCGrad matches a hand-computed example, and bad options fail with clear
errors. Pure CPU, no data, well under 5 s."""
from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from common.errors import ConfigError
from trainers.engine.loop import task_gradients
from trainers.strategies.pcgrad import pcgrad, project_conflicting
from trainers.strategies.samplers import SAMPLERS, make_sampler

# Square numbers keep the expected probabilities easy to check by hand.
SIZES = {"sst": 100, "para": 400, "sts": 25}
DRAWS = 20_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_frequencies(sampler, step: int, expected: dict[str, float]) -> None:
    """Draw DRAWS tasks at `step`; each frequency within 5 binomial sigmas of `expected`."""
    assert sampler.probabilities(step) == pytest.approx(expected, abs=1e-6)
    counts = Counter(sampler.sample(step) for _ in range(DRAWS))
    for task, p in expected.items():
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(counts[task] / DRAWS - p) < 5 * sigma, (task, counts[task] / DRAWS, p)


# -- samplers --------------------------------------------------------------------------------

def test_proportional_frequencies():
    # p_i = n_i / 525
    expected = {"sst": 100 / 525, "para": 400 / 525, "sts": 25 / 525}
    assert_frequencies(make_sampler("proportional", SIZES, 10, gen()), 0, expected)


def test_temperature_frequencies():
    # T=2: p_i ∝ sqrt(n_i) = 10, 20, 5 -> 10/35, 20/35, 5/35
    expected = {"sst": 0.285714, "para": 0.571429, "sts": 0.142857}
    sampler = make_sampler("temperature", SIZES, 10, gen(), temperature=2.0)
    assert_frequencies(sampler, 0, expected)


def test_temperature_limits():
    one = make_sampler("temperature", SIZES, 10, gen(), temperature=1.0).probabilities(0)
    assert one == pytest.approx(make_sampler("proportional", SIZES, 10, gen()).probabilities(0))
    hot = make_sampler("temperature", SIZES, 10, gen(), temperature=1e6).probabilities(0)
    assert hot == pytest.approx({t: 1 / 3 for t in SIZES}, abs=1e-5)


def test_annealed_frequencies_at_start_and_end():
    sampler = make_sampler("annealed", SIZES, 101, gen())
    # step 0: alpha = 1, proportional
    assert_frequencies(sampler, 0, {"sst": 100 / 525, "para": 400 / 525, "sts": 25 / 525})
    # last step: alpha = 0.2, p_i ∝ n_i^0.2 = 2.5119, 3.3145, 1.9037 (sum 7.7301)
    assert sampler.alpha(100) == pytest.approx(0.2)
    assert_frequencies(sampler, 100, {"sst": 0.324953, "para": 0.428778, "sts": 0.246268})


def test_annealed_flattens_monotonically():
    sampler = make_sampler("annealed", SIZES, 50, gen(), alpha_end=0.2)
    alphas = [sampler.alpha(s) for s in range(50)]
    assert alphas[0] == 1.0 and alphas[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    probs = [sampler.probabilities(s) for s in range(50)]
    big, small = [p["para"] for p in probs], [p["sts"] for p in probs]
    assert all(a > b for a, b in zip(big, big[1:]))        # the largest task loses share
    assert all(a < b for a, b in zip(small, small[1:]))    # the smallest task gains share
    assert sampler.alpha(500) == pytest.approx(0.2)         # past the end: stays at alpha_end
    assert make_sampler("annealed", SIZES, 1, gen()).alpha(0) == 1.0


def test_round_robin_exact_cycle():
    sampler = make_sampler("round_robin", SIZES, 7, gen())
    assert sampler.schedule() == ["sst", "para", "sts", "sst", "para", "sts", "sst"]
    assert sampler.probabilities(3) == pytest.approx({t: 1 / 3 for t in SIZES})


@pytest.mark.parametrize("name", ["proportional", "temperature", "annealed"])
def test_schedule_reproducible_from_seed(name):
    first = make_sampler(name, SIZES, 300, gen(1)).schedule()
    assert make_sampler(name, SIZES, 300, gen(1)).schedule() == first
    assert make_sampler(name, SIZES, 300, gen(2)).schedule() != first
    assert len(make_sampler(name, SIZES, 300, gen(1)).schedule(12)) == 12


def test_huge_sizes_do_not_overflow():
    sampler = make_sampler("proportional", {"a": 10**12, "b": 10**12}, 5, gen())
    assert sampler.probabilities(0) == pytest.approx({"a": 0.5, "b": 0.5})


@pytest.mark.parametrize("call, message", [
    (lambda: make_sampler("uniform", SIZES, 10, gen()), "valid samplers: round_robin"),
    (lambda: make_sampler("temperature", SIZES, 10, gen(), temperature=0), "must be a finite"),
    (lambda: make_sampler("temperature", SIZES, 10, gen(), temperature=-1.0), "number > 0"),
    (lambda: make_sampler("annealed", SIZES, 10, gen(), alpha_end=1.5), "in [0, 1]"),
    (lambda: make_sampler("proportional", {}, 10, gen()), "non-empty dict"),
    (lambda: make_sampler("proportional", {"sst": 3, "sts": 0}, 10, gen()), "'sts': 0"),
    (lambda: make_sampler("proportional", {"sst": -2}, 10, gen()), "positive integers"),
    (lambda: make_sampler("proportional", SIZES, 0, gen()), "total_steps=0"),
    (lambda: make_sampler("proportional", SIZES, 10, gen(), temperature=2), "accepted options"),
    (lambda: make_sampler("round_robin", SIZES, 10, None), "torch.Generator"),
])
def test_sampler_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        call()
    assert isinstance(info.value, ConfigError)  # train.py prints it without a traceback


def test_every_sampler_is_buildable():
    for name in SAMPLERS:
        assert make_sampler(name, SIZES, 3, gen()).sample(0) in SIZES


# -- PCGrad ----------------------------------------------------------------------------------

def test_pcgrad_hand_computed_conflict():
    # g1 = [1, 0], g2 = [-1, 1]: g1·g2 = -1 < 0, a conflict.
    # g1' = g1 - (g1·g2 / |g2|²) g2 = [1, 0] + 1/2 [-1, 1] = [0.5, 0.5]
    # g2' = g2 - (g2·g1 / |g1|²) g1 = [-1, 1] + 1 [1, 0]   = [0, 1]
    # update = g1' + g2' = [0.5, 1.5]   (the plain sum would be [0, 1])
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1, p2 = project_conflicting([g1, g2], gen())
    assert torch.allclose(p1, torch.tensor([0.5, 0.5]))
    assert torch.allclose(p2, torch.tensor([0.0, 1.0]))
    (summed,) = pcgrad([[g1], [g2]], gen())
    assert torch.allclose(summed, torch.tensor([0.5, 1.5]))
    # the same vectors split over two parameters, one of them a matrix
    a = pcgrad([[g1[:1], g1[1:].view(1, 1)], [g2[:1], g2[1:].view(1, 1)]], gen())
    assert torch.allclose(a[0], torch.tensor([0.5])) and a[1].shape == (1, 1)
    assert torch.allclose(a[1], torch.tensor([[1.5]]))


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    grads = [[torch.tensor([1.0, 2.0]), torch.ones(2, 2)], [torch.tensor([3.0, 0.5]), None]]
    out = pcgrad(grads, gen())
    assert torch.equal(out[0], torch.tensor([4.0, 2.5]))
    assert torch.equal(out[1], torch.ones(2, 2))  # None counts as zeros


def test_pcgrad_projected_gradients_do_not_conflict():
    torch.manual_seed(0)
    for _ in range(50):
        g1, g2 = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
        p1, p2 = project_conflicting([g1, g2], gen())
        assert torch.dot(p1, g2) >= -1e-10 and torch.dot(p2, g1) >= -1e-10
        if torch.dot(g1, g2) >= 0:
            assert torch.equal(p1, g1) and torch.equal(p2, g2)


def test_pcgrad_seeded_order_and_untouched_params():
    grads = [[torch.randn(5, generator=gen(i)), None] for i in range(3)]
    first = pcgrad(grads, gen(7))
    assert torch.equal(first[0], pcgrad(grads, gen(7))[0])
    assert first[1] is None  # no task touches the second parameter


def test_pcgrad_errors():
    with pytest.raises(ValueError, match="at least one task"):
        pcgrad([], gen())
    with pytest.raises(ValueError, match="same order"):
        pcgrad([[torch.ones(2)], [torch.ones(2), torch.ones(1)]], gen())
    with pytest.raises(ValueError, match="shapes differ"):
        pcgrad([[torch.ones(2)], [torch.ones(3)]], gen())


def test_task_gradients_feed_pcgrad():
    w, unused = torch.tensor([1.0, 1.0], requires_grad=True), torch.zeros(1, requires_grad=True)
    losses = [w[0] - 0 * w[1], -w[0] + w[1]]  # gradients [1, 0] and [-1, 1]
    grads = task_gradients(losses, [w, unused])
    assert grads[0][1] is None and torch.equal(grads[1][0], torch.tensor([-1.0, 1.0]))
    assert torch.allclose(pcgrad(grads, gen())[0], torch.tensor([0.5, 1.5]))
