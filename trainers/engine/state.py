"""Everything a run needs to continue, in one `TrainState`, and its checkpoints on disk.

A run is phases (one for the one-model strategies, one per expert), each of `epochs` epochs of
steps; the state says where it is (phase, epoch, slot within the epoch, global and phase step),
where each task's data stream is (the permutation drawn for the current pass and a cursor into it,
never a generator to replay), the best score so far, the history and the running losses for the
plots, and a registry of the stateful objects the run trains with, saved and restored by name
(optimizer, LR scheduler, fp16 scaler, the PEFT method's hooks, the gradient combiner). A
checkpoint adds every random number generator (the run's `torch.Generator`, torch's CPU and CUDA
generators, Python's, NumPy's: every rank's, in a data-parallel run) and the model's trained
tensors. All of it is plain tensors and
values, so a checkpoint loads with `torch.load(weights_only=True)`.

Checkpoints are `checkpoints/checkpoint-<n>.pt`, written atomically (`common.durable`), the
newest `keep` kept; `load_checkpoint` falls back to an older one when the newest is unreadable
(a `DamagedFileError` when every one is).
torch's version and thread count are recorded, since both change CPU results bit for bit.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from minbert.peft import adapter_state_dict
from common.durable import atomic_write
from common.errors import CheckpointError, DamagedFileError
from trainers.engine.parallel import SINGLE, Replicas

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COUNTERS = ("phase", "epoch", "slot", "epoch_step", "step", "phase_step", "saves", "best_score",
            "best_epoch", "best_step", "evals_since_best", "done")


@dataclass
class Cursor:
    """Where a task's data stream is: the order drawn for the current pass, and the next index."""

    order: torch.Tensor  # [n] a permutation of the split's examples
    pos: int = 0

    def exhausted(self) -> bool:
        return self.pos >= len(self.order)

    def take(self, batch_size: int) -> torch.Tensor:
        index = self.order[self.pos:self.pos + batch_size]
        self.pos += len(index)
        return index


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "rest": [np_state[0], *np_state[2:]]}}


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, *rest = state["numpy"]["rest"]
    np.random.set_state((kind, state["numpy"]["keys"].numpy().astype(np.uint32), *rest))


class Stateful(Protocol):
    """What the state's registry holds: an object checkpoints save and restore by name."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Where a run is (counters, the task streams' cursors, the history and running losses) and a
    registry of the stateful objects it trains with, by name (`optimizer`, `scheduler`, `scaler`,
    `hooks`, `combiner`, ...), which checkpoints save and restore by those names. The model's
    tensors and the generators belong to the run's context; `checkpoint_state` adds them."""

    phase: int = 0
    epoch: int = 1
    slot: int = 0  # within the epoch: the task a sequential schedule is at
    epoch_step: int = 0  # optimizer steps of this epoch
    step: int = 0  # optimizer steps of the whole run
    phase_step: int = 0  # optimizer steps of this phase (an expert's own schedule)
    saves: int = 0  # checkpoints written
    best_score: float = float("-inf")
    best_epoch: int | None = None
    best_step: int | None = None  # the run's step at the best evaluation
    evals_since_best: int = 0  # dev evaluations in a row without a better dev/overall (patience)
    done: bool = False  # every phase trained
    cursors: dict[str, Cursor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    losses: list[tuple[int, str, float]] = field(default_factory=list)  # for the plots
    epoch_losses: dict[str, list[float]] = field(default_factory=dict)  # task -> [sum, count]
    objects: dict[str, Stateful] = field(default_factory=dict)
    # measured in this process, not checkpointed: [examples, seconds] of its training steps
    throughput: list[float] = field(default_factory=lambda: [0, 0.0])

    def register(self, name: str, obj: Stateful | None) -> None:
        """Keeps `obj` under `name` (None: drops the name), replacing what was there."""
        if obj is None:
            self.objects.pop(name, None)
        else:
            self.objects[name] = obj

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.objects["optimizer"]

    @property
    def scheduler(self):
        return self.objects.get("scheduler")

    @property
    def scaler(self):
        return self.objects.get("scaler")  # fp16's torch.amp.GradScaler

    def state_dict(self) -> dict:
        return {
            "counters": {k: getattr(self, k) for k in COUNTERS},
            "cursors": {t: {"order": c.order, "pos": c.pos} for t, c in self.cursors.items()},
            "history": self.history, "losses": [list(x) for x in self.losses],
            "epoch_losses": self.epoch_losses,
            "objects": {name: obj.state_dict() for name, obj in sorted(self.objects.items())},
        }

    def load_counters(self, sd: dict) -> None:
        """Where the run was (phase, epoch, ...), without touching the live objects: a strategy
        rebuilds its phase's optimizer from these before `load_state_dict` fills it."""
        for k, v in sd["counters"].items():
            setattr(self, k, v)

    def load_state_dict(self, sd: dict) -> None:
        self.load_counters(sd)
        self.cursors = {t: Cursor(c["order"], c["pos"]) for t, c in sd["cursors"].items()}
        self.history, self.epoch_losses = list(sd["history"]), dict(sd["epoch_losses"])
        self.losses = [tuple(x) for x in sd["losses"]]
        saved, live = set(sd["objects"]), set(self.objects)
        if saved != live:
            raise CheckpointError(f"the checkpoint holds the state of {sorted(saved)}, this run "
                                  f"has {sorted(live)}: it was written by another strategy or "
                                  "version; start the run afresh in a new folder")
        for name, obj in self.objects.items():
            obj.load_state_dict(sd["objects"][name])


def checkpoint_state(state: TrainState, model: torch.nn.Module, generator: torch.Generator,
                     parallel: Replicas = SINGLE) -> dict:
    """What a checkpoint holds: the state, the model's trained tensors and every generator of
    every rank (`rng`, by rank: a data-parallel run's ranks draw dropout masks for different
    examples, so their generators differ). The state is rank 0's: every rank holds the same."""
    return {"state": state.state_dict(),
            "model": {n: t.detach().clone() for n, t in adapter_state_dict(model).items()},
            "rng": parallel.gather_objects(rng_state(generator)),
            "meta": _meta(parallel)}


def _meta(parallel: Replicas) -> dict:
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "world_size": parallel.world}


