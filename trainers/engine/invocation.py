"""What one invocation of `train.py` leaves behind, and nothing before its config is checked.

Hydra writes its `.hydra/` files and opens `train.log` in the run dir before the task function
runs; a command then refused (a bad value, or a run dir that holds another config's finished run)
would already have changed that folder. So Hydra is told to write neither (`hydra.output_subdir:
null`, console-only job logging: conf/config.yaml), and once the config has passed every check
`keep_invocation` writes them itself: Hydra's three files in `.hydra/` for the invocation that
starts a run and in `.hydra/resume-<time>/` for each one that continues it, and the log to the
run's `train.log`.

`CheckBeforeRun` is a Hydra callback that acts before Hydra makes any folder: a run dir that
cannot be made is refused, and a sweep's jobs (Hydra's basic sweeper: a grid) are every one
checked before the first starts.
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from common.durable import write_text
from common.errors import ConfigError, MinbertError

log = logging.getLogger(__name__)
LOG_FILE = "train.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job logging's
_MADE_HERE: set[str] = set()  # run dirs that did not exist before this invocation


def report(error: BaseException, prefix: str = "") -> None:
    """The error on standard error, one `error:` line per problem it lists."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"error: {prefix}{line}", file=sys.stderr)


def forget_if_empty(folder: str | Path) -> None:
    """Removes a run dir that Hydra made for this invocation, if nothing was written in it."""
    folder = Path(folder)
    if str(folder.absolute()) in _MADE_HERE and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def keep_invocation(hydra_cfg, cfg: DictConfig, run_dir: Path, resumed: bool,
                    main: bool = True) -> dict:
    """Writes this invocation's Hydra files (composed config, Hydra's config, the overrides) and
    opens the run's `train.log`; returns what run.json keeps of it: the group choices and the
    overrides."""
    choices = {str(k): str(v) for k, v in hydra_cfg.runtime.choices.items()
               if v is not None and not str(k).startswith("hydra/")}
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    if not main:
        return {"choices": choices, "overrides": overrides}
    folder = run_dir / ".hydra"
    if resumed and (folder / "config.yaml").is_file():
        folder = folder / f"resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)))
    open_log(run_dir)
    return {"choices": choices, "overrides": overrides}


def hold_log() -> None:
    """Keeps what is logged from now on in memory until `open_log` writes it to the run's
    train.log (the checks' and the data's lines too), or a refusal drops it with the rest."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _Held)]:
        root.removeHandler(handler)
    root.addHandler(_Held())


class _Held(logging.handlers.MemoryHandler):
    def __init__(self):
        super().__init__(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)

    def shouldFlush(self, record) -> bool:
        return False  # only open_log empties it, into the file


def open_log(run_dir: Path) -> None:
    """The root logger also writes to `<run_dir>/train.log` (appending: a resumed run's log goes
    on), starting with what `hold_log` kept."""
    path = str((run_dir / LOG_FILE).absolute())
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "baseFilename", None) == path), None)
    if handler is None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    for held in [h for h in root.handlers if isinstance(h, _Held)]:
        for record in held.buffer:
            if record.levelno >= handler.level:
                handler.handle(record)
        held.buffer.clear()
        root.removeHandler(held)


def run_dir_problem(path: str | Path) -> str | None:
    """Why a run dir cannot be made (None: it can): a file where a folder should be."""
    path = Path(path).absolute()
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder"
    return None


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will launch them (None for another sweeper,
    which chooses its jobs as it goes: each job is then checked as it starts)."""
    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_jobs(config: DictConfig) -> list[str]:
    """Every job of a grid sweep composed and checked: one line per problem, naming the job."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from trainers.engine.recipe import check_config

    jobs, problems = sweep_jobs(config), []
    loader = GlobalHydra.instance().config_loader()
    for number, overrides in enumerate(jobs or []):
        try:
            job = loader.load_sweep_config(config, overrides)
            HydraConfig.instance().set_config(job)  # as the job will see it: its search path
            with open_dict(job):
                del job["hydra"]
            check_config(job, overrides)
        except MinbertError as e:
            problems += [f"job {number} ({' '.join(overrides)}): {line}"
                         for line in str(e).splitlines()]
        except Exception as e:  # Hydra's own composition errors
            problems.append(f"job {number} ({' '.join(overrides)}): {str(e).splitlines()[0]}")
    return problems


class CheckBeforeRun(Callback):
    """Refuses, before Hydra makes a folder, a run dir that cannot be made and a sweep with a bad
    job (`report`ed, exit status 1)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(str(config.hydra.run.dir)).absolute()
        existed = path.exists()
        problem = run_dir_problem(path) or make(path)
        if problem:
            report(ConfigError(f"hydra.run.dir={path}: cannot make the run dir there ({problem});"
                               " choose another folder"))
            sys.exit(1)
        if not existed:
            _MADE_HERE.add(str(path))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir)).absolute()
        problem = run_dir_problem(sweep)
        problems = [f"hydra.sweep.dir={sweep}: cannot make the sweep dir there ({problem}); "
                    "choose another folder"] if problem else check_jobs(config)
        if not problems and make(sweep):
            problems = [f"hydra.sweep.dir={sweep}: cannot make the sweep dir there "
                        f"({make(sweep)}); choose another folder"]
        if problems:
            for line in problems:
                print(f"error: {line}", file=sys.stderr)
            print(f"error: the sweep was not started ({len(problems)} problem(s)); no job ran",
                  file=sys.stderr)
            sys.exit(1)


def make(folder: Path) -> str | None:
    """Makes `folder` (and its parents); why it cannot be made, or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{e.strerror or type(e).__name__}: {e.filename or folder}"
    return None
