"""PCGrad, "projecting conflicting gradients" (Yu et al. 2020, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, Algorithm 1).

Each task's gradient g_i (all parameters flattened into one vector) is visited against the other
tasks' gradients g_j in a random order; whenever the current g_i' conflicts with g_j
(g_i'·g_j < 0), it is projected onto the normal plane of g_j:

    g_i' <- g_i' - (g_i'·g_j / ||g_j||²) g_j

The update is the sum of the projected gradients, Σ_i g_i'. As in the paper, the projections use
the *original* g_j of the other tasks, and the conflict is tested with the current, partly
projected g_i'. With two tasks this makes each g_i' orthogonal to the other task's gradient when
they conflict, and leaves both untouched when they do not (then the update is the plain sum).

`pcgrad` is pure: it takes per-task gradient lists and returns per-parameter gradients; the caller
writes them into `param.grad` before the optimiser step (`trainers.engine.loop.task_gradients`
produces such lists from per-task losses with `torch.autograd.grad`).

Memory: one flattened copy per task of all the gradients given, so pass only the trainable
parameters (PEFT adapters and heads), not the frozen encoder.
"""
from __future__ import annotations

from typing import Sequence

import torch


def pcgrad(grads: Sequence[Sequence[torch.Tensor | None]],
           generator: torch.Generator | None = None) -> list[torch.Tensor | None]:
    """Sum of the PCGrad-projected task gradients, one tensor per parameter.

    grads[i][k] is task i's gradient for parameter k (the same parameter order for every task);
    None means task i does not touch parameter k and counts as zeros. A parameter that no task
    touches gets None back. The other tasks are visited in an order drawn from `generator`
    (seeded, so reproducible); with generator=None, in the given order.
    """
    if not grads:
        raise ValueError("pcgrad needs the gradients of at least one task")
    n_params = len(grads[0])
    if any(len(g) != n_params for g in grads):
        raise ValueError("every task must give one gradient (or None) per parameter, in the "
                         f"same order; got lengths {[len(g) for g in grads]}")
    templates = [next((g[k] for g in grads if g[k] is not None), None) for k in range(n_params)]
    if all(t is None for t in templates):
        return [None] * n_params
    flat = [flatten_grads(task, templates) for task in grads]
    projected = project_conflicting(flat, generator)
    return unflatten_grads(torch.stack(projected).sum(dim=0), templates)


def project_conflicting(flat: Sequence[torch.Tensor],
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The projected g_i' of every task, from flattened task gradients (Algorithm 1 of the paper,
    without the final sum)."""
    return [_project(i, flat, generator) for i in range(len(flat))]


def others_in_order(i: int, n: int, generator: torch.Generator | None) -> list[int]:
    """The tasks other than i, in an order drawn from `generator` (None: in index order)."""
    others = [j for j in range(n) if j != i]
    if generator is not None:
        others = [others[k] for k in torch.randperm(len(others), generator=generator).tolist()]
    return others


def _project(i: int, flat: Sequence[torch.Tensor],
             generator: torch.Generator | None) -> torch.Tensor:
    """Task i's gradient, projected off every other task's gradient it conflicts with."""
    g = flat[i].clone()
    for j in others_in_order(i, len(flat), generator):
        dot = torch.dot(g, flat[j])
        if dot < 0:  # a conflict implies ||g_j|| > 0
            g -= dot / torch.dot(flat[j], flat[j]) * flat[j]
    return g


def flatten_grads(task: Sequence[torch.Tensor | None],
             templates: list[torch.Tensor | None]) -> torch.Tensor:
    """One float vector (at least float32) of a task's gradients, zeros where None."""
    parts = []
    for grad, template in zip(task, templates):
        if template is None:
            continue
        if grad is not None and grad.shape != template.shape:
            raise ValueError(f"gradient shapes differ across tasks: {tuple(grad.shape)} vs "
                             f"{tuple(template.shape)}")
        grad = torch.zeros_like(template) if grad is None else grad
        parts.append(grad.reshape(-1).to(torch.promote_types(grad.dtype, torch.float32)))
    dtype = parts[0].dtype
    for part in parts:
        dtype = torch.promote_types(dtype, part.dtype)
    return torch.cat([p.to(dtype) for p in parts])


def unflatten_grads(vector: torch.Tensor,
               templates: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    out, offset = [], 0
    for template in templates:
        if template is None:
            out.append(None)
            continue
        n = template.numel()
        out.append(vector[offset:offset + n].view_as(template).to(template.dtype))
        offset += n
    return out
