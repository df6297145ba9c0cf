"""Per-task experts, the multi-task minBERT report's ensembles (its Table 3), and their merges.

- `trainer=eoe`, Ensemble of Experts: one adapter (or fully fine-tuned encoder) plus head per task,
  each trained alone from the same initial state; at inference each task uses its own expert.
- `trainer=fedavg`: the same experts, merged into one model in weight space,
  θ0 + Σ_i λ_i Δθ_i (McMahan et al., 2017, with one round), where each adapter layer's update is
  formed exactly, ΔW_i = s_i B_i A_i, before combining (`minbert.peft.merging`); `trainer.finisher.merge`
  also picks task arithmetic, TIES or DARE. Every other tensor an expert changes (biases under
  `bias=all`, full fine-tuning's weights, adapter tensors outside ΔW) merges as a task vector by
  the same method. Each task keeps its own head.
- `trainer=orthoada`, orthogonal adaptation (Po et al., 2023): every LoRA layer draws one random
  orthogonal basis by QR; task i gets the disjoint column block i as its frozen B_i and trains only
  A_i (from zero), so B_iᵀB_j = 0 and the summed merge keeps each task's update in its own subspace.

These are parts of a composed strategy (`trainers.strategies.strategy`): the `per_task` phases,
then the `Experts` or `MergeExperts` finisher, and for OrthoAda the `OrthogonalBlocks` initialiser.
The shared model is never left holding an expert or a merge: after training it is back at the
initial state, and `FitResult.weights(task)` loads a task's expert (or merges the experts) for the duration
of a `with`, restoring the model on exit. Experts are saved as `experts/<task>.safetensors`, the
initial adapter tensors as `experts/init.safetensors` and a merge as `merged.safetensors`, so that
`load_weights` rebuilds the run and `scripts/merge.py` merges again without training.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from common.errors import CheckpointError, ConfigError
from minbert.peft import adapter_layers, adapter_state_dict, adapter_tensors, param_counts
from minbert.peft.io import method_metadata, read_state, save_state
from minbert.peft.lora import LoraLinear
from minbert.peft.merging import (MERGES, MergeError, check_merge_options, default_options,
                                   merge_deltas)
from tasks.base import Task
from trainers.engine.context import RunContext, TaskWeights
from trainers.engine.loop import FitResult
from trainers.engine.state import TrainState
from trainers.strategies.finishers import check_phases
from trainers.strategies.phases import State, load_state, loaded, preserved, tensors_of

log = logging.getLogger(__name__)
EXPERTS_DIR, INIT_FILE, MERGED_FILE = "experts", "init.safetensors", "merged.safetensors"


def encoder_state(model) -> State:
    """The encoder's trainable and adapter tensors (what an expert changes), cloned."""
    return {n: t.clone() for n, t in adapter_state_dict(model).items() if n.startswith("encoder.")}


def expert_state(model, task: str) -> State:
    head = {n: t.clone() for n, t in adapter_state_dict(model).items()
            if n.startswith(f"heads.{task}.")}
    return {**encoder_state(model), **head}


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
    return {t: read_state(f, f"expert for {t}") for t, f in files.items()}


def load_init(model, run_dir: Path) -> None:
    """Puts the adapters back at the run's initial state (`experts/init.safetensors`)."""
    path = Path(run_dir) / EXPERTS_DIR / INIT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the run's initial adapter state is needed to "
                              "rebuild its experts (was the run made by an older version?)")
    load_state(model, read_state(path, "initial adapter state"))


class Experts:
    """`trainer=eoe`: one expert per task (its best epoch kept in `experts/<task>.safetensors`),
    each task scored with its own."""

    phases, merges = "per_task", None

    def check(self, phases: str) -> None:
        check_phases(self, phases)

    def start(self, ctx: RunContext) -> None:
        """Keeps the initial encoder state, and saves the tensors drawn at random in it (for
        `load_weights`)."""
        self.initial = encoder_state(ctx.model)
        drawn = adapter_tensors(ctx.model)
        save_state({n: t for n, t in self.initial.items() if n in drawn},
                   ctx.run_dir / EXPERTS_DIR / INIT_FILE, method_metadata(ctx.method))

    def save_best(self, ctx: RunContext, state: TrainState, tasks: list[Task]) -> None:
        save_state(expert_state(ctx.model, tasks[0].name), expert_file(ctx.run_dir, tasks[0].name),
                   {**method_metadata(ctx.method), "task": tasks[0].name,
                    "score": state.best_score, "epoch": state.best_epoch})

    def experts(self, ctx: RunContext, phases) -> list[State]:
        """The finished experts, in task order; the model back at the initial state."""
        phases.restore(ctx.model)
        found = read_experts(ctx.run_dir, [t.name for t in ctx.tasks])
        return [found[t.name] for t in ctx.tasks]

    def counts(self, ctx: RunContext) -> dict[str, float]:
        per_expert = sum(p.numel() for p in ctx.model.encoder.parameters() if p.requires_grad)
        return expert_counts(ctx.model, per_expert, len(ctx.tasks))

    def result(self, ctx: RunContext, state: TrainState, phases) -> FitResult:
        experts = dict(zip((t.name for t in ctx.tasks), self.experts(ctx, phases)))
        return FitResult(None, float("nan"), expert_weights(ctx.model, experts), self.counts(ctx))

    @staticmethod
    def load_weights(model, run_dir: Path, tasks: list[str]) -> TaskWeights:
        load_init(model, run_dir)
        return expert_weights(model, read_experts(run_dir, tasks))


