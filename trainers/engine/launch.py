"""How `train.py`'s processes agree on one run folder when several train one run (`torchrun
--nproc_per_node=N`, or a submitit job with `tasks_per_node=N`: `trainers.engine.parallel`).

Hydra resolves `hydra.run.dir` (`outputs/runs/${now:...}`) in every process on its own clock, so
the ranks of one torchrun launch can name different folders (the known pitfall of Hydra under
DDP). Here every rank other than 0 runs Hydra in a scratch folder of its own, writing nothing
there (`hydra.output_subdir=null`, no log file) that is deleted at exit, and each job takes its
run folder from rank 0 (`agree_run_dir`). Under submitit every task receives the job's folder
already resolved by the launcher, and the same agreement holds trivially.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from common.errors import ConfigError
from trainers.engine.parallel import launched_world

log = logging.getLogger(__name__)
SCRATCH_KEYS = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.output_subdir=",
                "hydra/job_logging=", "hydra/hydra_logging=")


def torchrun_rank() -> int:
    """This process's rank under torchrun, before any process group exists (0 otherwise)."""
    return int(os.environ.get("RANK", "0")) if "LOCAL_RANK" in os.environ else 0


def rank_overrides(argv: list[str]) -> list[str]:
    """`argv` for this process: unchanged on rank 0 (and outside torchrun); on any other rank,
    with Hydra's folders moved to a scratch folder (deleted at exit) and its logging off, so that
    only rank 0 writes the run's Hydra files and log."""
    rank = torchrun_rank()
    if rank == 0:
        return argv
    scratch = tempfile.mkdtemp(prefix=f"minbert-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [a for a in argv if not a.lstrip("+~").startswith(SCRATCH_KEYS)]
    return kept + [f"hydra.run.dir={scratch}/run", f"hydra.sweep.dir={scratch}/sweep",
                   "hydra.output_subdir=null", "hydra/job_logging=none",
                   "hydra/hydra_logging=none"]


def check_launcher(launcher_target: str | None) -> None:
    """Under torchrun, a multirun's jobs run in the ranks' own processes (Hydra's basic
    launcher); a launcher that starts processes of its own would start them outside the
    process group."""
    if launched_world() > 1 and "TORCHELASTIC_RUN_ID" in os.environ and launcher_target \
            and not launcher_target.endswith("BasicLauncher"):
        raise ConfigError(f"hydra/launcher ({launcher_target}) under torchrun: each rank would "
                          "start its own job processes outside the run's process group; sweep "
                          "with the default launcher under torchrun, or start data-parallel "
                          "jobs with hydra/launcher=slurm_ddp (or local_ddp) without torchrun")


def agree_run_dir(run_dir: str, parallel) -> str:
    """Rank 0's run folder, on every rank (quiets the other ranks' logs to warnings)."""
    if parallel.world == 1:
        return run_dir
    if not parallel.main:
        logging.getLogger().setLevel(logging.WARNING)
    return parallel.agree(run_dir)