def restore_checkpoint(sd: dict, state: TrainState, model: torch.nn.Module,
                       generator: torch.Generator, parallel: Replicas = SINGLE) -> None:
    """Puts a checkpoint back: the state and its objects, the model's tensors, this rank's
    generators. A checkpoint resumes with the number of processes that wrote it."""
    saved = sd["meta"].get("world_size", 1)
    if saved != parallel.world:
        raise CheckpointError(
            f"the run's checkpoint was written by {saved} process(es) and this resume has "
            f"{parallel.world}: each process's random generators are in it, so resume with the "
            f"same number: " + ("python train.py ..." if saved == 1 else
                                f"torchrun --nproc_per_node={saved} train.py ..."))
    state.load_state_dict(sd["state"])
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in sd["model"].items():
            tensors[name].copy_(t)
    rngs = sd["rng"] if isinstance(sd["rng"], list) else [sd["rng"]]
    set_rng_state(generator, rngs[parallel.rank])
    _check_meta({"world_size": 1, **sd["meta"]}, parallel)


def _check_meta(meta: dict, parallel: Replicas) -> None:
    now = _meta(parallel)
    if meta != now:
        log.warning("the checkpoint was written with torch %s on %s threads, this process has "
                    "torch %s on %s threads: the resumed run is valid but will not match an "
                    "uninterrupted one bit for bit", meta["torch"], meta["threads"], now["torch"],
                    now["threads"])


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(folder.glob("checkpoint-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def save_checkpoint(state: TrainState, model: torch.nn.Module, generator: torch.Generator,
                    run_dir: Path, keep: int = 2, parallel: Replicas = SINGLE) -> Path:
    """Writes the state, the model's trained tensors and the generators as the newest checkpoint,
    atomically, then deletes all but `keep` (rank 0 writes and deletes; every rank sends it its
    generators)."""
    state.saves += 1
    path = Path(run_dir) / CHECKPOINTS / f"checkpoint-{state.saves:06d}.pt"
    sd = checkpoint_state(state, model, generator, parallel)
    atomic_write(path, lambda f: torch.save(sd, f), fault="checkpoint-write")
    if parallel.main:
        for old in checkpoint_files(run_dir)[:-max(1, keep)]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable checkpoint's state dict (an unreadable one, truncated, emptied or
    overwritten, is skipped, with a warning, for the one before it); None if there is none. If
    there are checkpoints and none is readable, a `DamagedFileError`: starting over beside them
    would keep their higher numbers as the newest and delete the new run's own."""
    files = checkpoint_files(run_dir)
    for path in reversed(files):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(sd, dict):
                raise ValueError(f"it holds a {type(sd).__name__}, not a checkpoint's dict")
        except Exception as e:  # truncated, corrupted: any failure means try the older one
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it", path,
                        type(e).__name__, e)
            continue
        if "state" not in sd:
            raise CheckpointError(f"{path} was written by an older version of the trainer; "
                                  "start the run afresh in a new folder")
        counters = sd["state"]["counters"]
        log.info("resuming from %s (phase %d, epoch %d, step %d)", path, counters["phase"],
                 counters["epoch"], counters["step"])
        return sd
    if files:
        folder = Path(run_dir) / CHECKPOINTS
        raise DamagedFileError(
            f"{folder} holds {len(files)} checkpoint(s) ({', '.join(p.name for p in files)}) and "
            "every one is damaged (truncated or overwritten; see the warnings above), so the run "
            f"cannot resume: move {folder} away to start the run afresh in this folder, or run "
            "it in a new folder")
    return None
