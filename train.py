"""Train and evaluate multi-task minBERT from a Hydra config.

    python train.py                                   # the default run (conf/config.yaml)
    python train.py peft=none order=sts-sst-para heads=joint trainer.epochs=3
    python train.py -m order=sst-para-sts,para-sts-sst trainer.epochs=1 data.limit_train=64
    python train.py debug=smoke                       # seconds-long end-to-end check
    python train.py -m experiment=table2 scale=cpu    # a report table's grid (make_tables.py)

Each run writes run.json (its tasks), history.jsonl, predictions/ and, last, metrics.json to its
run dir, with its best weights: adapter.safetensors for the one-model strategies (sequential,
single, interleaved), experts/ (and merged.safetensors) for eoe, fedavg and orthoada.
In a multirun a failed job writes error.txt instead, the other jobs go on, and the command exits
non-zero once all are done, listing the failures.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from minbert.errors import MinbertError
from trainers.run import run
from trainers.sweeps import FAILED_RUNS, label_run, record_failure

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Runs one job; returns dev/overall, the objective of sweeps (-inf for a failed job)."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    label_run(cfg, dict(hydra_cfg.runtime.choices), hydra_cfg.sweep.dir if multirun else None,
              hydra_cfg.job.override_dirname)
    try:
        return run(cfg, hydra_cfg.runtime.output_dir)
    except Exception as e:
        if multirun:  # one failed job must not stop (or lose) the others
            direction = hydra_cfg.sweeper.get("direction", "maximize")
            return record_failure(hydra_cfg.runtime.output_dir, e, str(direction))
        if not isinstance(e, MinbertError):
            raise  # a bug: keep its traceback
        log.error("%s", e)  # bad input: one clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
    if FAILED_RUNS:
        print(f"error: {len(FAILED_RUNS)} run(s) of the multirun failed; each run dir has an "
              f"error.txt: " + ", ".join(str(d) for d, _ in FAILED_RUNS), file=sys.stderr)
        sys.exit(1)
