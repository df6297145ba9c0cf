"""Our GaLore AdamW (`minbert.optim`) against galore-torch 1.0's `GaLoreAdamW`, the oracle.

Both optimizers get identical fixed gradients (set on `p.grad`, no model forward), so any difference
in the weights comes from the optimizers. The expected projector shapes, refresh steps and state
bytes are written out by hand from the paper and galore-torch's code, and cross-checked against it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from minbert.optim import GaLoreAdamW, GaLoreProjector, optimizer_state_bytes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import galore_torch

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SHAPES = {"square": (32, 32), "tall": (64, 16), "wide": (16, 64)}
RANK, GAP, SCALE, WD, LR = 4, 3, 0.25, 0.01, 1e-2
ATOL = 1e-5  # observed 0.0: the same float ops in the same order


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """Three Linear-shaped weights (square, tall, wide) and a bias vector."""
    g = torch.Generator().manual_seed(seed)
    shapes = [*SHAPES.values(), (32,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in shapes]


def make_optimizer(cls, params, proj_type: str, gap: int = GAP, lr: float = LR, wd: float = WD):
    groups = [{"params": params[:3], "rank": RANK, "update_proj_gap": gap, "scale": SCALE,
               "proj_type": proj_type},
              {"params": params[3:]}]  # the bias: plain AdamW
    return cls(groups, lr=lr, weight_decay=wd, no_deprecation_warning=True)


def set_grads(param_sets, gen: torch.Generator) -> None:
    """Gives the same fresh random gradient to the matching parameter of every set."""
    for ps in zip(*param_sets):
        grad = torch.randn(ps[0].shape, generator=gen)
        for p in ps:
            p.grad = grad.clone()


# The second setting makes lr * weight_decay large enough (0.05) that applying the decay before
# rather than after the Adam step would show above ATOL; at lr=1e-2, wd=0.01 it would not.
@pytest.mark.parametrize("lr,wd", [(LR, WD), (0.1, 0.5)])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_galore_torch(proj_type, lr, wd):
    ref_params, our_params = make_params(), make_params()
    initial = [p.detach().clone() for p in our_params]
    ref = make_optimizer(galore_torch.GaLoreAdamW, ref_params, proj_type, lr=lr, wd=wd)
    ours = make_optimizer(GaLoreAdamW, our_params, proj_type, lr=lr, wd=wd)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 11):
        set_grads([ref_params, our_params], gen)
        ref.step()
        ours.step()
        for name, a, b in zip([*SHAPES, "bias"], ref_params, our_params):
            diff = (a - b).abs().max().item()
            assert diff <= ATOL, f"{proj_type}: {name} differs by {diff:.3g} after step {step}"
    for a, b in zip(initial, our_params):  # not vacuous: every weight moved
        assert (a - b).abs().max() > 1e-3


# Theory (and galore-torch's galore_projector.py) for G [m, n], r = 4: the basis is
# left = U[:, :r] [m, r] (R = left^T G, [r, n]) and/or right = Vh[:r] [r, n] (R = G right^T, [m, r]).
# 'std' compresses the smaller side (right when m >= n, left when m < n); 'reverse_std' the larger;
# 'full' both sides, giving an [r, r] R. Entries: (low-rank shape, left shape, right shape).
EXPECTED_SHAPES = {
    ("square", "std"): ((32, 4), None, (4, 32)),
    ("square", "reverse_std"): ((4, 32), (32, 4), None),
    ("square", "left"): ((4, 32), (32, 4), None),
    ("square", "right"): ((32, 4), None, (4, 32)),
    ("square", "full"): ((4, 4), (32, 4), (4, 32)),
    ("tall", "std"): ((64, 4), None, (4, 16)),
    ("tall", "reverse_std"): ((4, 16), (64, 4), None),
    ("tall", "left"): ((4, 16), (64, 4), None),
    ("tall", "right"): ((64, 4), None, (4, 16)),
    ("tall", "full"): ((4, 4), (64, 4), (4, 16)),
    ("wide", "std"): ((4, 64), (16, 4), None),
    ("wide", "reverse_std"): ((16, 4), None, (4, 64)),
    ("wide", "left"): ((4, 64), (16, 4), None),
    ("wide", "right"): ((16, 4), None, (4, 64)),
    ("wide", "full"): ((4, 4), (16, 4), (4, 64)),
}


@pytest.mark.parametrize("shape_name,proj_type", list(EXPECTED_SHAPES))
def test_projector_shapes(shape_name, proj_type):
    low_shape, left_shape, right_shape = EXPECTED_SHAPES[shape_name, proj_type]
    grad = torch.randn(SHAPES[shape_name], generator=torch.Generator().manual_seed(2))
    proj = GaLoreProjector(RANK, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type)
    low = proj.project(grad, 0)
    assert tuple(low.shape) == low_shape
    assert (proj.left is None and left_shape is None) or tuple(proj.left.shape) == left_shape
    assert (proj.right is None and right_shape is None) or tuple(proj.right.shape) == right_shape
    assert tuple(proj.project_back(low).shape) == SHAPES[shape_name]
    for m in proj.matrices():  # orthonormal columns (left) or rows (right)
        gram = m.t() @ m if m.shape[0] > m.shape[1] else m @ m.t()
        torch.testing.assert_close(gram, torch.eye(RANK), atol=1e-5, rtol=0)
    ref = galore_torch.galore_projector.GaLoreProjector(RANK, update_proj_gap=GAP, proj_type=proj_type)
    ref_low = ref.project(grad, 0)
    ref_mats = ref.ortho_matrix if proj_type == "full" else [ref.ortho_matrix]
    assert ref_low.shape == low.shape
    assert [m.shape for m in ref_mats] == [m.shape for m in proj.matrices()]


def refresh_steps(opt, params, steps: int = 10) -> list[int]:
    """The updates (counting from 1) after which the tall weight's basis changed or first appeared."""
    gen, changed, before = torch.Generator().manual_seed(3), [], None
    for step in range(1, steps + 1):
        set_grads([params], gen)
        opt.step()
        st = opt.state[params[1]]
        if isinstance(opt, GaLoreAdamW):
            mats = st["projector"].matrices()
        else:  # galore-torch: one tensor, or [left, right] for 'full'
            mats = st["projector"].ortho_matrix
            mats = mats if isinstance(mats, list) else [mats]
        if before is None or any(not torch.equal(a, b) for a, b in zip(before, mats)):
            changed.append(step)
        before = [m.clone() for m in mats]
    return changed


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_refresh_timing(proj_type):
    # galore-torch passes the step count before the update (0, 1, 2, ...) and refreshes when it is
    # 0 mod gap: with gap 3, at updates 1, 4, 7, 10 counting from 1.
    expected = [1, 4, 7, 10]
    params = make_params()
    assert refresh_steps(make_optimizer(GaLoreAdamW, params, proj_type), params) == expected
    ref_params = make_params()
    ref = make_optimizer(galore_torch.GaLoreAdamW, ref_params, proj_type)
    assert refresh_steps(ref, ref_params) == expected


