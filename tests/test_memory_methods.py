"""The memory-efficient methods as a run uses them: `peft=galore`, `peft=gradnormlorp` and
`optim.state_bits=8` build the right optimizer over the right parameter groups, optimizer-state
bytes are exactly the theory's for a tiny model, GradNormLoRP equals peft's DoRA trained by
galore-torch's GaLoreAdamW on the LoRA factors, and every method writes the memory keys."""
import functools
import json
import subprocess
import sys

import galore_torch
import peft
import pytest
import torch
import transformers

from conftest import REPO, smoke_overrides
from common.errors import ConfigError
from minbert.optim import AdamW8bit, GaLoreAdamW, optimizer_state_bytes
from minbert.peft import adapter_layers, trainable_params
from minbert.peft.full import FullFinetune
from minbert.peft.galore import Galore
from minbert.peft.gradnormlorp import GradNormLoRP
from peft_cases import base_encoder, batch, hidden, loss
from test_peft_oracle import hf_base, hf_module_name, peft_tensor
from trainers.engine.memory import PeakMemory
from trainers.engine.optim import build_optimizer
from trainers.engine.run import run

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0)  # as Hydra's _partial_


class Wrapped(torch.nn.Module):
    """An encoder as the trainer sees it (`model.encoder`, `model.heads`)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.heads = encoder, torch.nn.ModuleDict()


def one_step(model, optimizer):
    loss(hidden(model.encoder, batch())).backward()
    optimizer.step()


def test_galore_projects_exactly_the_targeted_weights_and_counts_theory_bytes():
    method = Galore(rank=4, targets="all_linear")
    model = Wrapped(method.apply(base_encoder("tiny")))
    optimizer = build_optimizer(ADAMW, model, None, method)
    assert isinstance(optimizer, GaLoreAdamW)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and len(projected[0]["params"]) == 12  # 2 layers x 6 Linear
    one_step(model, optimizer)
    want = 0
    for p in model.parameters():
        m, n = p.shape if p.dim() == 2 else (0, 0)
        if any(p is q for q in projected[0]["params"]):
            want += 4 * (2 * 4 * max(m, n) + 4 * min(m, n))  # moments r x max, basis r x min
        else:
            want += 4 * 2 * p.numel()  # plain AdamW moments; GaLore's step is a Python int
    assert optimizer_state_bytes(optimizer) == want


def test_state_bits_8_picks_the_8bit_optimizers_and_cuts_moment_bytes():
    method = FullFinetune()
    model = Wrapped(method.apply(base_encoder("tiny")))
    fp32, int8 = (build_optimizer(ADAMW, model, None, method, bits) for bits in (32, 8))
    assert isinstance(int8, AdamW8bit) and isinstance(fp32, torch.optim.AdamW)
    assert int8.param_groups[0]["weight_decay"] == 0.0 and int8.param_groups[0]["lr"] == 1e-3
    for opt in (fp32, int8):
        one_step(model, opt)
        model.zero_grad()
    # tensors under 4096 elements (biases, LayerNorm) keep fp32 moments, as in bitsandbytes
    assert optimizer_state_bytes(fp32) / optimizer_state_bytes(int8) > 3.5
    g = Galore(rank=8)
    assert build_optimizer(ADAMW, Wrapped(g.apply(base_encoder("tiny"))), None, g, 8).state_bits == 8
    with pytest.raises(ConfigError, match=r"optim.state_bits=16; use one of \[32, 8\]"):
        build_optimizer(ADAMW, model, None, method, 16)


def test_gradnormlorp_equals_peft_dora_trained_by_galore_torch():
    method = GradNormLoRP(rank=4, alpha=8, targets="attn_qkv", update_proj_gap=2, scale=0.25)
    ours = Wrapped(method.apply(base_encoder("tiny")))
    targets = sorted(hf_module_name(n) for n, _ in adapter_layers(ours.encoder))
    pm = peft.get_peft_model(hf_base("tiny"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True)).eval()
    names = [n for n, _ in trainable_params(ours.encoder)]
    with torch.no_grad():
        for n in names:
            peft_tensor(pm, n).copy_(ours.encoder.get_parameter(n))
    theirs = {n: peft_tensor(pm, n) for n in names}
    projected = [theirs[n] for n in names if n.endswith(("lora_A", "lora_B"))]
    ref = galore_torch.GaLoreAdamW([
        {"params": [theirs[n] for n in names if n.endswith("magnitude")]},
        {"params": projected, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "full"},
    ], lr=1e-2, weight_decay=0.0, no_deprecation_warning=True)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
                                ours, None, method)  # our GaLoreAdamW
    b = batch()
    for step in range(6):  # refreshes at steps 0, 2, 4
        ours.zero_grad(), pm.zero_grad()
        loss(hidden(ours.encoder, b)).backward()
        out = pm(**b)
        loss(torch.cat([out.last_hidden_state[b["attention_mask"].bool()],
                        out.pooler_output])).backward()
        for n in names:  # the gradients agree; then both optimizers get identical ones
            g = ours.encoder.get_parameter(n).grad
            assert (g - theirs[n].grad).abs().max() < 1e-4 * max(1, g.abs().max().item())
            theirs[n].grad.copy_(g)
        optimizer.step()
        ref.step()
        for n in names:
            diff = (ours.encoder.get_parameter(n) - theirs[n]).abs().max()
            assert diff < 1e-5, f"step {step}: {n} differs by {diff:.2e}"


@pytest.mark.parametrize("overrides", [
    ["peft=galore", "peft.rank=4"],
    ["peft=gradnormlorp", "peft.update_proj_gap=2"],
    ["peft=lora", "optim.state_bits=8"],
    ["peft=galore", "peft.rank=4", "optim.state_bits=8"],
])
def test_memory_methods_run_end_to_end(compose_cfg, synthetic_root, tmp_path, overrides):
    run(compose_cfg(smoke_overrides(synthetic_root, *overrides)), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    mem = {k: v for k, v in metrics.items() if k.startswith("memory/")}
    assert len(mem) == 5 and mem["memory/peak_bytes"] >= 0  # 0 when RSS never grew
    assert all(v > 0 for k, v in mem.items() if k != "memory/peak_bytes")
    assert mem["memory/grad_bytes"] == mem["memory/trainable_param_bytes"]
    full_moments = 2 * mem["memory/trainable_param_bytes"]
    assert mem["memory/optimizer_state_bytes"] < full_moments  # low-rank or 8-bit moments


PEAK_SCRIPT = """
import time, torch
from trainers.engine.memory import PeakMemory
with PeakMemory(torch.device("cpu")) as peak:
    x = torch.ones(50_000_000)  # 200 MB, touched, held as long as a short training step
    time.sleep(0.1)
    del x
print(peak.bytes)
"""


def test_peak_memory_sees_an_allocation_during_training():
    """In a fresh process: in a long-lived one, freed memory that stays resident can serve the
    allocation without any RSS growth (which is then, rightly, what peak_bytes reports)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert int(out.split()[-1]) > 150e6


def test_bad_projection_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"proj_type='diag'; use one of"):
        Galore(proj_type="diag")
    with pytest.raises(ConfigError, match="update_proj_gap=0 must be a positive integer"):
        GradNormLoRP(update_proj_gap=0)
    with pytest.raises(ConfigError, match="'attn.gate' matches no Linear"):
        Galore(targets=["attn.gate"]).apply(base_encoder("tiny"))
