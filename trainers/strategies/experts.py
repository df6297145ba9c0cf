"""Per-task experts, the multi-task minBERT report's ensembles (its Table 3), and their merges.

- `trainer=eoe`, Ensemble of Experts: one adapter (or fully fine-tuned encoder) plus head per task,
  each trained alone from the same initial state; at inference each task uses its own expert.
- `trainer=fedavg`: the same experts, merged into one model in weight space,
  θ0 + Σ_i λ_i Δθ_i (McMahan et al., 2017, with one round), where each adapter layer's update is
  formed exactly, ΔW_i = s_i B_i A_i, before combining (`minbert.peft.merging`); `trainer.merge`
  also picks task arithmetic, TIES or DARE. Every other tensor an expert changes (biases under
  `bias=all`, full fine-tuning's weights, adapter tensors outside ΔW) merges as a task vector by
  the same method. Each task keeps its own head.
- `trainer=orthoada`, orthogonal adaptation (Po et al., 2023): every LoRA layer draws one random
  orthogonal basis by QR; task i gets the disjoint column block i as its frozen B_i and trains only
  A_i (from zero), so B_iᵀB_j = 0 and the summed merge keeps each task's update in its own subspace.

The shared model is never left holding an expert or a merge: after `fit` it is back at the initial
state, and `FitResult.weights(task)` loads a task's expert (or merges the experts) for the duration
of a `with`, restoring the model on exit. Experts are saved as `experts/<task>.safetensors`, the
initial adapter tensors as `experts/init.safetensors` and a merge as `merged.safetensors`, so that
`load_weights` rebuilds the run and `scripts/merge.py` merges again without training.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from common.errors import CheckpointError, ConfigError
from minbert.peft import adapter_layers, adapter_state_dict, adapter_tensors, param_counts
from minbert.peft.io import method_metadata, save_state
from minbert.peft.lora import LoraLinear
from minbert.peft.merging import (MERGES, MergeError, check_merge_options, default_options,
                                   merge_deltas)
from tasks.base import Task
from trainers.engine.evaluate import RunContext, TaskWeights
from trainers.engine.loop import FitResult
from trainers.strategies.sequential import SequentialTrainer
from trainers.engine.state import TrainState

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
EXPERTS_DIR, INIT_FILE, MERGED_FILE = "experts", "init.safetensors", "merged.safetensors"


def encoder_state(model) -> State:
    """The encoder's trainable and adapter tensors (what an expert changes), cloned."""
    return {n: t.clone() for n, t in adapter_state_dict(model).items() if n.startswith("encoder.")}


def expert_state(model, task: str) -> State:
    head = {n: t.clone() for n, t in adapter_state_dict(model).items()
            if n.startswith(f"heads.{task}.")}
    return {**encoder_state(model), **head}


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def load_state(model, state: State) -> None:
    tensors = _tensors(model)
    for name, t in state.items():
        tensors[name].copy_(t)


@contextmanager
def preserved(model, names):
    """`with preserved(model, names):` the named tensors are restored on exit."""
    tensors = _tensors(model)
    saved = {n: tensors[n].detach().clone() for n in names}
    try:
        yield model
    finally:
        load_state(model, saved)


@contextmanager
def loaded(model, state: State):
    """`with loaded(model, state):` the model holds `state`; on exit, what it held before."""
    with preserved(model, state):
        load_state(model, state)
        yield model


def expert_weights(model, experts: dict[str, State]) -> TaskWeights:
    """Each task scored with its own expert, loaded for the `with` and unloaded after it."""
    return lambda task: loaded(model, experts[task])


def expert_file(run_dir: Path, task: str) -> Path:
    return Path(run_dir) / EXPERTS_DIR / f"{task}.safetensors"


def read_experts(run_dir: Path, tasks: list[str]) -> dict[str, State]:
    """The saved experts of a run, by task; a missing file is a clear error."""
    files = {t: expert_file(run_dir, t) for t in tasks}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise CheckpointError(f"no saved experts {missing}: only runs of trainer=eoe, fedavg or "
                              "orthoada save experts (did the run finish?)")
    return {t: load_file(str(f)) for t, f in files.items()}


def load_init(model, run_dir: Path) -> None:
    """Puts the adapters back at the run's initial state (`experts/init.safetensors`)."""
    path = Path(run_dir) / EXPERTS_DIR / INIT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run's initial adapter state is needed to "
                              "rebuild its experts (was the run made by an older version?)")
    load_state(model, load_file(str(path)))