def test_moments_kept_across_refresh():
    params = make_params()
    opt = make_optimizer(GaLoreAdamW, params, "std")
    gen = torch.Generator().manual_seed(4)
    for _ in range(GAP):
        set_grads([params], gen)
        opt.step()
    st = opt.state[params[1]]
    old_avg, old_sq, old_basis = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st["projector"].right
    set_grads([params], gen)
    grad = params[1].grad  # tall [64, 16]: 'std' projects on the right, R = G Vh[:r]^T [64, 4]
    low = grad @ torch.linalg.svd(grad, full_matrices=False)[2][:RANK].t()
    opt.step()  # update GAP + 1: the basis is refreshed, the moments carry on
    assert st["step"] == GAP + 1 and not torch.equal(st["projector"].right, old_basis)
    torch.testing.assert_close(st["exp_avg"], 0.9 * old_avg + 0.1 * low)
    torch.testing.assert_close(st["exp_avg_sq"], 0.999 * old_sq + 0.001 * low * low)


def test_state_bytes_by_hand():
    f32 = 4
    weight = torch.nn.Parameter(torch.zeros(64, 16))
    bias = torch.nn.Parameter(torch.zeros(16))
    opt = GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 200, "scale": 1.0,
                        "proj_type": "std"}, {"params": [bias]}])
    weight.grad, bias.grad = torch.randn(64, 16), torch.randn(16)
    opt.step()
    moments = 2 * (64 * 4) * f32   # exp_avg and exp_avg_sq of the [64, 4] low-rank gradient
    basis = (4 * 16) * f32         # 'std' on a tall weight keeps right = Vh[:4] [4, 16]
    bias_moments = 2 * 16 * f32    # plain AdamW
    step = 0                       # 'step' is a Python int (as in galore-torch): no tensor bytes
    assert optimizer_state_bytes(opt) == moments + basis + bias_moments + step == 2432

    # The same parameters under galore-torch hold the same tensors (its basis is a slice of Vh).
    ref = galore_torch.GaLoreAdamW([{"params": [weight], "rank": 4, "update_proj_gap": 200,
                                     "scale": 1.0, "proj_type": "std"}, {"params": [bias]}],
                                   no_deprecation_warning=True)
    ref.step()
    assert optimizer_state_bytes(ref) == 2432

    # torch's AdamW for comparison: full [64, 16] moments, and its step is a float32 tensor.
    full = torch.optim.AdamW([weight])
    full.step()
    assert optimizer_state_bytes(full) == 2 * 64 * 16 * f32 + f32


