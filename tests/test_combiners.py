"""Gradient combiners (`trainers/strategies/combiners.py`): GradVac (Wang et al., 2021) against
its update computed by hand from the paper's Algorithm 1, the combiner registry and its errors,
and `trainer=interleaved trainer.combiner=gradvac` end to end."""
import math

import pytest
import torch

from common.errors import ConfigError
from conftest import trained_run
from trainers.strategies.combiners import COMBINERS, PCGrad, Sum, make_combiner
from trainers.strategies.gradvac import GradVac

G1, G2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos(g1, g2) = -1/√2


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_gradvac_first_step_by_hand():
    """Targets start at 0: g1' = g1 + 0.5 g2 = [0.5, 0.5], g2' = g2 + 1 g1 = [0, 1] (each now at
    cosine 0 with the other's original gradient), sum [0.5, 1.5]; both targets move to β·φ."""
    vac = GradVac(beta=0.5)
    (out,) = vac.combine([[G1], [G2]], None)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]), rtol=0, atol=1e-6)
    phi = -1 / math.sqrt(2)
    assert vac.targets[0, 1].item() == pytest.approx(0.5 * phi)
    assert vac.targets[1, 0].item() == pytest.approx(0.5 * phi)


def test_gradvac_second_step_by_hand_reaches_the_target_cosine():
    """With φ̂ = -0.353553 from step 1, w = |g1|(φ̂√(1-φ²) - φ√(1-φ̂²)) / (|g2|√(1-φ̂²)) =
    0.411438 / 1.322876 = 0.311018, so g1' = [0.688982, 0.311018], whose cosine with g2 is
    exactly φ̂; g2' likewise, with w = √2 · 0.411438 / 0.935414."""
    vac = GradVac(beta=0.5)
    vac.combine([[G1], [G2]], None)
    target = vac.targets[0, 1].item()
    (out,) = vac.combine([[G1], [G2]], None)
    g1 = torch.tensor([1 - 0.311018, 0.311018])
    w2 = math.sqrt(2) * 0.411438 / 0.935414
    g2 = G2 + w2 * G1
    assert cos(g1, G2) == pytest.approx(target, abs=1e-5)
    assert cos(g2, G1) == pytest.approx(target, abs=1e-5)
    torch.testing.assert_close(out, g1 + g2, rtol=0, atol=1e-5)


def test_gradvac_leaves_gradients_above_the_target_alone():
    """Gradients whose cosine is above the target (here 0: they agree) are summed as they are."""
    a, b = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 1.0])
    (out,) = GradVac().combine([[a], [b]], None)
    torch.testing.assert_close(out, a + b)


def test_gradvac_is_not_pcgrad_once_targets_move():
    """The oracle can fail: after one step PCGrad and GradVac give different updates (GradVac
    pulls the cosine up to the negative EMA target only, not to 0)."""
    vac = GradVac(beta=0.5)
    vac.combine([[G1], [G2]], None)
    (second,) = vac.combine([[G1], [G2]], None)
    (pc,) = PCGrad().combine([[G1], [G2]], None)
    assert (second - pc).abs().max() > 0.1


def test_gradvac_state_round_trips_and_keeps_multi_parameter_shapes():
    vac = GradVac(beta=0.1)
    grads = [[torch.randn(2, 3), None, torch.randn(4)], [torch.randn(2, 3), None, torch.randn(4)]]
    first = vac.combine(grads, torch.Generator().manual_seed(0))
    assert first[0].shape == (2, 3) and first[1] is None and first[2].shape == (4,)
    again = GradVac(beta=0.1)
    again.load_state_dict(vac.state_dict())
    a = vac.combine(grads, torch.Generator().manual_seed(1))
    b = again.combine(grads, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def test_combiner_registry_and_errors():
    assert set(COMBINERS) == {"sum", "pcgrad", "gradvac"}
    assert isinstance(make_combiner("sum"), Sum) and not make_combiner("sum").every_task
    assert make_combiner({"name": "gradvac", "beta": 0.02}).beta == 0.02
    with pytest.raises(ConfigError, match=r"trainer.combiner='cagrad'; use one of"):
        make_combiner("cagrad")
    with pytest.raises(ConfigError, match=r"trainer.combiner=gradvac: .*'rate'"):
        make_combiner({"name": "gradvac", "rate": 0.1})
    with pytest.raises(ConfigError, match=r"beta=0 must be in \(0, 1\]"):
        GradVac(beta=0)


def test_sum_adds_every_tasks_gradient():
    (a, none) = Sum().combine([[torch.ones(2), None], [torch.full((2,), 2.0), None]], None)
    assert torch.equal(a, torch.full((2,), 3.0)) and none is None


def test_interleaved_gradvac_trains_and_a_sequential_combiner_is_refused(synthetic_root, tmp_path):
    _, metrics = trained_run(synthetic_root, tmp_path / "a", "trainer=interleaved",
                             "trainer.combiner=gradvac", "peft=lora")
    assert "dev/overall" in metrics
    _, metrics = trained_run(synthetic_root, tmp_path / "b", "trainer=interleaved",
                             "trainer.combiner={name:gradvac,beta:0.05}", "peft=lora")
    assert "dev/overall" in metrics
    with pytest.raises(ConfigError, match="a sequential schedule trains one task at a time"):
        trained_run(synthetic_root, tmp_path / "c", "trainer=sequential", "trainer.combiner=pcgrad")
