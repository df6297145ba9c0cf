"""Tasks as config files: the report presets give the metrics they gave before tasks were files
(stored numbers), a task the project has never seen trains end to end through the real train.py
for each kind, and every kind of bad task file or data gives its one-line, named error."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO

STORED = json.loads((REPO / "tests" / "stored" / "preset_metrics.json").read_text())


@pytest.mark.slow
def test_report_presets_give_their_stored_metrics(data_root, tmp_path):
    """18 preset jobs at scale=smoke on the real data, against the numbers the code before task
    files gave (tests/stored/preset_metrics.py made them). Pearson and the overall score may
    differ by float rounding (scipy's formula against numpy's), nothing more."""
    from stored.preset_metrics import JOBS, job_name, run_job

    for i, (experiment, choices) in enumerate(JOBS):
        name = job_name(experiment, choices)
        got = run_job(experiment, choices, tmp_path / str(i))
        want = STORED[name]
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-15), (name, key)


# ---- a task the project has never seen, one per kind, each read from another format ------------

WORDS = ["awful", "dull", "fine", "good", "superb"]


def _rows(kind: str, n: int = 40) -> list[dict]:
    """Rows with a learnable signal, in the columns `_task_file` names."""
    rows = []
    for i in range(n):
        y = i % 3
        if kind == "single_classification":
            rows.append({"id": f"c{i}", "review": f"a {WORDS[y]} film {i}", "stars": y})
        elif kind == "pair_classification":  # GLUE-shaped NLI: 0 entail, 1 neutral, 2 contradict
            hyp = ["a man sleeps", "a man is tired", "a woman runs"][y]
            rows.append({"premise": f"a man sleeps at home {i}", "hypothesis": hyp, "label": y})
        elif kind == "single_regression":
            rows.append({"id": f"r{i}", "text": f"{WORDS[i % 5]} stuff {i}", "score": (i % 5) / 2})
        else:
            rows.append({"id": f"p{i}", "a": "a dog runs", "b": ["a dog runs", "stocks fell"][i % 2],
                         "sim": round(0.1 * i, 1) % 4})
    return rows


SPECS = {  # kind -> (format, file suffix, task-file lines)
    "single_classification": ("csv", "csv", "num_labels: 3\ncolumns: {text: [review], label: "
                              "stars}\nmetric: macro_f1\nmetrics: [accuracy, mcc]"),
    "pair_classification": ("json", "jsonl", "num_labels: 3\ncolumns: {text: [premise, "
                            "hypothesis], label: label}\nmetric: accuracy\nmetrics: [macro_f1]"),
    "single_regression": ("tsv", "tsv", "label_range: [0, 2]\ncolumns: {text: [text], label: "
                          "score}\nmetric: spearman\nmetrics: [pearson]"),
    "pair_regression": ("parquet", "parquet", "label_range: [0, 4]\ncolumns: {text: [a, b], "
                        "label: sim}\nmetric: pearson\nmetrics: [spearman]"),
}


def _write_data(path, fmt: str, rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if fmt == "json":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)


def new_task(conf, data, kind: str, name: str = "mytask", **lines: str):
    """Writes `<conf>/task/<name>.yaml` and its train/dev data; returns the task file."""
    fmt, suffix, spec = SPECS[kind]
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", 40), ("dev", 12)):
        files[split] = data / f"{name}-{split}.{suffix}"
        _write_data(files[split], fmt, _rows(kind, n))
    (conf / "task").mkdir(parents=True, exist_ok=True)
    text = (f"name: {name}\nkind: {kind}\n{spec}\nsource:\n  format: {fmt}\n  data_files: "
            f"{{train: {files['train']}, dev: {files['dev']}}}\n")
    for key, value in lines.items():
        text = "\n".join(l for l in text.splitlines() if not l.startswith(f"{key}:")) + \
            f"\n{key}: {value}\n"
    path = conf / "task" / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_new_task_trains_end_to_end_through_train_py(kind, tmp_path, shared_synthetic_root):
    """The task file and its data in a config folder of the user's own, nothing else: trained
    alone and after the three report tasks, through the real train.py (a multirun of both)."""
    from conftest import finished_runs, train_cli

    new_task(tmp_path / "conf", tmp_path / "data", kind)
    sweep = tmp_path / "sweep"
    train_cli("-m", "--config-dir", str(tmp_path / "conf"), "tasks=[mytask],[sst,para,sts,mytask]",
              "debug=smoke", f"data.root={shared_synthetic_root}", "progress=false",
              f"hydra.sweep.dir={sweep}", "heads=separate" if kind == "pair_regression" else "heads=joint")
    runs = finished_runs(sweep)
    assert sorted(len(r["cfg"]["tasks"]) for r in runs) == [1, 4]
    metric, extra = SPECS[kind][2].split("metric: ")[1].split("\n")[0], \
        SPECS[kind][2].split("metrics: [")[1].rstrip("]").split(", ")
    for r in runs:
        keys = {f"mytask/dev/{'acc' if m == 'accuracy' else m}" for m in [metric, *extra]}
        assert keys <= set(r["metrics"]) and all(math.isfinite(r["metrics"][k]) for k in keys)
        if len(r["cfg"]["tasks"]) == 4:
            assert {"sst/dev/acc", "para/dev/acc", "sts/dev/pearson"} <= set(r["metrics"])
    run_dir = next(p.parent for p in sweep.glob("*/metrics.json"))
    record = json.loads((run_dir / "run.json").read_text())
    assert [t["name"] for t in record["tasks"]][-1] == "mytask"
    lines = (run_dir / "predictions" / "mytask-dev-output.csv").read_text().splitlines()[1:]
    values = [l.split(" , ")[1].strip() for l in lines]
    if kind.endswith("regression"):  # a score keeps its decimals
        assert all(len(v.split(".")[1]) == 6 for v in values)
    else:
        assert all(v.isdigit() and int(v) < 3 for v in values)


def test_cfimdb_ships_as_a_task_file(data_root):
    from tasks.data import load_task_data
    from tasks.registry import get_tasks

    (task,) = get_tasks(["cfimdb"])
    assert (task.kind, task.num_labels, task.metrics) == ("single_classification", 2,
                                                          ("accuracy", "f1"))
    data = load_task_data([task], data_root, limit_eval=50)
    assert len(data["cfimdb"]["train"]) == 1707 and set(data["cfimdb"]) == {"train", "dev", "test"}
    assert sorted(set(data["cfimdb"]["dev"].labels)) == [0.0, 1.0]


def test_order_and_tasks_together_are_refused(tmp_path):
    from conftest import train_cli

    r = train_cli("order=sts-sst-para", "tasks=[sst,para]", "debug=smoke",
                  f"hydra.run.dir={tmp_path}", check=False)
    assert r.returncode == 1
    assert "`order=sts-sst-para` and `tasks=[sst,para]` both choose the tasks" in r.stderr
