"""Stores the dev metrics the report presets give at scale=smoke on the CS224N data, so that a change
to how tasks are defined, read, tokenized or scored can be checked to give the same numbers
(tests/test_task_configs.py::test_report_presets_give_their_stored_metrics).

    MINBERT_DATA=../shared/data/cs224n python tests/stored/preset_metrics.py   # rewrites the JSON
    python tests/stored/preset_metrics.py --print    # prints them as JSON (the test's check)

Run it only when a change is meant to alter these numbers, and say why in the commit. The numbers
are stored per CPU kernel family (`conftest.cpu_family()`: AVX512, AVX512+AMX, AVX2, ...):
the same code rounds differently on each, and training amplifies it (2.1e-5 in one Pearson between
AVX512 and AVX2); writing stores this machine's family beside the others."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo
sys.path.insert(0, str(HERE.parent / "tests"))  # conftest
STORE = HERE / "preset_metrics.json"
# (experiment, the sweep's choices for one job): a job of every preset, every strategy of Table 3,
# every head design of Figure 2, both methods of Table 2 on every task.
JOBS = [("table1", [])]
JOBS += [("table3", [f"table3={row}"]) for row in
         ("seq-sst-para-sts", "seq-sts-sst-para", "eoe", "fedavg", "orthoada")]
JOBS += [("figure2", [f"heads={h}", f"order={o}"]) for h in ("concat", "separate", "joint")
         for o in ("sst-para-sts", "para-sts-sst")]
JOBS += [("table2", [f"table2={r}", f"trainer.task={t}"]) for r in ("lora-qkv-r4", "dora-qkv-r64")
         for t in ("sst", "para", "sts")]


def job_name(experiment: str, choices: list[str]) -> str:
    return " ".join([f"experiment={experiment}", *choices])


def run_job(experiment: str, choices: list[str], out: Path) -> dict:
    """The dev metrics of one preset job at scale=smoke, run in-process in `out`."""
    from conftest import compose_config
    from trainers.engine.run import run

    cfg = compose_config([f"experiment={experiment}", "scale=smoke", *choices])
    run(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if "/dev/" in k or k == "dev/overall"}


def all_jobs() -> dict:
    """Every job's dev metrics, run one after another in this process (as they were stored:
    float sums on a CPU can differ in their last bits with the process's allocation history,
    which training then amplifies, so a check reruns the same jobs in the same order afresh)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (experiment, choices) in enumerate(JOBS):
            out[job_name(experiment, choices)] = run_job(experiment, choices, Path(tmp) / str(i))
            print(job_name(experiment, choices), out[job_name(experiment, choices)],
                  file=sys.stderr, flush=True)
    return out


def main() -> None:
    metrics = all_jobs()
    if "--print" in sys.argv:  # the check: the metrics as JSON on stdout, nothing stored
        print(json.dumps(metrics))
    else:
        stored = json.loads(STORE.read_text()) if STORE.is_file() else {}
        from conftest import cpu_family

        stored[cpu_family()] = metrics
        STORE.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")


if __name__ == "__main__":
    main()
