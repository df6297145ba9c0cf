"""The CS224N multi-task benchmark: SST-5, Quora paraphrase and STS-B, with their readers, heads
and aggregators. `TASKS` maps a task's config name to its definition."""
from minbert.errors import ConfigError
from tasks.base import Task
from tasks.para import TASK as PARA
from tasks.sst import TASK as SST
from tasks.sts import TASK as STS

TASKS: dict[str, Task] = {t.name: t for t in (SST, PARA, STS)}


def get_tasks(names) -> list[Task]:
    """Looks tasks up by name; an unknown name lists the valid ones."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; valid tasks are {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"task order {list(names)} names a task twice")
    return [TASKS[n] for n in names]
