"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, 2021, "Gradient Vaccine: Investigating and
Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1), at
the granularity of the whole model (all trainable parameters as one vector).

PCGrad only acts when two gradients conflict (cosine < 0) and then sets their cosine to 0.
GradVac sets an adaptive target instead: an exponential moving average φ̂_ij of the cosine
similarity each task pair has shown, and whenever the current cosine φ_ij = cos(g_i', g_j) falls
below it, it adds the multiple of g_j that brings the cosine up to exactly φ̂_ij:

    g_i' <- g_i' + ||g_i'|| (φ̂_ij √(1-φ_ij²) - φ_ij √(1-φ̂_ij²)) / (||g_j|| √(1-φ̂_ij²)) · g_j
    φ̂_ij <- (1-β) φ̂_ij + β φ_ij          (for every pair, every step; φ̂ starts at 0)

As in PCGrad, task i's gradient g_i' is visited against the original g_j of the other tasks in a
random order (drawn from the run's generator), and the update is Σ_i g_i'. With the targets at 0
the first step is PCGrad's. φ̂ is the combiner's state, saved in checkpoints.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.errors import ConfigError
from trainers.strategies.pcgrad import flatten_grads, others_in_order, unflatten_grads

EPS = 1e-8  # as LibMTL's GradVac: no division by zero for a zero gradient


class GradVac:
    """`trainer.combiner=gradvac` (`beta`: the EMA rate of the cosine targets, the paper's 1e-2)."""

    every_task = True

    def __init__(self, beta: float = 0.01):
        if not 0 < beta <= 1:
            raise ConfigError(f"trainer.combiner.beta={beta!r} must be in (0, 1]")
        self.beta = float(beta)
        self.targets: torch.Tensor | None = None  # [n, n] φ̂_ij, float64

    def combine(self, grads: Sequence[Sequence[torch.Tensor | None]],
                generator: torch.Generator | None = None) -> list[torch.Tensor | None]:
        n = len(grads)
        templates = [next((g[k] for g in grads if g[k] is not None), None)
                     for k in range(len(grads[0]))]
        if all(t is None for t in templates):
            return [None] * len(templates)
        if self.targets is None or self.targets.shape[0] != n:
            self.targets = torch.zeros(n, n, dtype=torch.float64)
        flat = [flatten_grads(task, templates) for task in grads]
        total = sum(self._vaccinate(i, flat, generator) for i in range(n))
        return unflatten_grads(total, templates)

    def _vaccinate(self, i: int, flat: list[torch.Tensor],
                   generator: torch.Generator | None) -> torch.Tensor:
        g = flat[i].clone()
        for j in others_in_order(i, len(flat), generator):
            norm_j = flat[j].norm()
            phi = (torch.dot(g, flat[j]) / (g.norm() * norm_j + EPS)).item()
            target = self.targets[i, j].item()
            if phi < target:
                w = g.norm() * (target * (1 - phi ** 2) ** 0.5 - phi * (1 - target ** 2) ** 0.5) \
                    / (norm_j * (1 - target ** 2) ** 0.5 + EPS)
                g = g + w * flat[j]
            self.targets[i, j] = (1 - self.beta) * target + self.beta * phi
        return g

    def state_dict(self) -> dict:
        return {"beta": self.beta,
                "targets": None if self.targets is None else self.targets.clone()}

    def load_state_dict(self, state: dict) -> None:
        targets = state["targets"]
        self.targets = None if targets is None else targets.clone()
