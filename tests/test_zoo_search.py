"""The zoo's defaults search: the verdict rule on known numbers (a clearly better lr must win on
every common seed, on at least two, by at least MIN_GAIN), and `scripts/zoo_search.py` end to end
on the tiny model: the grid around the shipped lr, one multirun per method and seed, a rerun that
skips what is done, and the summary it writes."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO
from reports.tables.collect import Run
from reports.tables.search import MIN_GAIN, Point, choice_of, knob_value, verdict

SCRIPT = REPO / "scripts" / "zoo_search.py"


def points(*grid: tuple[float, dict]) -> list[Point]:
    return [Point(lr, {str(s): v for s, v in scores.items()}) for lr, scores in grid]


def test_a_clearly_better_lr_wins_on_every_common_seed_by_the_minimum_gain():
    found = verdict("vera", 5e-3, points((1.5e-3, {1: 0.50, 2: 0.52}),
                                         (5e-3, {1: 0.55, 2: 0.56}),
                                         (1.5e-2, {1: 0.60, 2: 0.58})))
    assert found.best.value == 1.5e-2 and found.clearly_better and found.common == 2
    assert found.gain == pytest.approx(0.035)


@pytest.mark.parametrize("why, grid", [
    ("loses on seed 2", ((5e-3, {1: 0.55, 2: 0.56}), (1.5e-2, {1: 0.62, 2: 0.555}))),
    ("one common seed", ((5e-3, {1: 0.55}), (1.5e-2, {1: 0.62, 2: 0.63}))),
    ("gain below the minimum", ((5e-3, {1: 0.55, 2: 0.56}),
                                (1.5e-2, {1: 0.55 + MIN_GAIN / 2, 2: 0.56 + MIN_GAIN / 2}))),
    ("the shipped lr is best", ((5e-3, {1: 0.60, 2: 0.61}), (1.5e-2, {1: 0.55, 2: 0.56}))),
])
def test_no_change_without_clear_evidence(why, grid):
    found = verdict("vera", 5e-3, points(*grid))
    assert not found.clearly_better, why


def test_a_search_with_only_the_shipped_value_says_so_not_that_it_is_best():
    found = verdict("vera", 256, points((256, {1: 0.6, 2: 0.61})), setting="rank")
    assert choice_of(found) == "only the shipped rank has run"
    found = verdict("vera", 256, points((64, {1: 0.55}), (256, {1: 0.6, 2: 0.61})), setting="rank")
    assert choice_of(found) == "keep (the shipped rank is best)"


def test_a_grid_without_the_shipped_lr_has_no_verdict():
    found = verdict("vera", 5e-3, points((1.5e-2, {1: 0.6, 2: 0.6})))
    assert found.gain is None and not found.clearly_better


def load_script():
    spec = importlib.util.spec_from_file_location("zoo_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_search_runs_resumes_and_summarises(tmp_path, capsys, data_root, monkeypatch):
    monkeypatch.setenv("MINBERT_DATA", str(data_root))
    script = load_script()
    out = tmp_path / "search"
    argv = ["run", "--out", str(out), "--methods", "bitfit", "--seeds", "1", "2",
            "--factors", "1", "10", "--", "scale=smoke"]
    assert script.main(argv) == 0
    plan = json.loads((out / "search.json").read_text())
    assert plan == {"methods": {"bitfit": {"shipped_lr": 1e-3, "grid": ["0.001", "0.01"]}},
                    "budget": ["scale=smoke"]}
    runs = sorted(p.parent.parent for p in out.rglob(".hydra/config.yaml"))
    assert len(runs) == 4 and all((r / "metrics.json").is_file() for r in runs)
    assert script.main(argv) == 0  # resumes: nothing left to run
    assert capsys.readouterr().out.count("done before") == 2
    with pytest.raises(SystemExit, match="was searched with"):
        script.main(argv[:-1] + ["scale=smoke", "trainer.epochs=2"])
    edge = ["run", "--out", str(out), "--methods", "bitfit", "--seeds", "1", "--factors", "30",
            "--", "scale=smoke"]  # a point past the grid's edge: a folder of its own
    assert script.main(edge) == 0
    assert (out / "bitfit" / "seed1-x30" / "done").is_file()
    assert json.loads((out / "search.json").read_text())["methods"]["bitfit"]["grid"] == [
        "0.001", "0.01", "0.03"]
    assert script.main(["summarise", str(out)]) == 0
    text = (out / "search.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| bitfit"))
    assert "0.001: " in row and "(n=2) *" in row and "0.01: " in row and "0.03: " in row
    assert {p.name for p in out.iterdir()} >= {"search.md", "search.csv", "search.png"}
    lines = (out / "search.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("method,setting,shipped,value,seed,dev_overall")


def test_an_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no conf/peft/<name>.yaml for \\['loraa'\\]"):
        load_script().main(["run", "--out", str(tmp_path), "--methods", "loraa"])


def test_the_knob_search_runs_at_the_shipped_lr_beside_the_lr_grid(tmp_path, data_root,
                                                                    monkeypatch, capsys):
    monkeypatch.setenv("MINBERT_DATA", str(data_root))
    script = load_script()
    out, budget = tmp_path / "search", ["--", "scale=smoke"]
    base = ["run", "--out", str(out), "--methods", "lora", "--seeds", "1", "2"]
    assert script.main([*base, "--factors", "1", *budget]) == 0  # the default's runs
    assert script.main([*base, "--knob", *budget]) == 0
    plan = json.loads((out / "search.json").read_text())
    assert plan["knobs"] == {"lora": {"name": "rank", "default": 8.0, "lr": 1.5e-3,
                                      "values": [4, 16]}}
    assert sorted(p.name for p in (out / "lora").iterdir()) == [
        "seed1-rank", "seed1-x1", "seed2-rank", "seed2-x1"]
    assert script.main(["summarise", str(out)]) == 0
    row = next(line for line in (out / "knobs.md").read_text().splitlines()
               if line.startswith("| lora"))
    assert row.startswith("| lora | rank 8 | 4: ") and "| 8: " in row and "(n=2) *" in row
    assert "| 16: " in row
    lines = (out / "knobs.csv").read_text().splitlines()
    assert len(lines) == 7 and all(",rank,8.0," in line for line in lines[1:])
    assert (out / "knobs.png").is_file() and "knobs.md" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"\['bitfit'\] have no knob"):
        script.main(["run", "--out", str(out), "--methods", "bitfit", "--knob", *budget])
    with pytest.raises(SystemExit, match="give one of them"):
        script.main([*base, "--knob", "--factors", "3", *budget])


def test_a_knob_point_is_a_run_at_the_knob_lr_that_set_nothing_else(tmp_path):
    knob = {"name": "rank", "default": 8, "lr": 5e-4}

    def run(*overrides):
        return Run(tmp_path, {}, "finished", {}, overrides=overrides)
    assert knob_value(run("peft.lr=0.0005"), knob) == 8.0  # the lr grid's run: the default
    assert knob_value(run("peft.lr=0.0005", "peft.rank=16"), knob) == 16.0
    assert knob_value(run("peft.lr=0.0015", "peft.rank=16"), knob) is None  # another lr
    assert knob_value(run("peft.lr=0.0005", "peft.rank=16", "peft.alpha=32"), knob) is None
    assert knob_value(run("peft.rank=16"), knob) is None  # not a search run
