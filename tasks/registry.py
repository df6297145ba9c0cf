"""Tasks from their config files: `conf/task/<name>.yaml`, found on the run's Hydra search path
(so a task in a user's own config folder, `--config-dir` or `hydra.searchpath`, is found like the
shipped ones), checked key by key, and turned into a `tasks.base.Task`. A finished run keeps its
tasks' resolved configs in `run.json`; `task_from_config` rebuilds them from there."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from common.errors import ConfigError
from tasks import metrics as M
from tasks.base import FORMATS, KINDS, SPLITS, Task

CONF = Path(__file__).resolve().parents[1] / "conf"
KEYS = ("name", "kind", "num_labels", "columns", "metric", "metrics", "source", "label_range",
        "label_names", "prediction_column", "head")
COLUMN_KEYS = ("text", "label", "id")
SOURCE_KEYS = ("format", "data_files", "path", "name", "splits")


def search_path() -> list[Path]:
    """The `task/` folders to look in: those on the running Hydra app's search path (file and
    package sources), else this repository's `conf/task`."""
    from hydra.core.hydra_config import HydraConfig

    folders = []
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.schema == "file":
                folders.append(Path(source.path) / "task")
            elif source.schema == "pkg":
                try:
                    folders.append(Path(str(resources.files(source.path) / "task")))
                except (ModuleNotFoundError, TypeError):
                    continue
    return [f for f in dict.fromkeys(folders + [CONF / "task"]) if f.is_dir()]


def available(folders: list[Path] | None = None) -> list[str]:
    folders = search_path() if folders is None else folders
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})


def task_file(name: str, folders: list[Path] | None = None) -> Path:
    folders = search_path() if folders is None else folders
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ConfigError(f"tasks: no task {name!r}: there is no task/{name}.yaml in "
                      f"{[str(f) for f in folders]}; the tasks there are {available(folders)}. "
                      "Add conf/task/<name>.yaml (README: Adding a task)")


def get_tasks(names, folders: list[Path] | None = None) -> list[Task]:
    """The tasks of `names` (in that order), each read from its config file."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"tasks={names!r} must be a list of task names, e.g. tasks=[sst,para]")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks={list(names)} names a task twice")
    tasks = [load_task(task_file(n, folders)) for n in names]
    return check_unique(tasks)


def check_unique(tasks: list[Task]) -> list[Task]:
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:
            raise ConfigError(f"{t.file}: name: {t.name!r} is also the name of the task in "
                              f"{seen[t.name]}; give each task its own name")
        seen[t.name] = t.file
    return tasks


def load_task(path: Path) -> Task:
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # a YAML syntax error
        reason = " ".join(str(e).split())  # one line
        raise ConfigError(f"{path}: not a readable YAML file ({reason})") from e
    return task_from_config(node, str(path))


def task_from_config(node, file: str) -> Task:
    """A `Task` from a task config (a file's contents, or run.json's copy), every key checked."""
    cfg = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) \
        else dict(node)

    def fail(key: str, what: str):
        raise ConfigError(f"{file}: {key}: {what}")

    if not isinstance(cfg, dict):
        fail("(top)", "a task file is a mapping of name, kind, columns, metric, source")
    _no_unknown(cfg, KEYS, "", fail)
    for required in ("name", "kind", "columns", "metric", "source"):
        if required not in cfg:
            fail(required, "missing; a task file needs name, kind, columns, metric and source")
    kind = cfg["kind"]
    if kind not in KINDS:
        fail("kind", f"{kind!r} is not one of {list(KINDS)}")
    text, label, id_column = _columns(cfg["columns"], kind, fail)
    num_labels, label_range = _labels(cfg, kind, fail)
    metric, extra = _metrics(cfg, kind, num_labels, fail)
    names = cfg.get("label_names")
    if names is not None and (kind.endswith("_regression") or len(names) != num_labels):
        fail("label_names", f"{names} must name the {num_labels} classes of a classification task")
    head = cfg.get("head") or {}
    if not isinstance(head, dict):
        fail("head", f"{head!r} must be a mapping of head settings, e.g. {{aggregator: cosine}}")
    return Task(name=str(cfg["name"]), kind=kind, text_columns=text, label_column=label,
                metric=metric, extra_metrics=extra, num_labels=num_labels,
                label_range=label_range, id_column=id_column,
                label_names=tuple(names) if names else None,
                prediction_column=cfg.get("prediction_column") or f"Predicted_{cfg['name']}",
                source=_source(cfg["source"], fail), head=head, file=file)


def to_config(task: Task) -> dict:
    """The task's config as its file has it, resolved: what run.json keeps."""
    columns = {"text": list(task.text_columns), "label": task.label_column}
    columns.update({"id": task.id_column} if task.id_column else {})
    out = {"name": task.name, "kind": task.kind, "columns": columns, "metric": task.metric,
           "metrics": list(task.extra_metrics), "source": dict(task.source),
           "prediction_column": task.prediction_column, "head": dict(task.head)}
    if task.is_regression:
        out["label_range"] = list(task.label_range)
    else:
        out["num_labels"] = task.num_labels
    if task.label_names:
        out["label_names"] = list(task.label_names)
    return out


