"""Per-task experts, the multi-task minBERT report's ensembles (its Table 3), and their merges.

- `trainer=eoe`, Ensemble of Experts: one adapter (or fully fine-tuned encoder) plus head per task,
  each trained alone from the same initial state; at inference each task uses its own expert.
- `trainer=fedavg`: the same experts, merged into one model in weight space,
  θ0 + Σ_i λ_i Δθ_i (McMahan et al., 2017, with one round), where each adapter layer's update is
  formed exactly, ΔW_i = s_i B_i A_i, before combining (`minbert.peft.merging`); `trainer.merge`
  also picks task arithmetic, TIES or DARE. Each task keeps its own head.
- `trainer=orthoada`, orthogonal adaptation (Po et al., 2023): every LoRA layer draws one random
  orthogonal basis by QR; task i gets the disjoint column block i as its frozen B_i and trains only
  A_i (from zero), so B_iᵀB_j = 0 and the summed merge keeps each task's update in its own subspace.

Experts are saved as `experts/<task>.safetensors`, and a merge as `merged.safetensors`, so that
`scripts/merge.py` can merge them again with other weights or methods without training.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import torch

from minbert.errors import ConfigError
from minbert.peft import adapter_layers, adapter_state_dict, param_counts
from minbert.peft.io import method_metadata, save_state
from minbert.peft.lora import LoraLinear
from minbert.peft.merging import MERGES, merge_deltas
from trainers.loop import RunContext, append_history, evaluate, train_task_epoch
from trainers.optim import build_optimizer
from trainers.sequential import SequentialTrainer

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]


def encoder_state(model) -> State:
    """The encoder's trainable and adapter tensors (what an expert changes), cloned."""
    return {n: t.clone() for n, t in adapter_state_dict(model).items() if n.startswith("encoder.")}


def expert_state(model, task: str) -> State:
    head = {n: t.clone() for n, t in adapter_state_dict(model).items()
            if n.startswith(f"heads.{task}.")}
    return {**encoder_state(model), **head}


@torch.no_grad()
def load_state(model, state: State) -> None:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in state.items():
        tensors[name].copy_(t)


