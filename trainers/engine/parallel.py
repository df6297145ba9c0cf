"""Data-parallel runs: one run trained by N processes with PyTorch's DistributedDataParallel (Li et
al., 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB), gloo
on the CPU and NCCL on GPUs, started by `torchrun --nproc_per_node=N train.py ...` or by a
submitit job with `tasks_per_node=N` (`hydra/launcher=slurm_ddp`, `local_ddp`).

Every rank builds the same run from the same seed and draws every batch from the same run
generator, so all ranks agree on the global batch of `data.batch_size` examples; each rank then
trains on its contiguous share of it (`share`), its loss weighted by its share of the examples, and
DDP's gradient all-reduce gives every rank the gradient of the whole batch's mean loss: the same
step as one process takes. A step that combines several tasks' gradients (PCGrad, GradVac) runs
outside DDP and sums each task's gradient across ranks before combining. Dev and test scoring is
sharded by eval batch (rank r scores batches r, r+N, ...) and gathered, so every rank holds the
whole split's metrics and takes the same early-stopping decisions. Rank 0 writes every file
(`common.durable`), logs to W&B and shows the progress bars.

`Replicas` is what the engine asks of the run's processes; `SINGLE` (one process) answers every
question with the identity, and `DataParallel` with collectives. A checkpoint holds every rank's
random generators; it resumes with the same number of processes only.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)
TIMEOUT = timedelta(minutes=30)  # a rank waiting this long for the others gives up


class Replicas(Protocol):
    """The processes that train one run, as the engine sees them."""

    rank: int
    world: int

    @property
    def main(self) -> bool: ...

    def begin_phase(self, model: torch.nn.Module) -> None:
        """Wraps the model for a phase's steps (its trainable tensors are set by then)."""

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a step's forward runs through (DDP's wrapper: its backward averages gradients)."""

    def share(self, batch):
        """(this rank's examples of a global batch, their fraction of the batch)."""

    def sum(self, values: list[torch.Tensor]) -> list[float]:
        """Each value summed over the ranks (one all-reduce)."""

    def sum_gradients(self, grads: list[list]) -> list[list]:
        """Per-task gradients summed over the ranks (for a combiner)."""

    def any(self, flag: bool) -> bool: ...

    def mine(self, n: int) -> range:
        """The eval batches (of n) this rank scores."""

    def gather(self, mine: dict[int, torch.Tensor], n: int) -> list[torch.Tensor]:
        """Every rank's scored batches, in order."""

    def agree(self, value):
        """Rank 0's value, on every rank."""

    def gather_objects(self, obj) -> list: ...

    def check_in_sync(self, model: torch.nn.Module, state) -> None: ...

    def barrier(self) -> None: ...


class Single:
    """One process: every collective is the identity."""

    rank, world, main = 0, 1, True

    def begin_phase(self, model):
        return None

    def module(self, model):
        return model

    def share(self, batch):
        return batch, 1.0

    def sum(self, values):
        return [v.item() for v in values]

    def sum_gradients(self, grads):
        return grads

    def any(self, flag):
        return flag

    def mine(self, n):
        return range(n)

    def gather(self, mine, n):
        return [mine[i] for i in range(n)]

    def agree(self, value):
        return value

    def gather_objects(self, obj):
        return [obj]

    def check_in_sync(self, model, state):
        return None

    def barrier(self):
        return None


SINGLE = Single()


class DataParallel:
    """This process's part of an N-process run (the default process group)."""

    def __init__(self, device: torch.device):
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self._ddp: DistributedDataParallel | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def begin_phase(self, model):
        # find_unused_parameters: a step trains one task's head and leaves the others unused
        self._ddp = DistributedDataParallel(model, device_ids=None, forward_sync_buffers=False,
                                            find_unused_parameters=True)

    def module(self, model):
        if self._ddp is None or self._ddp.module is not model:
            raise TrainingError("a data-parallel step ran before its phase began (no DDP wrapper)")
        return self._ddp

    def share(self, batch):
        """Examples [n*r/N, n*(r+1)/N) of the batch, padded as the whole batch is. A rank whose
        share is empty (a last batch of fewer examples than ranks) runs the first example with
        weight 0, so that it still takes part in the gradient all-reduce."""
        n = len(batch)
        start, stop = n * self.rank // self.world, n * (self.rank + 1) // self.world
        if start == stop:
            return batch.rows(0, 1), 0.0
        return batch.rows(start, stop), (stop - start) / n

    def sum(self, values):
        if not values:
            return []
        flat = torch.stack([v.detach().float().reshape(()) for v in values]).to(self.device)
        dist.all_reduce(flat)
        return flat.cpu().tolist()

    def sum_gradients(self, grads):
        out = []
        for task_grads in grads:
            present = [g for g in task_grads if g is not None]
            flat = torch.cat([g.reshape(-1) for g in present]) if present else None
            if flat is not None:
                dist.all_reduce(flat)
            out.append(_unflatten(task_grads, flat))
        return out

    def any(self, flag):
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mine(self, n):
        return range(self.rank, n, self.world)

    def gather(self, mine, n):
        found: dict[int, torch.Tensor] = {}
        for part in self.gather_objects({i: t.cpu() for i, t in mine.items()}):
            found.update(part)
        return [found[i] for i in range(n)]

    def agree(self, value):
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def check_in_sync(self, model, state):
        """Raises on every rank if the ranks' trained tensors or data positions differ: a method
        that draws random numbers outside the run's generator, say, would make them drift."""
        sums = [p.detach().double().sum().item() for p in model.parameters() if p.requires_grad]
        mark = (state.step, sorted((t, c.pos) for t, c in state.cursors.items()), sums)
        marks = self.gather_objects(mark)
        bad = [r for r, m in enumerate(marks) if m != marks[0]]
        if bad:
            raise TrainingError(f"after step {state.step} the trained tensors or data positions "
                                f"of rank(s) {bad} differ from rank 0's: this configuration does "
                                "not train data-parallel reproducibly; run it in one process")

    def barrier(self):
        dist.barrier()


def _unflatten(like: list, flat: torch.Tensor | None) -> list:
    out, pos = [], 0
    for g in like:
        if g is None:
            out.append(None)
            continue
        out.append(flat[pos:pos + g.numel()].view_as(g))
        pos += g.numel()
    return out


def launched_world() -> int:
    """How many processes were started for this run: torchrun's WORLD_SIZE, or a submitit job's
    tasks (1 for a plain `python train.py`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if "SUBMITIT_FOLDER" in os.environ:
        import submitit

        return submitit.JobEnvironment().num_tasks
    return 1


def start(device: torch.device) -> tuple[Replicas, torch.device]:
    """The run's processes (a process group started on first use, gloo for the CPU, NCCL for
    GPUs) and this rank's device: `device=cuda`/`auto` becomes cuda:<local rank>."""
    if launched_world() == 1:
        return SINGLE, device
    if "SUBMITIT_FOLDER" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ \
            and not dist.is_initialized():  # the job's rendezvous, from Slurm's (or submitit's)
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"device={device}: in a data-parallel run each rank uses the GPU of "
                              "its local rank; give device=cuda or device=auto")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"rank with local rank {local} sees {torch.cuda.device_count()} "
                              "GPU(s): start one process per GPU (torchrun --nproc_per_node, or "
                              "hydra.launcher.tasks_per_node equal to gpus_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
        log.info("process group: %d ranks over %s", dist.get_world_size(), backend)
    elif dist.get_backend() != backend:
        raise ConfigError(f"this multirun's jobs ask for {backend} and an earlier one for "
                          f"{dist.get_backend()}: give every job the same device=")
    return DataParallel(device), device