@pytest.mark.parametrize("m,n", [(64, 16), (16, 64), (48, 48)])
def test_moment_bytes_scale_with_rank(m, n):
    r, f32 = 4, 4
    weight = torch.nn.Parameter(torch.zeros(m, n))
    opt = GaLoreAdamW([{"params": [weight], "rank": r, "update_proj_gap": 200, "scale": 1.0,
                        "proj_type": "std"}])
    weight.grad = torch.randn(m, n)
    opt.step()
    st = opt.state[weight]
    moment_bytes = sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    assert moment_bytes == 2 * r * max(m, n) * f32 < 2 * m * n * f32
    basis_bytes = r * min(m, n) * f32  # the compressed (smaller) side's basis
    assert optimizer_state_bytes(opt) == moment_bytes + basis_bytes


def test_unknown_proj_type():
    with pytest.raises(ValueError, match="unknown GaLore proj_type 'diagonal'.*std, reverse_std, "
                                         "left, right, full"):
        GaLoreProjector(4, proj_type="diagonal")
    w = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="unknown GaLore proj_type 'diagonal'"):
        GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "scale": 1.0,
                      "proj_type": "diagonal"}])


def test_rank_group_rejects_vectors():
    b = torch.nn.Parameter(torch.zeros(8))
    opt = GaLoreAdamW([{"params": [b], "rank": 4}])
    b.grad = torch.ones(8)
    with pytest.raises(ValueError, match="2-D weights.*without 'rank'"):
        opt.step()


def test_optimizer_state_objects_pack_through_their_own_registration():
    """serial.py knows no optimizer class: GaLoreProjector and QuantizedTensor register themselves
    (`@packable`) and pack to plain data that comes back equal."""
    from minbert.optim import serial
    from minbert.optim.quant import QuantizedTensor

    projector = GaLoreProjector(2, 5, 0.5, "full")
    projector.refresh(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    packed = serial.pack(projector)
    assert packed[serial.KIND] == "GaLoreProjector" and isinstance(packed["left"], torch.Tensor)
    back = serial.unpack(packed)
    assert type(back) is GaLoreProjector and torch.equal(back.left, projector.left)
    assert back.right.stride() == projector.right.stride()  # the layout, which decides rounding
    q = QuantizedTensor.quantize(torch.randn(300))
    assert torch.equal(serial.unpack(serial.pack(q)).dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="unknown packed optimizer state 'Nope'"):
        serial.unpack({serial.KIND: "Nope"})
    assert serial.pack(3) == 3