class ExpertTrainer(SequentialTrainer):
    """Trains one expert per task, each a phase of the shared loop (the shared part of eoe, fedavg
    and orthoada); takes the sequential trainer's options (optimizer, epochs, head_lr,
    max_grad_norm). Each expert starts from the same initial state; its best epoch is kept in
    `experts/<task>.safetensors`."""

    def phases(self, ctx: RunContext) -> list[list[Task]]:
        return [[task] for task in ctx.tasks]

    def start(self, ctx: RunContext) -> None:
        self._start = {n: t.clone() for n, t in adapter_state_dict(ctx.model).items()}  # + heads
        self._init = encoder_state(ctx.model)
        drawn = adapter_tensors(ctx.model)
        save_state({n: t for n, t in self._init.items() if n in drawn},
                   ctx.run_dir / EXPERTS_DIR / INIT_FILE, method_metadata(ctx.method))

    def prepare(self, ctx: RunContext, index: int) -> None:
        """Hook before expert `index` trains (OrthoAda sets its frozen block here)."""

    def begin_phase(self, ctx: RunContext, state: TrainState, index: int) -> None:
        load_state(ctx.model, self._start)  # every expert starts from the same state
        self.prepare(ctx, index)
        per_expert = sum(p.numel() for p in ctx.model.encoder.parameters() if p.requires_grad)
        state.extra["counts"] = expert_counts(ctx.model, per_expert, len(ctx.tasks))
        super().begin_phase(ctx, state, index)

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None:
        save_state(expert_state(ctx.model, tasks[0].name), expert_file(ctx.run_dir, tasks[0].name),
                   {**method_metadata(ctx.method), "task": tasks[0].name,
                    "score": state.best_score, "epoch": state.best_epoch})

    def experts(self, ctx: RunContext) -> list[State]:
        """The finished experts, in task order; the model back at the initial state."""
        load_state(ctx.model, self._start)
        found = read_experts(ctx.run_dir, [t.name for t in ctx.tasks])
        return [found[t.name] for t in ctx.tasks]


def expert_counts(model, per_expert: int, n: int) -> dict[str, float]:
    """The report's "Parameters updated" for n experts: every expert's trained tensors and every
    head over the base plus n adapters (three r=64 all-linear LoRAs on bert-base: about 22.8 %)."""
    one, stored = param_counts(model), set(encoder_state(model))
    per_copy = sum(p.numel() for n_, p in model.named_parameters() if n_ in stored)
    trainable = one["params/trainable"] + (n - 1) * per_expert
    total = one["params/total"] + (n - 1) * per_copy  # each expert's own copy of its tensors
    return {"params/trainable": trainable, "params/total": total,
            "params/updated_pct": 100.0 * trainable / total}


class EnsembleOfExperts(ExpertTrainer):
    """`trainer=eoe`: each task is scored with its own expert."""

    def result(self, ctx: RunContext, state: TrainState) -> FitResult:
        experts = dict(zip((t.name for t in ctx.tasks), self.experts(ctx)))
        return FitResult(None, float("nan"), expert_weights(ctx.model, experts),
                         state.extra["counts"])

    @staticmethod
    def load_weights(model, run_dir: Path, tasks: list[str]) -> TaskWeights:
        load_init(model, run_dir)
        return expert_weights(model, read_experts(run_dir, tasks))


class MergedExperts(ExpertTrainer):
    """`trainer=fedavg`: the experts' updates merged into one model (`merge`: linear (FedAvg),
    task_arithmetic, ties, dare, dare_ties; `weights`: one per task, default 1/n; `density`
    (ties: 0.2, dare: 0.1 when not given, see `minbert.peft.merging.DEFAULTS`), `scale`)."""

    default_weight: Callable[[int], float] = staticmethod(lambda n: 1.0 / n)
    merges = "trainer=fedavg"  # what needs a mergeable PEFT method (minbert.peft.check_mergeable)

    def __init__(self, optimizer: Callable, merge: str = "linear",
                 weights: list[float] | None = None, density: float | None = None,
                 scale: float | None = None, **options):
        super().__init__(optimizer, **options)
        merge_options = {"density": density, "scale": scale}
        if merge not in MERGES:
            raise ConfigError(f"trainer.merge={merge!r}; use one of {sorted(MERGES)}")
        self.merge, self.weights = merge, None if weights is None else [float(w) for w in weights]
        given = {k: v for k, v in merge_options.items() if v is not None}
        self.options = {**default_options(merge, given), **given}
        try:
            check_merge_options(merge, self.options)
        except MergeError as e:
            raise ConfigError(f"trainer.merge={merge}: {e}") from e
        for key in sorted(set(self.options) - set(given)):
            log.info("trainer.merge=%s: trainer.%s=%s (the published default)", merge, key,
                     self.options[key])

    def result(self, ctx: RunContext, state: TrainState) -> FitResult:
        experts = self.experts(ctx)
        weights = self.weights or [self.default_weight(len(experts))] * len(experts)
        if len(weights) != len(experts):
            raise ConfigError(f"trainer.weights has {len(weights)} values for {len(experts)} tasks")
        merged = merge_experts(ctx.model, self._init, experts, self.merge, weights, self.options)
        save_state(merged, ctx.run_dir / MERGED_FILE,
                   {"merge": self.merge, "weights": weights, **self.options})
        heads = {n: t for e in experts for n, t in e.items() if n.startswith("heads.")}
        return FitResult(None, float("nan"), merged_weights(ctx.model, merged, heads),
                         state.extra["counts"])

    @staticmethod
    def load_weights(model, run_dir: Path, tasks: list[str]) -> TaskWeights:
        load_init(model, run_dir)
        path = Path(run_dir) / MERGED_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the run did not finish its merge")
        heads = {n: t for e in read_experts(run_dir, tasks).values() for n, t in e.items()
                 if n.startswith("heads.")}
        return merged_weights(model, load_file(str(path)), heads)


