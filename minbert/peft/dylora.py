"""DyLoRA (Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation"): LoRA trained at every rank at once, so that any rank
works after training, with no search.

Each layer holds factors of rank r_max; every training step samples one rank b in [r_min, r_max]
for the whole model (from the run's generator: reproducible, and restored on resume) and uses the
truncated factors, W = W0 + (α / b) B[:, :b] A[:b]. With `frozen` (the paper's "frozen" mode)
only the b-th row of A and the b-th column of B train in that step. At evaluation the rank is
`eval_rank` (default r_max), and a run also scores dev at every rank in one pass (`variants`: the
curve goes into metrics.json and `dylora_ranks.png`), or at `curve_ranks` only (r_max = 64 scored
at 1, 2, 4, ..., 64 rather than 64 times). For a fixed b the layer is exactly LoRA of
rank b with the same α on the truncated factors (tests/test_peft_part3.py checks it against peft).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from minbert.peft.contract import Capabilities, NoHooks
from minbert.peft.layer import (AdapterConfig, AdapterLinear, adapt, low_rank_update,
                                train_biases)


class RankState:
    """The rank every DyLoRA layer of a model uses: `train` (sampled each step) and `eval`."""

    def __init__(self, train: int, eval: int):
        self.train, self.eval = train, eval


class DyLoraLinear(AdapterLinear):
    """LoRA of rank r_max, used truncated to the current rank b: s = α / b."""

    adapter_tensors = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, r_max: int, alpha: float, dropout: float,
                 ranks: RankState, frozen: bool):
        super().__init__(base, dropout)
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(r_max, self.in_features))
        self.lora_B = nn.Parameter(w.new_zeros(self.out_features, r_max))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # as LoRA's A
        self.alpha, self.frozen = alpha, frozen
        self.__dict__["ranks"] = ranks  # shared by every layer, not a child module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A[:b] [b, in], B[:, :b] [out, b], α / b) at the current rank."""
        b = self.ranks.train if self.training else self.ranks.eval
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and self.training and b > 1:  # only the b-th row and column learn
            A = torch.cat([A[:b - 1].detach(), A[b - 1:]], dim=0)
            B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)
        return A, B, self.alpha / b

    def delta_weight(self) -> torch.Tensor:
        A, B, s = self.factors()
        return s * (B @ A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, s = self.factors()
        return low_rank_update(self.base_layer(x), F.linear(self.dropout(x), A), B, s)


@dataclass
class DyLora(AdapterConfig, NoHooks):
    """`peft=dylora`: LoRA over ranks r_min..r_max, one sampled per step; the options every
    adapter method has (`AdapterConfig`)."""

    r_min: int = 1
    r_max: int = 8
    alpha: float = 16.0
    frozen: bool = False
    eval_rank: int | None = None  # None: r_max
    curve_ranks: list[int] | None = None  # the ranks dev is scored at after training; None: all
    name: ClassVar[str] = "dylora"
    capabilities: ClassVar[Capabilities] = Capabilities()
    rank_options: ClassVar[tuple[str, ...]] = ("r_max",)  # r_min: in [1, r_max], below

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.r_min, int) or not 1 <= self.r_min <= self.r_max:
            raise ConfigError(f"r_min={self.r_min!r} must be an integer in [1, r_max={self.r_max}]")
        self.eval_rank = self.r_max if self.eval_rank is None else self.eval_rank
        if not self.r_min <= self.eval_rank <= self.r_max:
            raise ConfigError(f"eval_rank={self.eval_rank} must be in [r_min, r_max] = "
                              f"[{self.r_min}, {self.r_max}]")
        self.ranks = RankState(self.r_max, self.eval_rank)
        span = range(self.r_min, self.r_max + 1)
        if self.curve_ranks is None:
            self.curve_ranks = list(span)
        self.curve_ranks = [int(b) for b in self.curve_ranks]
        outside = [b for b in self.curve_ranks if b not in span]
        if outside or not self.curve_ranks:
            raise ConfigError(f"curve_ranks={self.curve_ranks} must be ranks in [r_min, r_max] = "
                              f"[{self.r_min}, {self.r_max}] (null: every one)")

    def apply(self, encoder: nn.Module) -> nn.Module:
        adapt(encoder, self.targets, lambda linear: DyLoraLinear(
            linear, self.r_max, self.alpha, self.dropout, self.ranks, self.frozen))
        train_biases(encoder, self.bias)
        return encoder

    # ---- the training loop's hooks (minbert.peft.contract.TrainingHooks) ---------------------------
    def sample(self, generator: torch.Generator) -> None:
        span = self.r_max - self.r_min + 1
        self.ranks.train = self.r_min + int(torch.randint(span, (1,), generator=generator))

    def start_training(self, model: nn.Module, total_steps: int,
                       generator: torch.Generator) -> None:
        self.sample(generator)

    def after_step(self, model: nn.Module, step: int, total_steps: int,
                   generator: torch.Generator) -> None:
        self.sample(generator)  # the next step's rank

    def state_dict(self) -> dict:
        return {"train_rank": self.ranks.train}

    def load_state_dict(self, state: dict) -> None:
        self.ranks.train = int(state["train_rank"])

    def variants(self) -> dict[str, contextlib.AbstractContextManager]:
        """One evaluation per rank of the curve: `dylora/r{b}` -> the context that evaluates at
        rank b."""
        return {f"dylora/r{b}": self.at_rank(b) for b in self.curve_ranks}

    @contextlib.contextmanager
    def at_rank(self, b: int):
        before, self.ranks.eval = self.ranks.eval, b
        try:
            yield
        finally:
            self.ranks.eval = before

    def report_variants(self, scores: dict[str, float], run_dir: Path) -> None:
        from minbert.peft.plots import plot_rank_curve

        curve = {int(k.split("/r")[1].split("/")[0]): v for k, v in scores.items()
                 if k.endswith("dev/overall")}
        plot_rank_curve(curve, run_dir / "dylora_ranks.png")
