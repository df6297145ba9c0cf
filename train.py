"""Train and evaluate multi-task minBERT from a Hydra config.

    python train.py                                   # the default run (conf/config.yaml)
    python train.py peft=none order=sts-sst-para heads=joint trainer.epochs=3
    python train.py -m order=sst-para-sts,para-sts-sst trainer.epochs=1 data.limit_train=64
    python train.py debug=smoke                       # seconds-long end-to-end check

Each run writes metrics.json, history.jsonl, adapter.safetensors and predictions/ to its run dir.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minbert.errors import MinbertError
from trainers.run import run

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except MinbertError as e:  # bad input: one clear message, no traceback
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
