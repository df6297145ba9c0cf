"""scripts/make_tables.py on a synthetic sweep: run dirs whose `.hydra/config.yaml` is a real
composed config (experiment=table1/2/3 and ad-hoc runs; one as runs made before tasks were config
files saved it, with `order.tasks`) and whose metrics.json has known values. Checks the printed
Markdown to the digit, the md/csv/tex files, Figure 2's PNG, the gaps and notes for missing,
failed and unfinished runs, the errors for an empty folder, and the generic `tasks` table for
runs on other tasks (a fourth task, cfimdb; a 3-class pair task scored by macro-F1)."""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_tables.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli() -> ModuleType:
    return _load_script()


def write_run(path: Path, cfg: DictConfig, seed: int, metrics: dict | None = None,
              error: str | None = None, tasks: list | None = None) -> Path:
    """A run dir; `tasks`: run.json's task list (task configs, or an older run's names)."""
    cfg = copy.deepcopy(cfg)
    cfg.seed = seed
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (path / "error.txt").write_text(error)
    if tasks is not None:
        (path / "run.json").write_text(json.dumps({"tasks": tasks, "config": {}}))
    return path


def old_style(cfg: DictConfig) -> DictConfig:
    """The config as runs made before tasks were config files saved it: the task order in
    `order.tasks` (the order group's), no top-level `tasks`."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain["order"] = {"tasks": plain.pop("tasks")}
    return OmegaConf.create(plain)


def single(task: str, score: float, pct: float) -> dict:
    key = {"sst": "sst/dev/acc", "para": "para/dev/acc", "sts": "sts/dev/pearson"}[task]
    return {key: score, "dev/overall": score, "params/updated_pct": pct,
            "params/trainable": 1000, "params/total": 24000}


def multi(sst: float, para: float, sts: float, overall: float, pct: float = 100.0) -> dict:
    return {"sst/dev/acc": sst, "para/dev/acc": para, "sts/dev/pearson": sts,
            "dev/overall": overall, "params/updated_pct": pct, "params/trainable": 10,
            "params/total": 10, "memory/peak_mb": 1.0}


def _table2_runs(root: Path) -> None:
    def cfg(row: str, task: str, *extra: str) -> DictConfig:
        return compose_config(["experiment=table2", f"table2={row}", f"trainer.task={task}",
                               *extra])
    sst_r4 = cfg("lora-qkv-r4", "sst")
    write_run(root / "t2" / "0", sst_r4, 1, single("sst", 0.50, 4.16))
    write_run(root / "t2" / "1", sst_r4, 2, single("sst", 0.54, 4.16))
    write_run(root / "t2" / "2", cfg("lora-qkv-r4", "para"), 1, single("para", 0.80, 4.16))
    write_run(root / "t2" / "3", cfg("lora-qkv-r4", "sts"), 1, single("sts", 0.70, 4.17))
    write_run(root / "t2" / "4", cfg("lora-qkv-r2", "sst"), 1, single("sst", 0.40, 4.15))
    write_run(root / "t2" / "5", cfg("lora-qkv-r2", "para"), 1,
              error="CUDA out of memory\nTraceback (most recent call last): ...\n")
    # no lora-qkv-r2 sts run; a non-canonical row: LoRA on query and value only
    write_run(root / "t2" / "10", cfg("lora-qkv-r4", "sst", "peft.targets=attn_qv"), 1,
              single("sst", 0.30, 3.0))


def _table1_runs(root: Path) -> None:
    write_run(root / "t1" / "9", compose_config(["experiment=table1"]), 1,
              multi(0.50, 0.88, 0.85, 0.7683))


def _figure2_runs(root: Path) -> None:
    concat = compose_config(["experiment=figure2", "heads=concat", "order=sst-para-sts"])
    write_run(root / "t1" / "0", concat, 1, multi(0.50, 0.70, 0.60, 0.66))
    write_run(root / "t1" / "1", concat, 2, multi(0.54, 0.72, 0.64, 0.68))
    joint = compose_config(["experiment=figure2", "heads=joint", "order=sts-para-sst"])
    write_run(root / "t1" / "2", old_style(joint), 1, multi(0.45, 0.65, 0.55, 0.60))
    separate = compose_config(["experiment=figure2", "heads=separate", "order=para-sst-sts"])
    write_run(root / "t1" / "3", separate, 1)  # still running: no metrics.json, no error.txt


def _table3_runs(root: Path) -> None:
    seq = compose_config(["experiment=table3", "table3=seq-sst-para-sts"])
    write_run(root / "t3" / "0", seq, 1, multi(0.51, 0.75, 0.70, 0.70, 7.5))
    fedavg = compose_config(["experiment=table3", "table3=fedavg"])
    write_run(root / "t3" / "1", fedavg, 1, multi(0.30, 0.60, 0.20, 0.40, 22.61))
    write_run(root / "t3" / "2", fedavg, 2, multi(0.34, 0.62, 0.24, 0.44, 22.61))
    orthoada = compose_config(["experiment=table3", "table3=orthoada"])
    write_run(root / "t3" / "3", orthoada, 1, error="loss is NaN at step 3")
    interleaved = compose_config(["trainer=interleaved", "peft=lora"])  # ad hoc: no experiment
    write_run(root / "adhoc" / "run", interleaved, 1, multi(0.49, 0.74, 0.68, 0.69, 1.2))


@pytest.fixture(scope="module")
def sweep(cli, tmp_path_factory) -> tuple[Path, int, str, str]:
    """The sweep folder, and main's exit code, stdout and stderr on it."""
    root = tmp_path_factory.mktemp("sweep")
    _table1_runs(root)
    _figure2_runs(root)
    _table2_runs(root)
    _table3_runs(root)
    broken = root / "broken" / ".hydra"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("seed: [unclosed\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(root)])
    return root, code, out.getvalue(), err.getvalue()


def test_table2_cells_gaps_and_notes(sweep):
    root, code, out, err = sweep
    assert code == 0
    assert "**Table 2: single-task PEFT (dev)**" in out
    assert ("| Method | Rank | Parameters updated | SST acc | Para acc | STS corr |\n"
            "| --- | --- | ---: | ---: | ---: | ---: |\n"
            "| LoRA (query & value & key) | 2 | 4.15 % | 0.400 | — | — |\n"
            "| LoRA (query & value & key) | 4 | 4.16–4.17 % | 0.520 ± 0.028 | 0.800 | 0.700 |\n"
            "| LoRA (query & value & key) | 16 | — | — | — | — |\n") in out
    assert ("| LoRA (all linear) | 128 | — | — | — | — |\n"
            "| Lora (attn_qv) | 4 | 3.00 % | 0.300 | — | — |\n") in out
    failed = root / "t2" / "5"
    assert (f"- LoRA (query & value & key) r=2, Para acc (seed 1): failed in `{failed}`: "
            "CUDA out of memory\n") in out
    assert "- LoRA (query & value & key) r=2, STS corr: missing (no run)\n" in out
    assert "- DoRA (query & value & key) r=64: missing (no run)\n" in out
    assert "- Lora (attn_qv) r=4, Para acc: missing (no run)\n" in out
    assert "- mean ± std (sample, ddof=1) over 1–2 seeds" in out
    assert "Traceback" not in out
    assert f"warning: skipped {root / 'broken'}: unreadable .hydra/config.yaml" in err


def test_table1_is_the_submitted_model(sweep):
    _, _, out, _ = sweep
    assert ("**Table 1: full fine-tuning, the submitted model (dev)**\n\n"
            "| Model | SST acc | Para acc | STS corr | Overall | Parameters updated |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            "| Full fine-tuning (joint encoding, sst → para → sts) | 0.500 | 0.880 | 0.850 "
            "| 0.768 | 100.00 % |\n") in out


def test_figure2_grid_and_incomplete_run(sweep):
    """The grid, with the sts-para-sst run an older one's config (`order.tasks`)."""
    root, _, out, _ = sweep
    assert "**Figure 2: full fine-tuning by head design and task order (dev)**" in out
    assert ("| Design | Task order | SST acc | Para acc | STS corr | Overall |\n"
            "| --- | --- | ---: | ---: | ---: | ---: |\n"
            "| Concatenation | sst → para → sts | 0.520 ± 0.028 | 0.710 ± 0.014 | 0.620 ± 0.028 "
            "| 0.670 ± 0.014 |\n"
            "| Concatenation | sst → sts → para | — | — | — | — |\n") in out
    assert "| Joint encoding | sts → para → sst | 0.450 | 0.650 | 0.550 | 0.600 |\n" in out
    assert "| Projection + aggregation | para → sst → sts | — | — | — | — |\n" in out
    assert (f"- Projection + aggregation, para → sst → sts (seed 1): incomplete in "
            f"`{root / 't1' / '3'}`: no metrics.json (still running or killed)\n") in out
    assert "- Joint encoding, sts → sst → para: missing (no run)\n" in out
    grid = out.split("**Figure 2")[1]
    assert grid.count("\n| ") == 2 + 18  # header, rule and the 3 designs x 6 orders
    assert "- mean ± std (sample, ddof=1) over 1–2 seeds" in grid


def test_table3_rows_and_mixed_peft_note(sweep):
    root, _, out, _ = sweep
    table3 = out.split("**Table 3: multi-task strategies (dev)**")[1]
    assert ("| Sequential (sst → para → sts) | 7.50 % | 0.510 | 0.750 | 0.700 | 0.700 |\n"
            "| Sequential (sst → sts → para) | — | — | — | — | — |\n") in table3
    assert "| Ensemble of Experts | — | — | — | — | — |\n" in table3
    assert ("| FedAvg | 22.61 % | 0.320 ± 0.028 | 0.610 ± 0.014 | 0.220 ± 0.028 "
            "| 0.420 ± 0.028 |\n| OrthoAda | — | — | — | — | — |\n"
            "| Interleaved (temperature) | 1.20 % | 0.490 | 0.740 | 0.680 | 0.690 |\n") in table3
    assert f"- OrthoAda (seed 1): failed in `{root / 't3' / '3'}`: loss is NaN at step 3" in table3
    assert ("- the runs use several PEFT configs: Lora r=64 all_linear (4 runs), "
            "Lora r=8 attn_qkv (1 run); a row pools them") in table3


def test_written_files(sweep):
    root, _, out, _ = sweep
    tables = root / "tables"
    assert sorted(p.name for p in tables.iterdir()) == [
        "figure2.csv", "figure2.md", "figure2.png", "figure2.tex", "table1.csv", "table1.md",
        "table1.tex", "table2.csv", "table2.md", "table2.tex", "table3.csv", "table3.md",
        "table3.tex"]
    for name in ("table1", "table2", "table3", "figure2"):
        md = (tables / f"{name}.md").read_text(encoding="utf-8")
        assert md in out
    with open(tables / "table2.csv", newline="", encoding="utf-8") as f:
        rows = {(r["method"], r["rank"]): r for r in csv.DictReader(f)}
    r4 = rows[("LoRA (query & value & key)", "4")]
    assert (r4["sst_acc"], r4["sst_acc_std"], r4["sst_n_seeds"]) == ("0.520", "0.028", "2")
    assert float(r4["para_acc"]) == 0.8 and r4["para_acc_std"] == ""
    assert (r4["params_updated_pct_min"], r4["params_updated_pct_max"]) == ("4.16", "4.17")
    r2 = rows[("LoRA (query & value & key)", "2")]
    assert (r2["sst_acc"], r2["para_acc"], r2["sts_corr"]) == ("0.400", "—", "—")
    assert (r2["para_n_seeds"], r2["sts_n_seeds"]) == ("0", "0")
    assert len(rows) == 9
    with open(tables / "figure2.csv", newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    assert first["design"] == "Concatenation" and first["n_seeds"] == "2"
    assert (first["overall"], first["overall_std"]) == ("0.670", "0.014")
    tex = (tables / "table2.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}{llrrrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert (r"LoRA (query \& value \& key) & 4 & 4.16--4.17 \% & 0.520 $\pm$ 0.028 & 0.800 "
            r"& 0.700 \\") in tex
    assert r"LoRA (query \& value \& key) & 2 & 4.15 \% & 0.400 & -- & -- \\" in tex
    assert "—" not in tex.split(r"\end{tabular}")[0]


def test_figure2_is_a_png(sweep):
    from matplotlib.image import imread

    png = sweep[0] / "tables" / "figure2.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = imread(png).shape
    assert height > 0 and width > 0 and channels in (3, 4)


def test_table_of_infers_ad_hoc_runs(cli, tmp_path):
    for overrides, number in ((["trainer=single"], "table2"), ([], "table1"),
                              (["trainer=eoe"], "table3"), (["experiment=figure2"], "figure2"),
                              (["experiment=table3", "table3=seq-para-sst-sts"], "table3"),
                              (["tasks=[sts,sst,para]", "trainer=eoe"], "table3"),
                              (["trainer=single", "trainer.task=cfimdb"], "tasks"),
                              (["experiment=table2", "trainer.task=cfimdb"], "tasks"),
                              (["tasks=[sst,para,sts,cfimdb]"], "tasks"),
                              (["experiment=table3", "tasks=[sst,mytask]"], "tasks"),
                              (["tasks=[sst,para]"], "tasks")):
        run = write_run(tmp_path / str(len(list(tmp_path.iterdir()))),
                        compose_config(overrides), 0, multi(0.5, 0.5, 0.5, 0.5))
        assert cli.table_of(cli.collect_runs([run])[0][0]) == number, overrides


def test_older_runs_order_tasks(cli, tmp_path):
    """A run made before tasks were config files keeps its order in `order.tasks`: read there
    where `tasks` is absent, for the table (a fourth task: the tasks table) and the order."""
    for name, order, number in (("a", "para-sts-sst", "table1"), ("b", "sst-para-sts", "tasks")):
        cfg = old_style(compose_config([f"order={order}"]))
        if number == "tasks":
            cfg.order.tasks.append("cfimdb")
        run = cli.collect_runs([write_run(tmp_path / name, cfg, 0)])[0][0]
        assert "tasks" not in run.config and cli.table_of(run) == number
    from reports.tables.layouts import order_name
    assert order_name(cli.collect_runs([tmp_path / "a"])[0][0]) == "para-sts-sst"


def test_mixed_models_and_repeated_seeds_are_noted(cli, tmp_path, capsys):
    cfg = compose_config(["experiment=figure2", "heads=separate"])
    write_run(tmp_path / "a", cfg, 1, multi(0.5, 0.5, 0.5, 0.5))
    OmegaConf.update(cfg, "model.name", "tiny")
    write_run(tmp_path / "b", cfg, 1, multi(0.7, 0.5, 0.5, 0.6))  # the same seed again
    assert cli.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "- the runs use several models: minilm (1 run), tiny (1 run); a row pools them" in out
    assert (f"- Projection + aggregation, sst → para → sts: seed 1 has 2 finished runs "
            f"(`{tmp_path / 'a'}`, `{tmp_path / 'b'}`); the mean is over them all") in out
    assert "| Projection + aggregation | sst → para → sts | 0.600 ± 0.141 |" in out
    assert (tmp_path / "out" / "figure2.png").read_bytes()[:8] == PNG_MAGIC


def test_empty_folder_and_missing_table(cli, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no runs (no run.json or .hydra/config.yaml) under {empty}\n"
    assert cli.main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    write_run(tmp_path / "run", compose_config(["experiment=table1"]), 1,
              multi(0.5, 0.5, 0.5, 0.5))
    assert cli.main([str(tmp_path), "--table", "2", "3"]) == 2
    assert "error: no runs for Table 2, Table 3 under" in capsys.readouterr().err


def test_cli_subprocess(sweep, tmp_path):
    out_dir = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(sweep[0]), "--table", "3", "--out", str(out_dir)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("**Table 3: multi-task strategies (dev)**\n")
    assert "**Table 1" not in result.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["table3.csv", "table3.md", "table3.tex"]


def test_reference_report_beside_ours(cli, sweep, tmp_path, capsys):
    """`--reference report`: the report's published numbers beside ours, cell for cell, with the
    difference; rows the report has no number for are named."""
    assert cli.main([str(sweep[0]), "--out", str(tmp_path), "--reference", "report"]) == 0
    out = capsys.readouterr().out
    table3 = out.split("**Table 3 beside the report: ours / theirs (Δ = ours − theirs)**")[1]
    assert ("| Sequential (sst → para → sts) | 7.50 % / 8.91 % (-1.41) | 0.510 / 0.473 (+0.037) "
            "| 0.750 / 0.882 (-0.132) | 0.700 / 0.826 (-0.126) | 0.700 / 0.756 (-0.056) |") in table3
    assert ("| FedAvg | 22.61 % / 8.91 % (+13.70) | 0.320 ± 0.028 / 0.324 (-0.004) "
            "| 0.610 ± 0.014 / 0.637 (-0.027) | 0.220 ± 0.028 / 0.592 (-0.372) "
            "| 0.420 ± 0.028 / 0.586 (-0.166) |") in table3
    assert "| OrthoAda | — / 8.91 % | — / 0.233 |" in table3  # failed: only theirs
    assert "- not in the report: Interleaved (temperature)" in table3
    assert "bert-base-uncased" in table3  # what the report's numbers are
    table2 = out.split("**Table 2 beside the report")[1].split("**Table 3")[0]
    assert ("| LoRA (query & value & key) | 4 | 4.16–4.17 % / 0.20 % (+3.96) "
            "| 0.520 ± 0.028 / 0.425 (+0.095) | 0.800 / 0.848 (-0.048) "
            "| 0.700 / 0.699 (+0.001) |") in table2
    table1 = out.split("**Table 1 beside the report")[1].split("**Table 2")[0]
    assert ("| Full fine-tuning (joint encoding, sst → para → sts) | 0.500 / 0.519 (-0.019) "
            "| 0.880 / 0.897 (-0.017) | 0.850 / 0.864 (-0.014) | 0.768 / 0.783 (-0.015) "
            "| 100.00 % / 100.00 % (+0.00) |") in table1
    assert "**Figure 2 beside" not in out  # the report publishes no numbers for it
    assert (tmp_path / "table3-vs-report.md").read_text(encoding="utf-8") in out


def test_reference_errors(cli, sweep, tmp_path, capsys):
    assert cli.main([str(sweep[0]), "--reference", "nowhere"]) == 2
    assert "error: no reference 'nowhere': use one of ['report']" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("table,row,sst_acc\ntable1,full-ft,high\n")
    assert cli.main([str(sweep[0]), "--reference", str(bad)]) == 2
    assert f"error: {bad}, row 2: could not convert string to float" in capsys.readouterr().err


def test_shipped_reference_is_the_reports_numbers(cli):
    """The shipped copy holds the report's 18 cells (Tables 1-3), e.g. its Table 1 row."""
    from reports.tables import load_reference

    ref = load_reference("report")
    assert len(ref.rows) == 18
    assert ref.rows[("table1", "full-ft")] == {"sst_acc": 0.519, "para_acc": 0.897,
                                               "sts_corr": 0.864, "overall": 0.783,
                                               "params_updated_pct": 100.0}
    assert ref.rows[("table3", "eoe")]["params_updated_pct"] == 22.8


def task_config(name: str, kind: str, metric: str, **extra) -> dict:
    """A task's entry in run.json, as trainers.engine.record writes it (the keys the table reads)."""
    return {"name": name, "kind": kind, "metric": metric, "metrics": [], **extra}


REPORT_TASK_CONFIGS = [task_config("sst", "single_classification", "accuracy", num_labels=5),
                       task_config("para", "pair_classification", "accuracy", num_labels=2),
                       task_config("sts", "pair_regression", "pearson")]


def _generic_runs(root: Path) -> None:
    four = compose_config(["trainer=interleaved", "peft=lora", "tasks=[sst,para,sts,cfimdb]"])
    tasks = [*REPORT_TASK_CONFIGS, task_config("cfimdb", "single_classification", "accuracy",
                                               num_labels=2, metrics=["f1"])]
    for seed, (sst, para, sts, cfimdb, overall) in enumerate([(0.50, 0.70, 0.60, 0.80, 0.70),
                                                             (0.54, 0.72, 0.64, 0.84, 0.72)]):
        write_run(root / "four" / str(seed), four, seed + 1,
                  {**multi(sst, para, sts, overall, 1.2), "cfimdb/dev/acc": cfimdb}, tasks=tasks)
    write_run(root / "four" / "2", four, 3, error="CUDA out of memory", tasks=tasks)
    # a 3-class pair task scored by macro-F1; its metrics.json names accuracy first, run.json wins
    mnli = compose_config(["tasks=[sst,mnli]"])
    write_run(root / "mnli" / "0", mnli, 1,
              {"sst/dev/acc": 0.50, "mnli/dev/acc": 0.66, "mnli/dev/macro_f1": 0.61,
               "dev/overall": 0.555, "params/updated_pct": 100.0},
              tasks=[REPORT_TASK_CONFIGS[0],
                     task_config("mnli", "pair_classification", "macro_f1", num_labels=3,
                                 metrics=["accuracy"])])
    # an older run.json (task names): the metric is metrics.json's first cfimdb/dev/* key
    single = compose_config(["trainer=single", "trainer.task=cfimdb", "peft=lora"])
    write_run(root / "single" / "0", single, 1,
              {"cfimdb/dev/acc": 0.90, "cfimdb/dev/f1": 0.88, "dev/overall": 0.90,
               "params/updated_pct": 0.5}, tasks=["cfimdb"])
    write_run(root / "eoe" / "0", compose_config(["trainer=eoe"]), 1,
              multi(0.50, 0.50, 0.50, 0.50, 3.0), tasks=REPORT_TASK_CONFIGS)


@pytest.fixture(scope="module")
def generic(cli, tmp_path_factory) -> tuple[Path, int, str]:
    """Runs on other tasks than the report's beside one Table 3 run; main's exit code and stdout."""
    root = tmp_path_factory.mktemp("generic")
    _generic_runs(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main([str(root)])
    return root, code, out.getvalue()


def test_tasks_table_cells(generic):
    """A row per task list, strategy, PEFT config and head design; a column per task with its
    primary metric; blanks under tasks a row did not train; the failed seed noted."""
    root, code, out = generic
    assert code == 0
    tasks = out.split("**Tasks: runs on other tasks than the report's, by strategy (dev)**\n")[1]
    assert ("| Tasks | Strategy | PEFT | Head design | sst acc | para acc | sts pearson "
            "| cfimdb acc | mnli macro_f1 | Overall | Parameters updated |\n"
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            "| cfimdb | Single task | Lora r=8 attn_qkv | Joint encoding |  |  |  | 0.900 |  "
            "| 0.900 | 0.50 % |\n"
            "| sst, mnli | Sequential | FullFinetune | Joint encoding | 0.500 |  |  |  | 0.610 "
            "| 0.555 | 100.00 % |\n"
            "| sst, para, sts, cfimdb | Interleaved (temperature) | Lora r=8 attn_qkv "
            "| Joint encoding | 0.520 ± 0.028 | 0.710 ± 0.014 | 0.620 ± 0.028 | 0.820 ± 0.028 |  "
            "| 0.710 ± 0.014 | 1.20 % |\n") in tasks
    assert ("- Interleaved (temperature) on [sst, para, sts, cfimdb], Lora r=8 attn_qkv, Joint "
            f"encoding (seed 3): failed in `{root / 'four' / '2'}`: CUDA out of memory; the mean "
            "is over the other 2 runs\n") in tasks
    assert "- mean ± std (sample, ddof=1) over 1–2 seeds" in tasks
    assert "missing" not in tasks and "no `" not in tasks  # a blank is no gap
    table3 = out.split("**Table 3: multi-task strategies (dev)**\n")[1].split("**Tasks")[0]
    assert "| Ensemble of Experts | 3.00 % | 0.500 | 0.500 | 0.500 | 0.500 |\n" in table3
    assert "Interleaved" not in table3 and "**Table 1" not in out and "**Table 2" not in out


def test_tasks_table_files(cli, generic, tmp_path):
    root = generic[0]
    with open(root / "tables" / "tasks.csv", newline="", encoding="utf-8") as f:
        rows = {r["tasks"]: r for r in csv.DictReader(f)}
    four, mnli = rows["sst, para, sts, cfimdb"], rows["sst, mnli"]
    assert (four["cfimdb_acc"], four["cfimdb_acc_std"], four["n_seeds"]) == ("0.820", "0.028", "2")
    assert (four["sts_pearson"], four["mnli_macro_f1"], four["overall"]) == ("0.620", "", "0.710")
    assert (mnli["mnli_macro_f1"], mnli["sst_acc"], mnli["cfimdb_acc"]) == ("0.610", "0.500", "")
    assert rows["cfimdb"]["strategy"] == "Single task" and rows["cfimdb"]["cfimdb_acc"] == "0.900"
    tex = (root / "tables" / "tasks.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}{llllrrrrrrr}" in tex
    assert (r"sst, mnli & Sequential & FullFinetune & Joint encoding & 0.500 &  &  &  & 0.610 "
            r"& 0.555 & 100.00 \% \\") in tex
    assert r"cfimdb acc & mnli macro\_f1 & Overall" in tex
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main([str(root), "--table", "tasks", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.csv", "tasks.md", "tasks.tex"]


def test_tasks_table_metric_disagreement(cli, tmp_path, capsys):
    """Runs that name a task's primary metric differently: the column is the one named first
    (the most runs' where they are not tied), and a note says so."""
    cfg = compose_config(["tasks=[sst,mnli]"])
    mnli = task_config("mnli", "pair_classification", "macro_f1", num_labels=3)
    scores = {"sst/dev/acc": 0.5, "mnli/dev/acc": 0.7, "mnli/dev/macro_f1": 0.6,
              "dev/overall": 0.55}
    write_run(tmp_path / "a", cfg, 1, scores, tasks=[REPORT_TASK_CONFIGS[0], mnli])
    write_run(tmp_path / "b", cfg, 2, {**scores, "mnli/dev/macro_f1": 0.4})  # no run.json: acc
    assert cli.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| sst acc | mnli macro_f1 | Overall | Parameters updated |" in out
    assert "| 0.500 ± 0.000 | 0.500 ± 0.141 | 0.550 ± 0.000 | — |\n" in out
    assert ("- the runs score mnli by several primary metrics: macro_f1 (1 run), acc (1 run); its "
            "column is each run's `mnli/dev/macro_f1`") in out
    assert cli.main([str(tmp_path), "--table", "1"]) == 2
    assert "(its runs are for the tasks table)" in capsys.readouterr().err
