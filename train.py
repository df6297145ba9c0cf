"""Train and evaluate multi-task minBERT from a Hydra config.

    python train.py                                   # the default run (conf/config.yaml)
    python train.py peft=none order=sts-sst-para heads=joint trainer.epochs=3
    python train.py -m order=sst-para-sts,para-sts-sst trainer.epochs=1 data.limit_train=64
    python train.py debug=smoke                       # seconds-long end-to-end check
    python train.py -m experiment=table2 scale=cpu    # a report table's grid (make_tables.py)
    python train.py debug=fast resume=outputs/runs/2026-12-02/10-00-00   # continue a killed run
    torchrun --standalone --nproc_per_node=2 train.py peft=lora   # one run, data-parallel (DDP)

Each run writes run.json (its tasks), history.jsonl, predictions/ and, last, metrics.json to its
run dir, with its best weights: adapter.safetensors for the one-model strategies (sequential,
single, interleaved), experts/ (and merged.safetensors) for eoe, fedavg and orthoada.
In a multirun a failed job writes error.txt instead, the other jobs go on, and the command exits
non-zero once all are done, listing the failures; a stop signal (SIGTERM, a cluster's preemption)
stops the whole sweep after a checkpoint. A run checkpoints as it goes: `resume=<run dir>`
continues one, and a multirun started again with the same hydra.sweep.dir skips the finished jobs
and continues the unfinished ones.
"""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from common.errors import ConfigError, MinbertError
from trainers.engine.build import resolve_device
from trainers.engine.launch import agree_run_dir, check_launcher, rank_overrides
from trainers.engine.loop import Preempted
from trainers.engine.parallel import start as start_processes
from trainers.engine.record import RUN_FILE
from trainers.engine.run import run
from trainers.engine.sweeps import FAILED_RUNS, label_run, record_failure

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job; returns dev/overall, the objective of sweeps (-inf for a failed job)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    output_dir = hydra_cfg.runtime.output_dir
    try:
        check_task_keys(list(hydra_cfg.overrides.task))
        check_launcher(hydra_cfg.launcher.get("_target_") if multirun else None)
        output_dir = agree_run_dir(output_dir, start_processes(resolve_device(cfg.device))[0])
    except ConfigError as e:
        if multirun:
            return record_failure(output_dir, e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    label_run(cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.sweep.dir if multirun else None,
              hydra_cfg.job.override_dirname)
    try:
        return run(cfg, run_dir(cfg, multirun, output_dir))
    except Preempted as e:  # the process was asked to stop: a sweep stops too, not only its job
        log.error("%s", e)
        print(f"error: {e}" + ("\nthe sweep stops here: run the same command again (the same "
                               "hydra.sweep.dir) to continue it; finished jobs are skipped"
                               if multirun else ""), file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if multirun:  # one failed job must not stop (or lose) the others
            direction = hydra_cfg.sweeper.get("direction", "maximize")
            return record_failure(output_dir, e, str(direction))
        if not isinstance(e, MinbertError):
            raise  # a bug: keep its traceback
        log.error("%s", e)  # bad input: one clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def check_task_keys(overrides: list[str]) -> None:
    """`order=` is a preset of `tasks=`, and `trainer.task=` (trainer=single) trains one task
    whatever `tasks` says: given together on the command line, one would silently replace the
    other, so they are refused."""
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides if "=" in o}
    for a, b in (("order", "tasks"), ("trainer.task", "tasks")):
        if a in given and b in given:
            raise ConfigError(f"`{given[a]}` and `{given[b]}` both choose the tasks of the run; "
                              f"give one of them" + (" (order=x-y-z is tasks=[x,y,z])"
                                                     if a == "order" else ""))


def run_dir(cfg: DictConfig, multirun: bool, output_dir: str) -> str:
    """Hydra's output dir, or the run dir that `resume=` names (its own Hydra files then go to the
    new output dir, a record of this invocation)."""
    if not cfg.get("resume"):
        return output_dir
    if multirun:
        raise ConfigError("resume= continues one run; to continue a multirun, run it again with "
                          "the same hydra.sweep.dir (finished jobs are skipped)")
    if not (Path(cfg.resume) / RUN_FILE).is_file():
        raise ConfigError(f"resume={cfg.resume}: no run there (no {RUN_FILE}); pass the folder of "
                          "a run made by train.py")
    log.info("resuming %s (this invocation's Hydra files: %s)", cfg.resume, output_dir)
    return cfg.resume


if __name__ == "__main__":
    sys.argv[1:] = rank_overrides(sys.argv[1:])  # torchrun: Hydra's files from rank 0 alone
    main()
    if FAILED_RUNS:
        print(f"error: {len(FAILED_RUNS)} run(s) of the multirun failed; each run dir has an "
              f"error.txt: " + ", ".join(str(d) for d, _ in FAILED_RUNS), file=sys.stderr)
        sys.exit(1)
