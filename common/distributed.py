"""Which process of a data-parallel run this is, read from `torch.distributed` (the process group
`trainers.engine.parallel` starts under `torchrun` or a multi-task submitit job): `rank()`,
`world_size()` and `is_main()`. One process writes a run's files: `common.durable` writes nothing
on the others (rank 0 holds the same state, so its files are the run's)."""
from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """How many processes train the run: 1 unless a process group is up."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the run's process group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run's files, logs and progress bars (rank 0)."""
    return rank() == 0