class ExpertTrainer(SequentialTrainer):
    """Trains one expert per task (the shared part of eoe, fedavg and orthoada); takes the
    sequential trainer's options (optimizer, epochs, head_lr, max_grad_norm)."""

    def prepare(self, ctx: RunContext, index: int) -> None:
        """Hook before expert `index` trains (OrthoAda sets its frozen block here)."""

    def train_expert(self, ctx: RunContext, index: int) -> State:
        task = ctx.tasks[index]
        sub = replace(ctx, tasks=[task])
        optimizer = build_optimizer(self.optimizer, ctx.model, self.head_lr, ctx.method,
                                    ctx.state_bits)
        ctx.optimizer, best, best_score = optimizer, None, float("-inf")
        for epoch in range(1, self.epochs + 1):
            loss = train_task_epoch(sub, task, optimizer, epoch, self.max_grad_norm)
            metrics, _ = evaluate(sub, "dev")
            if metrics["dev/overall"] > best_score:
                best, best_score = expert_state(ctx.model, task.name), metrics["dev/overall"]
            append_history(ctx.run_dir, {"expert": task.name, "epoch": epoch, "step": sub.step,
                                         **metrics, f"{task.name}/train/loss": loss})
            ctx.logger.log({**{f"expert/{k}": v for k, v in metrics.items()}, "epoch": epoch},
                           step=sub.step)
            log.info("expert %s, epoch %d/%d: %s", task.name, epoch, self.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        ctx.step = sub.step
        return best

    def train_experts(self, ctx: RunContext) -> list[State]:
        init, experts = encoder_state(ctx.model), []
        for index, task in enumerate(ctx.tasks):
            load_state(ctx.model, init)  # every expert starts from the same state
            self.prepare(ctx, index)
            per_expert = sum(p.numel() for p in ctx.model.encoder.parameters() if p.requires_grad)
            experts.append(self.train_expert(ctx, index))
            save_state(experts[-1], ctx.run_dir / "experts" / f"{task.name}.safetensors",
                       {**method_metadata(ctx.method), "task": task.name})
        ctx.param_counts = expert_counts(ctx.model, per_expert, len(ctx.tasks))
        return experts


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

    def fit(self, ctx: RunContext) -> None:
        experts = dict(zip((t.name for t in ctx.tasks), self.train_experts(ctx)))

        @contextmanager
        def expert(name: str):
            load_state(ctx.model, experts[name])
            yield

        ctx.expert = expert


class MergedExperts(ExpertTrainer):
    """`trainer=fedavg`: the experts' updates merged into one model (`merge`: linear (FedAvg),
    task_arithmetic, ties, dare; `weights`: one per task, default 1/n; `density`, `scale`)."""

    default_weight: Callable[[int], float] = staticmethod(lambda n: 1.0 / n)

    def __init__(self, optimizer: Callable, epochs: int = 10, head_lr: float | None = None,
                 max_grad_norm: float | None = None, merge: str = "linear",
                 weights: list[float] | None = None, **merge_options):
        super().__init__(optimizer, epochs, head_lr, max_grad_norm)
        if merge not in MERGES:
            raise ConfigError(f"trainer.merge={merge!r}; use one of {sorted(MERGES)}")
        self.merge, self.weights = merge, None if weights is None else [float(w) for w in weights]
        self.options = {k: v for k, v in merge_options.items() if v is not None}
        if merge in ("ties", "dare", "dare_ties") and "density" not in self.options:
            raise ConfigError(f"trainer.merge={merge} needs trainer.density (the fraction kept)")

    def fit(self, ctx: RunContext) -> None:
        init = encoder_state(ctx.model)
        experts = self.train_experts(ctx)
        weights = self.weights or [self.default_weight(len(experts))] * len(experts)
        if len(weights) != len(experts):
            raise ConfigError(f"trainer.weights has {len(weights)} values for {len(experts)} tasks")
        merged = merge_experts(ctx.model, init, experts, self.merge, weights, self.options)
        save_state(merged, ctx.run_dir / "merged.safetensors",
                   {"merge": self.merge, "weights": weights, **self.options})


def merge_experts(model, init: State, experts: list[State], method: str, weights: list[float],
                  options: dict) -> State:
    """Loads θ0 + merge(Δθ_i) into `model`: adapter layers merged with the merged ΔW, other
    encoder tensors (biases under bias=all, or full fine-tuning's weights) as task vectors; every
    head from its own expert. Returns the merged ΔW and task vectors by name."""
    layer_deltas, vectors = [], []
    for state in experts:
        load_state(model, state)
        layer_deltas.append({n: m.delta_weight().detach() for n, m in adapter_layers(model.encoder)})
        vectors.append({n: state[n] - t for n, t in init.items() if n.startswith("encoder.")
                        and not _is_adapter_tensor(model, n)})
    merged_layers = merge_deltas(method, layer_deltas, weights, **options) if layer_deltas[0] else {}
    merged_vectors = merge_deltas(method, vectors, weights, **options) if vectors[0] else {}
    load_state(model, init)
    for state in experts:  # the heads, each from its expert
        load_state(model, {n: t for n, t in state.items() if n.startswith("heads.")})
    for name, layer in adapter_layers(model.encoder):
        layer.merge(merged_layers[name])
    load_state(model, {n: init[n] + v for n, v in merged_vectors.items()})
    return {**{f"encoder.{n}.delta_weight": d for n, d in merged_layers.items()}, **merged_vectors}


def _is_adapter_tensor(model, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf in getattr(model.get_submodule(module), "adapter_names", ())


class OrthogonalAdaptation(MergedExperts):
    """`trainer=orthoada`: frozen orthogonal B_i blocks, trained A_i, merged by summing."""

    default_weight = staticmethod(lambda n: 1.0)

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
