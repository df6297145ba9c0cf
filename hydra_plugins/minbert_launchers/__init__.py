"""Hydra's submitit launchers for data-parallel jobs (`hydra/launcher=slurm_ddp`, `local_ddp`):
each job of a sweep is one run trained by the job's `tasks_per_node` tasks, which
`trainers.engine.parallel.start` joins into one process group from Slurm's (or submitit's local)
environment. (A Hydra plugin must live in the `hydra_plugins` namespace package: hence this
folder beside the project's packages.)

submitit runs the launcher's callable in every task, and Hydra's `run_job` then writes the job's
`.hydra/` files and opens its `train.log` in each of them. Here the tasks other than the job's
rank 0 run their job with `hydra.output_subdir=null` and Hydra's job logging off (their own
output stays in submitit's per-task logs), so that one process writes the run folder, as under
`torchrun` (`trainers.engine.launch.rank_overrides`). Preemption and requeue are submitit's, as
with the plain launchers: its USR2 handler requeues the job from rank 0 after the run has written
a checkpoint (`trainers.engine.loop.StopSignals`)."""
from __future__ import annotations

try:  # the `sweep` extra's plugin (a module, not its classes: Hydra registers the classes here)
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _submitit
except ImportError:  # without it, hydra/launcher=local and slurm are missing too
    _submitit = None

RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=none"]


def task_overrides(sweep_overrides: list[str], global_rank: int) -> list[str]:
    """A job's overrides for the task of `global_rank`: unchanged on rank 0."""
    return list(sweep_overrides) if global_rank == 0 else [*sweep_overrides, *RANK_OVERRIDES]


class _RankZeroWrites:
    """Runs the job in this task with the overrides of its rank (`task_overrides`)."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        import submitit

        rank = submitit.JobEnvironment().global_rank
        return super().__call__(task_overrides(sweep_overrides, rank), job_dir_key, job_num,
                                job_id, singleton_state)


if _submitit is not None:
    class SlurmDDPLauncher(_RankZeroWrites, _submitit.SlurmLauncher):
        """`hydra/launcher=slurm_ddp`: a Slurm job per run, `tasks_per_node` ranks each."""

    class LocalDDPLauncher(_RankZeroWrites, _submitit.LocalLauncher):
        """`hydra/launcher=local_ddp`: the same on this machine (submitit's local executor)."""