def merge_experts(model, init: State, experts: list[State], method: str, weights: list[float],
                  options: dict) -> State:
    """Merges the experts' updates: each adapter layer's ΔW (and Δb) formed exactly per expert,
    then merged; every other tensor an expert changed (biases under bias=all, full fine-tuning's
    weights, an adapter tensor outside ΔW) merged as a task vector τ_i = θ_i - θ0. Returns the
    merged updates (as `<layer>.delta_weight`, `<layer>.delta_bias`) and the merged task vectors,
    by name; the model is left as it was."""
    layer_deltas, vectors = [], []
    in_delta = _delta_tensors(model)
    with preserved(model, {n for e in experts for n in e}):
        for state in experts:
            load_state(model, state)
            layer_deltas.append(_layer_updates(model))
            vectors.append({n: state[n] - t for n, t in init.items() if n not in in_delta})
    merged_layers = merge_deltas(method, layer_deltas, weights, **options) if layer_deltas[0] else {}
    merged_vectors = merge_deltas(method, vectors, weights, **options) if vectors[0] else {}
    return {**{f"encoder.{n}": d for n, d in merged_layers.items()}, **merged_vectors}


def _layer_updates(model) -> State:
    updates = {}
    for name, layer in adapter_layers(model.encoder):
        dw, db = layer.delta()
        updates[f"{name}.delta_weight"] = dw.detach()
        if db is not None:
            updates[f"{name}.delta_bias"] = db.detach()
    return updates


def merged_weights(model, merged: State, heads: State) -> TaskWeights:
    """For a `with`: θ0 + the merged task vectors, each adapter layer merged with the merged ΔW
    (and Δb), and every head from its own expert; on exit the layers are unmerged and the model
    restored."""
    suffixes = (".delta_weight", ".delta_bias")
    updates = {n.removeprefix("encoder."): t for n, t in merged.items() if n.endswith(suffixes)}
    vectors = {n: t for n, t in merged.items() if not n.endswith(suffixes)}

    @contextmanager
    def weights(task: str):
        tensors = _tensors(model)
        with ExitStack() as stack:
            stack.enter_context(loaded(model, {**{n: tensors[n] + v for n, v in vectors.items()},
                                               **heads}))
            layers = dict(adapter_layers(model.encoder))
            if {f"{n}.delta_weight" for n in layers} != {n for n in updates
                                                          if n.endswith(suffixes[0])}:
                raise CheckpointError("the merged deltas do not fit the model's adapter layers")
            for name, layer in layers.items():
                layer.merge(updates[f"{name}.delta_weight"], updates.get(f"{name}.delta_bias"))
                stack.callback(layer.unmerge)
            yield model

    return weights


def _delta_tensors(model) -> set[str]:
    """Full names of the tensors the adapter layers' ΔW are made of (`AdapterLinear.delta_names`)."""
    return {f"encoder.{name}.{leaf}" for name, layer in adapter_layers(model.encoder)
            for leaf in (layer.delta_names if layer.delta_names is not None
                         else layer.adapter_params())}


class OrthogonalAdaptation(MergedExperts):
    """`trainer=orthoada`: frozen orthogonal B_i blocks, trained A_i, merged by summing."""

    default_weight = staticmethod(lambda n: 1.0)
    merges = "trainer=orthoada"

    def __init__(self, optimizer: Callable, seed: int = 0, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.seed = seed

    def prepare(self, ctx: RunContext, index: int) -> None:
        layers = list(adapter_layers(ctx.model.encoder))
        if not layers or not all(type(m) is LoraLinear for _, m in layers):
            raise ConfigError("trainer=orthoada needs LoRA adapters (peft=lora or lora_fa)")
        g = torch.Generator().manual_seed(self.seed)
        for name, layer in layers:  # the same basis for every task: one draw per layer
            out, r = layer.lora_B.shape
            if r * len(ctx.tasks) > out:
                raise ConfigError(f"orthoada: {len(ctx.tasks)} tasks x rank {r} exceed the "
                                  f"{out} output dimensions of {name}; lower peft.rank")
            Q, _ = torch.linalg.qr(torch.randn(out, out, generator=g))  # [out, out] orthogonal
            with torch.no_grad():
                layer.lora_B.copy_(Q[:, index * r:(index + 1) * r])  # B_i: block i, frozen
                layer.lora_A.zero_()  # A_i trains from zero: the model starts unchanged
            layer.lora_B.requires_grad_(False)
            layer.lora_A.requires_grad_(True)