def _no_unknown(cfg: dict, allowed, prefix: str, fail) -> None:
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        fail(f"{prefix}{unknown[0]}", f"unknown key; the keys a task file may have here are "
                                      f"{list(allowed)}")


def _columns(columns, kind: str, fail):
    if not isinstance(columns, dict) or "text" not in columns or "label" not in columns:
        fail("columns", f"{columns!r} must be {{text: [...], label: <column>}}")
    _no_unknown(columns, COLUMN_KEYS, "columns.", fail)
    text = columns["text"]
    text = (text,) if isinstance(text, str) else tuple(text)
    want = 2 if kind.startswith("pair_") else 1
    if len(text) != want:
        fail("columns.text", f"{list(text)} has {len(text)} column(s); a {kind} task reads "
                             f"{'two text columns (the pair)' if want == 2 else 'one'}")
    return tuple(map(str, text)), str(columns["label"]), columns.get("id")


def _labels(cfg: dict, kind: str, fail):
    if kind.endswith("_classification"):
        n = cfg.get("num_labels")
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            fail("num_labels", f"{n!r}: a classification task needs num_labels, an integer >= 2")
        if "label_range" in cfg:
            fail("label_range", "is for regression; a classification task's labels are "
                                "0 .. num_labels-1")
        return n, (0.0, float(n - 1))
    if "num_labels" in cfg:
        fail("num_labels", "is for classification; a regression task gives label_range")
    r = cfg.get("label_range")
    if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
            and r[0] < r[1]):
        fail("label_range", f"{r!r}: a regression task needs label_range: [low, high]")
    return None, (float(r[0]), float(r[1]))


def _metrics(cfg: dict, kind: str, num_labels, fail):
    allowed = M.REGRESSION if kind.endswith("_regression") else M.CLASSIFICATION
    extra = cfg.get("metrics") or []
    if isinstance(extra, str) or not isinstance(extra, list):
        fail("metrics", f"{extra!r} must be a list, e.g. metrics: [accuracy, f1]")
    for key, metric in [("metric", cfg["metric"])] + [("metrics", m) for m in extra]:
        if metric not in M.METRICS:
            fail(key, f"{metric!r} is not one of {list(M.METRICS)}")
        if metric not in allowed:
            fail(key, f"{metric!r} does not score a {kind} task; use one of {list(allowed)}")
        if metric == "f1" and num_labels != 2:
            fail(key, f"f1 is binary F1; a {num_labels}-class task uses macro_f1")
    return cfg["metric"], tuple(extra)


def _source(source, fail) -> dict:
    if not isinstance(source, dict):
        fail("source", f"{source!r} must be a mapping with format and data_files (or path)")
    _no_unknown(source, SOURCE_KEYS, "source.", fail)
    fmt = source.get("format")
    if fmt not in FORMATS:
        fail("source.format", f"{fmt!r} is not one of {list(FORMATS)}")
    if fmt == "hub":
        if not source.get("path"):
            fail("source.path", "a hub source names its data set: path: glue, name: mnli")
        splits = source.setdefault("splits", {"train": "train", "dev": "validation"})
        if not isinstance(splits, dict) or "train" not in splits or "dev" not in splits:
            fail("source.splits", f"{splits!r} must map train and dev (and test) to the data "
                                  "set's split names, e.g. {train: train, dev: validation}")
        return dict(source)
    files = source.get("data_files")
    if not isinstance(files, dict):
        fail("source.data_files", f"{files!r} must map splits to files: {{train: ..., dev: ...}}")
    for split in files:
        if split not in SPLITS:
            fail(f"source.data_files.{split}", f"unknown split; the splits are {list(SPLITS)}")
    for split in ("train", "dev"):
        if split not in files:
            fail(f"source.data_files.{split}", f"missing: every task needs a {split} split")
    return dict(source)
