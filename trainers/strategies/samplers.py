"""Task samplers for interleaved multi-task training: which task does step `step` train?

`trainer=interleaved` mixes batches of all tasks (sst, para, sts) in one loop; the training sets
differ in size by more than an order of magnitude, so the choice of task per step decides how much
of each set is seen and how much the small tasks are over- or under-sampled. `trainer.schedule.sampler=`
picks one of:

- `round_robin`: a deterministic cycle over the tasks in the given order (uniform in expectation).
- `proportional`: p_i ∝ n_i, T5's "examples-proportional mixing" (Raffel et al. 2020, "Exploring
  the Limits of Transfer Learning with a Unified Text-to-Text Transformer", §3.5.2) without the
  artificial size limit K.
- `temperature`: p_i ∝ n_i^(1/T), temperature-based sampling (Arivazhagan et al. 2019, "Massively
  Multilingual Neural Machine Translation in the Wild", §4.2; also T5's "temperature-scaled
  mixing"). T=1 is `proportional`; T→∞ tends to uniform.
- `annealed`: p_i ∝ n_i^α(step), with α annealed from 1 (proportional) to `alpha_end` (flatter),
  after Stickland & Murray 2019, "BERT and PALs: Projected Attention Layers for Efficient
  Adaptation in Multi-Task Learning", §4. PALs use α = 1 - 0.8·(e-1)/(E-1) for epochs e = 1..E;
  here the epoch fraction (e-1)/(E-1) becomes the fraction of training done, step/(total_steps-1),
  and 0.8 becomes 1 - alpha_end:  α(step) = 1 - (1 - alpha_end)·step/(total_steps-1).
  `alpha_end=0.2` (the default) reproduces PALs' end point α = 0.2. Steps past the end keep
  α = alpha_end; with total_steps=1, α = 1.

`sizes` maps task -> number of training batches (or examples: only ratios matter). Every random
draw uses the `torch.Generator` given at construction, so a run's schedule is reproducible from
its seed: `torch.multinomial(probs, 1, generator=g)`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import math
from numbers import Integral, Real

import torch

from common.errors import ConfigError


class SamplerError(ConfigError, ValueError):
    """A bad `trainer.schedule.sampler` name or option: a ValueError, and a ConfigError so that train.py
    prints it cleanly."""


class TaskSampler(ABC):
    """Base: samples a task from `probabilities(step)` with the run's generator.

    Subclasses override `_exponent(step)` (the α of p_i ∝ n_i^α) or `sample` itself."""

    def __init__(self, sizes: dict[str, int], total_steps: int, generator: torch.Generator):
        self.tasks = _check_sizes(sizes)
        self.sizes = {t: int(sizes[t]) for t in self.tasks}
        if not isinstance(total_steps, Integral) or isinstance(total_steps, bool) \
                or total_steps < 1:
            raise SamplerError(f"total_steps={total_steps!r} must be a positive integer")
        if not isinstance(generator, torch.Generator):
            raise SamplerError(f"generator must be a torch.Generator, got {type(generator)}")
        self.total_steps, self.generator = int(total_steps), generator
        self._log_sizes = torch.tensor([math.log(self.sizes[t]) for t in self.tasks],
                                       dtype=torch.float64)

    @abstractmethod
    def _exponent(self, step: int) -> float:
        """α of p_i ∝ n_i^α at `step`."""

    def _probs(self, step: int) -> torch.Tensor:
        """p_i ∝ n_i^α as a float64 tensor, computed in log space (no overflow for big n_i)."""
        return torch.softmax(self._exponent(step) * self._log_sizes, dim=0)

    def probabilities(self, step: int) -> dict[str, float]:
        return dict(zip(self.tasks, self._probs(step).tolist()))

    def sample(self, step: int) -> str:
        index = torch.multinomial(self._probs(step), 1, generator=self.generator).item()
        return self.tasks[index]

    def schedule(self, total_steps: int | None = None) -> list[str]:
        """The task of every step 0..total_steps-1 (default: the sampler's own total_steps)."""
        steps = self.total_steps if total_steps is None else total_steps
        return [self.sample(step) for step in range(steps)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, total_steps={self.total_steps})"


class RoundRobinSampler(TaskSampler):
    """Step s trains tasks[s % k]; the generator is not used."""

    def _exponent(self, step: int) -> float:
        return 0.0  # uniform

    def sample(self, step: int) -> str:
        return self.tasks[step % len(self.tasks)]


class ProportionalSampler(TaskSampler):
    """p_i ∝ n_i (T5's examples-proportional mixing)."""

    def _exponent(self, step: int) -> float:
        return 1.0


class TemperatureSampler(TaskSampler):
    """p_i ∝ n_i^(1/T) (Arivazhagan et al. 2019)."""

    def __init__(self, sizes, total_steps, generator, temperature: float = 2.0):
        super().__init__(sizes, total_steps, generator)
        if not _is_number(temperature) or not temperature > 0 or math.isinf(temperature):
            raise SamplerError(f"trainer.schedule.temperature={temperature!r} must be a finite "
                               "number > 0 (1 = proportional, larger = flatter)")
        self.temperature = float(temperature)

    def _exponent(self, step: int) -> float:
        return 1.0 / self.temperature


class AnnealedSampler(TaskSampler):
    """p_i ∝ n_i^α, α = 1 - (1 - alpha_end)·step/(total_steps-1) (BERT and PALs' schedule)."""

    def __init__(self, sizes, total_steps, generator, alpha_end: float = 0.2):
        super().__init__(sizes, total_steps, generator)
        if not _is_number(alpha_end) or not 0 <= alpha_end <= 1:
            raise SamplerError(f"trainer.schedule.alpha_end={alpha_end!r} must be in [0, 1] "
                               "(1 = proportional throughout, 0 = uniform at the end)")
        self.alpha_end = float(alpha_end)

    def alpha(self, step: int) -> float:
        if step < 0:
            raise SamplerError(f"step={step} must be >= 0")
        if self.total_steps == 1:
            return 1.0
        done = min(step, self.total_steps - 1) / (self.total_steps - 1)
        return 1.0 - (1.0 - self.alpha_end) * done

    def _exponent(self, step: int) -> float:
        return self.alpha(step)


SAMPLERS: dict[str, type[TaskSampler]] = {
    "round_robin": RoundRobinSampler,
    "proportional": ProportionalSampler,
    "temperature": TemperatureSampler,
    "annealed": AnnealedSampler,
}
OPTIONS: dict[str, tuple[str, ...]] = {
    "round_robin": (), "proportional": (), "temperature": ("temperature",),
    "annealed": ("alpha_end",),
}


def make_sampler(name: str, sizes: dict[str, int], total_steps: int,
                 generator: torch.Generator, **options) -> TaskSampler:
    """Build the sampler `name` (one of SAMPLERS) with its options (see OPTIONS)."""
    if name not in SAMPLERS:
        raise SamplerError(f"unknown trainer.schedule.sampler={name!r}; valid samplers: "
                           f"{', '.join(SAMPLERS)}")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        accepted = ", ".join(OPTIONS[name]) or "none"
        raise SamplerError(f"trainer.schedule.sampler={name} does not take option(s) {', '.join(unknown)}; "
                           f"accepted options: {accepted}")
    return SAMPLERS[name](sizes, total_steps, generator, **options)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)


def _check_sizes(sizes: dict[str, int]) -> list[str]:
    if not isinstance(sizes, dict) or not sizes:
        raise SamplerError(f"sizes={sizes!r} must be a non-empty dict task -> number of "
                           "training batches")
    bad = {t: n for t, n in sizes.items()
           if not isinstance(n, Integral) or isinstance(n, bool) or n <= 0}
    if bad:
        raise SamplerError(f"task sizes must be positive integers; bad: {bad} "
                           "(is a task's training set empty?)")
    return list(sizes)
