"""Shared fixtures: Hydra composition of the real configs, the real CS224N data (via MINBERT_DATA,
or the shared folder beside the repo), and a small synthetic data set in the CS224N format so that
smoke runs are hermetic and fast."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
FORBID_SKIPS = os.environ.get("MINBERT_FORBID_SKIPS") == "1"  # set by .ci/run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MINBERT_FORBID_SKIPS=1 (CI), a skipped test fails: a skipped oracle checks nothing,
    and on CI every package and the data are there, so a skip can only mean something is missing."""
    outcome = yield
    report = outcome.get_result()
    if FORBID_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome, report.longrepr = "failed", f"skipped under MINBERT_FORBID_SKIPS=1: {reason}"


def cpu_family() -> str:
    """The CPU kernel family that stored float results are keyed by: torch's kernel level
    (`get_cpu_capability()`: AVX2, AVX512, ...), with "+AMX" on a CPU with AMX tiles. The same
    code rounds differently on each: an AMX Xeon and an AVX512 EPYC, both AVX512 to torch, gave 28
    of the 60 stored preset metrics differently (up to 9.7e-6)."""
    import torch

    from trainers.engine.precision import cpu_flags

    amx = bool({"amx_tile", "amx_bf16"} & (cpu_flags() or set()))
    return torch.backends.cpu.get_cpu_capability() + ("+AMX" if amx else "")


def real_data_root() -> Path | None:
    for candidate in (os.environ.get("MINBERT_DATA"), REPO.parent / "shared" / "data" / "cs224n"):
        if candidate and (Path(candidate) / "ids-sst-train.csv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("the CS224N data is not available: set MINBERT_DATA")
    return root


def compose_config(overrides: list[str] | None = None, hydra: bool = False):
    """Composes conf/config.yaml as `train.py` would, with command-line style overrides;
    `hydra=True` keeps the `hydra` node (launcher, sweeper and its params)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [], return_hydra_config=hydra)


def options(group: str) -> list[str]:
    """The choices of a config group: the YAML files in its folder."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def compose_cfg():
    return compose_config


WORDS = {0: "awful dreadful", 1: "dull weak", 2: "plain okay", 3: "good nice", 4: "superb great"}


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join([""] + header)]
    lines += ["\t".join([str(i)] + [str(c) for c in row]) for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")


def synthetic_row(task, rng: random.Random, i: int) -> tuple[list[str], float]:
    """One example of `task` by its kind, with a signal a model can learn: (texts, label)."""
    if task.kind == "single_classification":
        y = rng.randrange(task.num_labels)
        return [f"a {WORDS[y % 5]} movie number {i}"], y
    if task.kind == "pair_classification":
        y = rng.randrange(task.num_labels)
        second = [f"how do i learn topic {i}", f"where is city {i + 7}", f"why is sky {i}"][y % 3]
        return [f"how do i learn topic {i}", second], float(y)
    lo, hi = task.label_range
    y = round(rng.uniform(lo, hi), 1)
    high = y > (lo + hi) / 2
    if task.kind == "single_regression":
        return [f"{'great superb' if high else 'awful dull'} thing {i}"], y
    return ["a dog runs fast", "a dog runs" if high else "stocks fell today"], y


def write_synthetic_data(root: Path, n: int = 40, seed: int = 0,
                         tasks=("sst", "para", "sts", "cfimdb")) -> Path:
    """CS224N-format files for every split of `tasks` (their task files say which files and
    columns), rows by each task's kind, with learnable signal; a malformed row in para's train."""
    from tasks.registry import get_tasks

    root.mkdir(parents=True, exist_ok=True)
    for task in get_tasks(list(tasks)):
        rng = random.Random(f"{seed}-{task.name}")
        for split in ("train", "dev", "test"):
            labelled = split != "test"
            rows = []
            for i in range(n):
                texts, y = synthetic_row(task, rng, i)
                rows.append([f"{task.name[0]}{split}{i}", *texts] + ([y] if labelled else []))
            if split == "train" and task.name == "para":
                rows.append(["pbad", "a question with no partner", "", ""])  # malformed: skipped
            _write(task.path(root, split), ["id", *task.text_columns]
                   + [task.label_column] * labelled, rows)
    return root


@pytest.fixture
def synthetic_root(tmp_path) -> Path:
    return write_synthetic_data(tmp_path / "data")


def smoke_overrides(root: Path, *extra: str) -> list[str]:
    return ["model=tiny", "logger=none", "trainer.epochs=1", f"data.root={root}",
            "data.batch_size=16", "progress=false", *extra]


def trained_run(root: Path, out: Path, *overrides: str):
    """A finished smoke run in `out`, with its config saved where train.py's Hydra saves it.
    Returns (the composed config, its metrics.json)."""
    from trainers.engine.run import run

    cfg = compose_config(smoke_overrides(root, *overrides))
    run(cfg, out)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return cfg, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="session")
def shared_synthetic_root(tmp_path_factory) -> Path:
    """One synthetic data set for the tests that only read it (sweeps in subprocesses)."""
    return write_synthetic_data(tmp_path_factory.mktemp("data"))


def train_cli(*args: str, cwd=REPO, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def finished_runs(sweep_dir) -> list[dict]:
    """metrics.json of every run under a sweep dir, with the run's resolved config beside it."""
    runs = []
    for metrics in sorted(sweep_dir.glob("*/metrics.json")):
        cfg = OmegaConf.to_container(OmegaConf.load(metrics.parent / ".hydra" / "config.yaml"),
                                     resolve=True)
        runs.append({"metrics": json.loads(metrics.read_text()), "cfg": cfg})
    return runs


class RecordingLogger:
    """A logger that keeps everything a run logs: the tests read the order of training steps, the
    learning rate of each step, the summary and how the run finished."""

    def __init__(self):
        self.logged, self.summaries, self.ok, self.config = [], [], None, None

    def start(self, config, run_dir, run_id=None):
        self.config = config

    def log(self, metrics, step):
        self.logged.append(dict(metrics))

    def summary(self, metrics):
        self.summaries.append(metrics)

    def finish(self, ok=True):
        self.ok = ok

    @property
    def steps(self) -> list[str]:
        """The task of each training step, in order."""
        return [k.split("/")[0] for m in self.logged for k in m if k.endswith("/train/loss")]

    @property
    def lrs(self) -> list[float]:
        return [m["train/lr"] for m in self.logged if "train/lr" in m]


@pytest.fixture
def recorded_logger(monkeypatch) -> RecordingLogger:
    """The logger every `trainers.engine.run.run` in the test uses instead of the configured one
    (the one place that builds it: `trainers.engine.recipe.check_config`)."""
    from trainers.engine import recipe

    recorder, real = RecordingLogger(), recipe.build
    monkeypatch.setattr(recipe, "build", lambda node, key, **kw: recorder if key == "logger"
                        else real(node, key, **kw))
    return recorder