def expert_counts(model, per_expert: int, n: int) -> dict[str, float]:
    """The report's "Parameters updated" for n experts: every expert's trained tensors and every
    head over the base plus n adapters (three r=64 all-linear LoRAs on bert-base: about 22.8 %)."""
    one, stored = param_counts(model), set(encoder_state(model))
    per_copy = sum(p.numel() for n_, p in model.named_parameters() if n_ in stored)
    trainable = one["params/trainable"] + (n - 1) * per_expert
    total = one["params/total"] + (n - 1) * per_copy  # each expert's own copy of its tensors
    return {"params/trainable": trainable, "params/total": total,
            "params/updated_pct": 100.0 * trainable / total}


class MergeExperts(Experts):
    """`trainer=fedavg`: the experts' updates merged into one model (`merge`: linear (FedAvg),
    task_arithmetic, ties, dare, dare_ties; `weights`: one per task, default `default_weight`
    each, or 1/n; `density` (ties: 0.2, dare: 0.1 when not given, see
    `minbert.peft.merging.DEFAULTS`), `scale`). `merges`: the choice named when the PEFT method
    cannot merge."""

    def __init__(self, merge: str = "linear", weights: list[float] | None = None,
                 density: float | None = None, scale: float | None = None,
                 default_weight: float | None = None, merges: str = "trainer=fedavg"):
        if merge not in MERGES:
            raise ConfigError(f"trainer.finisher.merge={merge!r}; use one of {sorted(MERGES)}")
        self.merge, self.weights = merge, None if weights is None else [float(w) for w in weights]
        self.default_weight, self.merges = default_weight, merges
        given = {k: v for k, v in {"density": density, "scale": scale}.items() if v is not None}
        self.options = {**default_options(merge, given), **given}
        try:
            check_merge_options(merge, self.options)
        except MergeError as e:
            raise ConfigError(f"trainer.finisher.merge={merge}: {e}") from e
        for key in sorted(set(self.options) - set(given)):
            log.info("trainer.finisher.merge=%s: trainer.finisher.%s=%s (the published default)",
                     merge, key, self.options[key])

    def check_tasks(self, names: list[str]) -> None:
        """Before any expert trains: one weight per task (`Strategy.check_tasks`)."""
        if self.weights is not None and len(self.weights) != len(names):
            raise ConfigError(f"trainer.finisher.weights={self.weights} has {len(self.weights)} "
                              f"values for the run's {len(names)} tasks {names}: give one weight "
                              "per task, in the order of `tasks`, or null (equal weights)")

    def weights_for(self, n: int) -> list[float]:
        """The merge's weights for n experts: `weights`, else `default_weight` (else 1/n) each."""
        weights = self.weights or [1.0 / n if self.default_weight is None
                                   else self.default_weight] * n
        if len(weights) != n:
            raise ConfigError(f"trainer.finisher.weights has {len(weights)} values for {n} tasks")
        return weights

    def result(self, ctx: RunContext, state: TrainState, phases) -> FitResult:
        experts = self.experts(ctx, phases)
        weights = self.weights_for(len(experts))
        merged = merge_experts(ctx.model, self.initial, experts, self.merge, weights, self.options)
        save_state(merged, ctx.run_dir / MERGED_FILE,
                   {"merge": self.merge, "weights": weights, **self.options})
        heads = {n: t for e in experts for n, t in e.items() if n.startswith("heads.")}
        return FitResult(None, float("nan"), merged_weights(ctx.model, merged, heads),
                         self.counts(ctx))

    @staticmethod
    def load_weights(model, run_dir: Path, tasks: list[str]) -> TaskWeights:
        load_init(model, run_dir)
        path = Path(run_dir) / MERGED_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the run did not finish its merge")
        heads = {n: t for e in read_experts(run_dir, tasks).values() for n, t in e.items()
                 if n.startswith("heads.")}
        return merged_weights(model, read_state(path, "merge of the experts"), heads)


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
        tensors = tensors_of(model)
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


class OrthogonalBlocks:
    """`trainer=orthoada`'s initialiser (`trainer.init`): before expert i trains, every LoRA
    layer's B is block i of one random orthogonal basis (drawn from `seed`, the same for every
    task), frozen, and A trains from zero."""

    def __init__(self, seed: int = 0):
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
