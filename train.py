"""Train and evaluate multi-task minBERT from a Hydra config.

    python train.py                                   # the default run (conf/config.yaml)
    python train.py peft=none order=sts-sst-para heads=joint trainer.epochs=3
    python train.py -m order=sst-para-sts,para-sts-sst trainer.epochs=1 data.limit_train=64
    python train.py debug=smoke                       # seconds-long end-to-end check
    python train.py -m experiment=table2 scale=cpu    # a report table's grid (make_tables.py)
    python train.py debug=fast resume=outputs/runs/2026-12-02/10-00-00   # continue a killed run
    torchrun --standalone --nproc_per_node=2 train.py peft=lora   # one run, data-parallel (DDP)

The config is checked whole before anything is built or written (`trainers.engine.recipe`): a bad
key, value or combination stops the command with one `error:` line per problem, and a refused
command changes no file (a sweep's jobs are all checked before the first starts). Each run writes
run.json (its tasks and config, the one record tables read), history.jsonl, predictions/ and, last,
metrics.json to its run dir, with its best weights: adapter.safetensors for the one-model
strategies (sequential, single, interleaved), experts/ (and merged.safetensors) for eoe, fedavg
and orthoada; Hydra's own files of each invocation that trains it go to .hydra/ (the first) and
.hydra/resume-<time>/ (each later one), and its log to train.log.
In a multirun a failed job writes error.txt instead, the other jobs go on, and the command exits
non-zero once all are done, listing the failures; a stop signal (SIGTERM, a cluster's preemption)
stops the whole sweep after a checkpoint. A run checkpoints as it goes: `resume=<run dir>`
continues one, and a multirun started again with the same hydra.sweep.dir skips the finished jobs
and continues the unfinished ones.
"""
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError, MinbertError
from trainers.engine.invocation import forget_if_empty, hold_log, keep_invocation, report
from trainers.engine.launch import agree_run_dir, check_launcher, rank_overrides
from trainers.engine.loop import Preempted
from trainers.engine.parallel import start as start_processes
from trainers.engine.recipe import check_config
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
    hold_log()  # train.log opens once everything has passed; what is logged until then waits
    try:
        check_launcher(hydra_cfg.launcher.get("_target_") if multirun else None)
        label_run(cfg, dict(hydra_cfg.runtime.choices),
                  hydra_cfg.sweep.dir if multirun else None, hydra_cfg.job.override_dirname)
        checked = check_config(cfg, list(hydra_cfg.overrides.task))
        parallel, device = start_processes(checked.device)
        output_dir = agree_run_dir(output_dir, parallel)
        target = Path(run_dir(cfg, multirun, output_dir))
    except MinbertError as e:
        forget_if_empty(output_dir)
        if multirun:
            return record_failure(output_dir, e)
        report(e)
        sys.exit(1)
    if Path(output_dir) != target:  # resume=: this invocation's files go to the resumed run
        forget_if_empty(output_dir)

    def invocation(resumed: bool) -> dict:  # once everything is checked, read and built
        return keep_invocation(hydra_cfg, cfg, target, resumed, parallel.main)

    try:
        return objective(run(checked, target, parallel, device, invocation), hydra_cfg, multirun)
    except Preempted as e:  # the process was asked to stop: a sweep stops too, not only its job
        log.error("%s", e)
        print(f"error: {e}" + ("\nthe sweep stops here: run the same command again (the same "
                               "hydra.sweep.dir) to continue it; finished jobs are skipped"
                               if multirun else ""), file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        forget_if_empty(output_dir)
        if multirun:  # one failed job must not stop (or lose) the others
            return record_failure(target, e, sweep_direction(hydra_cfg))
        if not isinstance(e, MinbertError):
            raise  # a bug: keep its traceback
        log.error("%s", e)  # bad input: one clear message, no traceback
        report(e)
        sys.exit(1)


def objective(score: float, hydra_cfg, multirun: bool) -> float:
    """dev/overall for the sweeper; an undefined one (NaN: a metric with no value, logged) is the
    worst value for the sweep's direction, since Optuna stops a whole search on a NaN."""
    if score == score or not multirun:
        return score
    return float("inf") if sweep_direction(hydra_cfg) == "minimize" else float("-inf")


def sweep_direction(hydra_cfg) -> str:
    """Which way the sweep's objective, dev/overall, improves: an Optuna sweeper's `direction`;
    the other sweepers have none, and dev/overall is maximised."""
    return str(hydra_cfg.sweeper.get("direction") or "maximize")


def run_dir(cfg: DictConfig, multirun: bool, output_dir: str) -> str:
    """Hydra's output dir, or the run dir that `resume=` names."""
    if not cfg.get("resume"):
        return output_dir
    if multirun:
        raise ConfigError("resume= continues one run; to continue a multirun, run it again with "
                          "the same hydra.sweep.dir (finished jobs are skipped)")
    if not (Path(cfg.resume) / RUN_FILE).is_file():
        raise ConfigError(f"resume={cfg.resume}: no run there (no {RUN_FILE}); pass the folder of "
                          "a run made by train.py")
    log.info("resuming %s", cfg.resume)
    return cfg.resume


def hydra_error(e: Exception) -> str:
    """Hydra's own refusal (a bad override, a missing config choice) as one line."""
    cause = e.__cause__
    text = " ".join(str(e).split())
    if cause is not None and str(cause).split("\n")[0] not in str(e):
        text += f" ({str(cause).splitlines()[0]})"
    return text


if __name__ == "__main__":
    sys.argv[1:] = rank_overrides(sys.argv[1:])  # torchrun: Hydra's files from rank 0 alone
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us, to print as below
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {hydra_error(e)}", file=sys.stderr)
        sys.exit(1)
    if FAILED_RUNS:
        print(f"error: {len(FAILED_RUNS)} run(s) of the multirun failed; each run dir has an "
              f"error.txt: " + ", ".join(str(d) for d, _ in FAILED_RUNS), file=sys.stderr)
        sys.exit(1)
