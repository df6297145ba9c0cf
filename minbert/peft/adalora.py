"""AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning"): LoRA in SVD form, ΔW = B (A ⊙ E) · α / r, whose rank budget is reallocated during
training from the sensitivity of each singular triplet.

- Layer: A [r, in] and B [out, r] from N(0, 0.02), the singular values E [r, 1] zeros (ΔW = 0 at
  init); the scale is α / (r + 1e-5) with r the initial rank, which pruning leaves unchanged.
- Loss: an orthogonality penalty, orth_reg_weight · mean over every A and B of ‖AAᵀ - I‖_F and
  ‖BᵀB - I‖_F (not squared), added to every training loss through the loop's `extra_loss` hook
  (peft adds it only when the model returns a loss, which `BertModel` does not; ours always does).
- Budget (`RankAllocator`, after each optimizer step, with the gradients still there): the
  sensitivity |θ ∇θ| of every entry is smoothed (β1) and its uncertainty too (β2); triplet i of a
  layer scores s(E_i) + mean_j s(A_ij) + mean_k s(B_ki); the total budget falls from init_r to
  target_r per layer on a cubic schedule between tinit and total_steps - tfinal, and every deltaT
  steps the lowest-scoring triplets, across all layers, get E_i = 0. After total_steps - tfinal the
  final pattern is enforced every step. `total_steps` is the run's (per expert for experts).

This follows peft 0.21's AdaLoRA number for number (tests/test_adalora.py compares forward,
gradients and the masks after several allocation steps). Mergeable: ΔW is a weight update.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities, NoHooks
from minbert.peft.layer import AdapterConfig, AdapterLinear, adapt, train_biases


class AdaLoraLinear(AdapterLinear):
    """y = x W0ᵀ + b + (drop(x) (A ⊙ E)ᵀ) Bᵀ · α / (r + 1e-5)."""

    adapter_tensors = ("lora_A", "lora_E", "lora_B")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, dropout)
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(rank, self.in_features).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(w.new_zeros(rank, 1))
        self.lora_B = nn.Parameter(w.new_empty(self.out_features, rank).normal_(0.0, 0.02))
        self.scale = (alpha if alpha > 0 else float(rank)) / (float(rank) + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale  # [out, in]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B)
        return y + h * self.scale

    def rank(self) -> int:
        return int((self.lora_E != 0).sum())


def orthogonality(layers: list[AdaLoraLinear]) -> torch.Tensor:
    """mean over every A and B of ‖AAᵀ - I‖_F, ‖BᵀB - I‖_F."""
    terms = []
    for layer in layers:
        for P in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # [r, r]
            terms.append(torch.norm(P - torch.eye(P.shape[0], device=P.device), p="fro"))
    return torch.stack(terms).sum() / len(terms)


class RankAllocator:
    """The sensitivity-based budget of AdaLoRA over named layers (see the module docstring)."""

    def __init__(self, layers: dict[str, AdaLoraLinear], init_r: int, target_r: int, tinit: int,
                 tfinal: int, deltaT: int, beta1: float, beta2: float):
        self.layers = layers
        self.init_bgt, self.target_bgt = init_r * len(layers), target_r * len(layers)
        self.tinit, self.tfinal, self.deltaT, self.beta1, self.beta2 = (tinit, tfinal, deltaT,
                                                                         beta1, beta2)
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        self.rank_pattern: dict[str, list[bool]] = {}

    def params(self):
        for name, layer in self.layers.items():
            for leaf in ("lora_A", "lora_E", "lora_B"):
                yield f"{name}.{leaf}", getattr(layer, leaf)

    def budget(self, step: int, total: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.init_bgt, False
        if step > total - self.tfinal:
            return self.target_bgt, True
        done = 1 - (step - self.tinit) / (total - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * done ** 3 + self.target_bgt)
        return budget, step % self.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        for name, p in self.params():
            if name not in self.ipt:
                self.ipt[name] = torch.zeros_like(p)
                self.exp_avg_ipt[name] = torch.zeros_like(p)
                self.exp_avg_unc[name] = torch.zeros_like(p)
            self.ipt[name] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[name] = (self.beta1 * self.exp_avg_ipt[name]
                                      + (1 - self.beta1) * self.ipt[name])
            self.exp_avg_unc[name] = (self.beta2 * self.exp_avg_unc[name]
                                      + (1 - self.beta2) * (self.ipt[name]
                                                            - self.exp_avg_ipt[name]).abs())

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Each layer's score per rank index, [r]."""
        score = {n: self.exp_avg_ipt[n] * self.exp_avg_unc[n] for n, _ in self.params()}
        out = {}
        for name in self.layers:
            a = score[f"{name}.lora_A"].mean(dim=1, keepdim=True)  # [r, 1]
            b = score[f"{name}.lora_B"].mean(dim=0, keepdim=False).view(-1, 1)  # [r, 1]
            out[name] = score[f"{name}.lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k < 1:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        for name, layer in self.layers.items():
            pruned = scores[name] <= threshold
            layer.lora_E.masked_fill_(pruned.view(-1, 1), 0.0)
            self.rank_pattern[name] = (~pruned).tolist()

    @torch.no_grad()
    def enforce_pattern(self) -> None:
        for name, keep in self.rank_pattern.items():
            mask = torch.tensor(keep, device=self.layers[name].lora_E.device).view(-1, 1)
            self.layers[name].lora_E.masked_fill_(~mask, 0.0)

    def update_and_allocate(self, step: int, total: int) -> None:
        """After the optimizer step `step` (0-based) of `total`, gradients still present."""
        end = total - self.tfinal
        if step < end:
            self.update_ipt()
            budget, mask = self.budget(step, total)
            if mask:
                self.mask_to_budget(budget)
        elif step == end:
            budget, _ = self.budget(step, total)
            self.mask_to_budget(budget)
            self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        else:
            self.enforce_pattern()

    def state_dict(self) -> dict:
        return {"ipt": self.ipt, "exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc,
                "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.exp_avg_ipt = dict(state["ipt"]), dict(state["exp_avg_ipt"])
        self.exp_avg_unc, self.rank_pattern = dict(state["exp_avg_unc"]), dict(state["rank_pattern"])


@dataclass
class AdaLora(AdapterConfig, NoHooks):
    """`peft=adalora`: AdaLoRA on `targets`, from rank `init_r` down to `target_r` per layer; the
    options every adapter method has (`AdapterConfig`)."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    tinit: int = 0
    tfinal: int = 1  # peft's 0 never reaches the target within a run's steps (0..total - 1)
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    name: ClassVar[str] = "adalora"
    capabilities: ClassVar[Capabilities] = Capabilities()
    rank_options: ClassVar[tuple[str, ...]] = ("init_r",)  # target_r: in [1, init_r], below

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.target_r, int) or not 1 <= self.target_r <= self.init_r:
            raise ConfigError(f"target_r={self.target_r!r} must be an integer in [1, init_r="
                              f"{self.init_r}]")
        if self.orth_reg_weight < 0 or self.deltaT < 1 or min(self.tinit, self.tfinal) < 0:
            raise ConfigError("orth_reg_weight and tinit, tfinal must be >= 0, deltaT >= 1")
        self.allocator: RankAllocator | None = None

    def apply(self, encoder: nn.Module) -> nn.Module:
        names = adapt(encoder, self.targets,
                      lambda linear: AdaLoraLinear(linear, self.init_r, self.alpha, self.dropout))
        self.allocator = RankAllocator({n: encoder.get_submodule(n) for n in names}, self.init_r,
                                       self.target_r, self.tinit, self.tfinal, self.deltaT,
                                       self.beta1, self.beta2)
        train_biases(encoder, self.bias)
        return encoder

    # ---- the training loop's hooks (minbert.peft.contract.TrainingHooks) ---------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.orth_reg_weight * orthogonality(list(self.allocator.layers.values()))

    def start_training(self, model: nn.Module, total_steps: int,
                       generator: torch.Generator) -> None:
        """Before a run's (or an expert's) first step: a fresh budget."""
        self.allocator.load_state_dict({"ipt": {}, "exp_avg_ipt": {}, "exp_avg_unc": {},
                                        "rank_pattern": {}})
        if self.tinit >= total_steps - self.tfinal:
            raise ConfigError(f"peft.tinit={self.tinit} + peft.tfinal={self.tfinal} leave no "
                              f"allocation steps in this run's {total_steps} steps")

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   generator: torch.Generator) -> None:
        self.allocator.update_and_allocate(step, total_steps)

    def state_dict(self) -> dict:
        return {} if self.allocator is None else self.allocator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state)

    def report(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        """The final rank of every adapted layer (metrics.json), and `adalora_ranks.png`."""
        ranks = {name: layer.rank() for name, layer in self.allocator.layers.items()}
        from minbert.peft.plots import plot_ranks

        plot_ranks(ranks, self.init_r, run_dir / "adalora_ranks.png")
        return {**{f"adalora/rank/{n}": float(r) for n, r in ranks.items()},
                "adalora/rank/mean": float(sum(ranks.values()) / max(1, len(ranks)))}

