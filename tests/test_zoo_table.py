"""The zoo table and its Pareto plot (`make_tables.py <sweep> --table zoo`) on runs with known
numbers: one row per `peft=` choice (read from Hydra's record of the run), scores as mean ± std
over seeds, costs in their units, a failed run named, and the frontier the plot draws."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose_config
from reports.tables.collect import Run
from reports.tables.margins import margins, margins_markdown
from reports.tables.zoo import frontier, rank_curves

SCRIPT = REPO / "scripts" / "make_tables.py"


def test_frontier_keeps_what_nothing_beats_on_both_axes():
    points = [(10, 0.5), (1, 0.4), (5, 0.45), (5, 0.6), (20, 0.6), (2, 0.3), (1, 0.2)]
    # (1, 0.4) beats (1, 0.2) and (2, 0.3); (5, 0.6) beats (5, 0.45), (10, 0.5) and (20, 0.6)
    assert frontier(points) == [1, 3]
    assert frontier([]) == [] and frontier([(3, 0.1)]) == [0]


def write_zoo_run(path: Path, peft: str, seed: int, metrics: dict | None,
                  overrides: tuple[str, ...] = ()) -> None:
    """A zoo run as Hydra leaves it: `overrides` are the command line's beyond peft= and seed=."""
    task = [f"peft={peft}", "experiment=zoo", *overrides, f"seed={seed}"]
    cfg = compose_config(task)
    (path / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, path / ".hydra" / "config.yaml")
    OmegaConf.save({"hydra": {"runtime": {"choices": {"peft": peft, "trainer": "interleaved"}},
                              "overrides": {"task": task}}}, path / ".hydra" / "hydra.yaml")
    if metrics is None:
        (path / "error.txt").write_text("peft: something went wrong\n")
    else:
        (path / "metrics.json").write_text(json.dumps(metrics))


def costs(overall: float, trainable: int, rate: float) -> dict:
    return {"sst/dev/acc": overall, "para/dev/acc": overall, "sts/dev/pearson": 2 * overall - 1,
            "dev/overall": overall, "params/updated_pct": trainable / 1e5,
            "params/trainable": trainable, "train/examples_per_s": rate,
            "memory/optimizer_state_bytes": 8 * trainable, "memory/peak_bytes": 3 * 2 ** 20,
            "memory/param_bytes": 2 ** 24, "memory/grad_bytes": 4 * trainable,
            "adapter/file_bytes": 4 * trainable}


@pytest.fixture
def zoo_sweep(tmp_path) -> Path:
    sweep = tmp_path / "zoo"
    runs = [("lora", 1, costs(0.60, 70_000, 100.0)), ("lora", 2, costs(0.62, 70_000, 110.0)),
            ("none", 1, costs(0.64, 6_500_000, 40.0)), ("none", 2, costs(0.66, 6_500_000, 44.0)),
            ("vera", 1, costs(0.50, 50_000, 120.0)), ("vera", 2, None)]
    for i, (peft, seed, metrics) in enumerate(runs):
        write_zoo_run(sweep / str(i), peft, seed, metrics)
    return sweep


def test_zoo_table_and_pareto_plot(zoo_sweep, capsys):
    spec = importlib.util.spec_from_file_location("make_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(zoo_sweep), "--table", "zoo"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()
            if line.startswith("| ") and "---" not in line and "PEFT method" not in line}
    assert list(rows) == ["lora", "none (full fine-tuning)", "vera"]
    assert ("| lora | 0.610 ± 0.014 | 0.610 ± 0.014 | 0.220 ± 0.028 | 0.610 ± 0.014 | 0.70 % | "
            "70 k | 105.0 / s | 0.5 MiB | 16.8 MiB | 3.0 MiB | 0.3 MiB |") == rows["lora"]
    assert "| 6.5 M | 42.0 / s | 49.6 MiB |" in rows["none (full fine-tuning)"]
    assert "| 0.500 | " in rows["vera"]  # one finished seed: no std
    assert "peft=vera (seed 2): failed in" in out and "peft: something went wrong" in out
    tables = zoo_sweep / "tables"
    assert {p.name for p in tables.iterdir()} == {"zoo.md", "zoo.csv", "zoo.tex",
                                                  "zoo-pareto.png"}
    assert (tables / "zoo-pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = (tables / "zoo.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["peft", "sst_acc", "sst_acc_std"] and "examples_per_s" in header


def test_swept_settings_are_rows_of_their_own_in_numeric_order(tmp_path, capsys):
    """A search's lr grid and a rank ladder sweep peft.* on the command line: each setting is a
    row named by it (`lora targets=all_linear rank=4`), after the method's defaults and in numeric
    order (1e-4 < 5e-4 < 1.5e-3; rank 4 < 16), and a setting of another group is not one."""
    sweep = tmp_path / "ladder"
    runs = [("lora", ("peft.lr=0.0015",)), ("lora", ("peft.lr=0.0001",)), ("lora", ()),
            ("lora", ("peft.lr=0.0005", "data.limit_train=100")),
            ("dora", ("peft.rank=16", "peft.targets=all_linear")),
            ("dora", ("peft.targets=all_linear", "peft.rank=4")),
            ("dora", ("optim.state_bits=8",))]
    for i, (peft, overrides) in enumerate(runs):
        write_zoo_run(sweep / str(i), peft, 1, costs(0.5 + i / 100, 1000 * (i + 1), 10.0),
                      overrides)
    spec = importlib.util.spec_from_file_location("make_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(sweep), "--table", "zoo"]) == 0
    rows = [line.split(" | ")[:5] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line and "PEFT method" not in line]
    assert [r[0].lstrip("| ") for r in rows] == [
        "dora optim.state_bits=8", "dora targets=all_linear rank=4",
        "dora targets=all_linear rank=16", "lora", "lora lr=0.0001", "lora lr=0.0005",
        "lora lr=0.0015"]
    assert [r[4] for r in rows] == ["0.560", "0.550", "0.540", "0.520", "0.510", "0.530",
                                    "0.500"]


def test_a_rank_ladder_and_dylora_curves_are_drawn_by_rank(tmp_path):
    """`zoo-ranks.png` reads a line per method and target set from the ladder's rows (mean and
    std over seeds at each swept rank) and a DyLoRA run's curve from its metrics.json."""
    from reports.tables import build_tables, collect_runs, zoo_ranks

    sweep = tmp_path / "ladder"
    i = 0
    for seed in (1, 2):
        for rank in (1, 4):
            for targets in ("attn_qkv", "all_linear"):
                overall = 0.5 + rank / 100 + (targets == "all_linear") / 10 + seed / 1000
                write_zoo_run(sweep / str(i), "lora", seed, costs(overall, 1000, 10.0),
                              (f"peft.rank={rank}", f"peft.targets={targets}"))
                i += 1
        curve = {f"dylora/r{b}/dev/overall": 0.4 + b / 100 + seed / 1000 for b in (1, 2, 8)}
        write_zoo_run(sweep / str(i), "dylora", seed, {**costs(0.5, 10, 1.0), **curve},
                      ("peft.r_max=8", "peft.curve_ranks=[1,2,8]"))  # the ranks: not in the label
        i += 1
    runs, _ = collect_runs([sweep])
    table = build_tables(runs, ["zoo"])[0]
    curves = rank_curves(table, runs)
    assert sorted(curves) == ["dylora curve r_max=8", "lora targets=all_linear",
                              "lora targets=attn_qkv"]
    assert [(r, round(m, 4)) for r, m, _ in curves["lora targets=attn_qkv"]] == [
        (1.0, 0.5115), (4.0, 0.5415)]
    assert [(r, round(m, 4)) for r, m, _ in curves["dylora curve r_max=8"]] == [
        (1, 0.4115), (2, 0.4215), (8, 0.4815)]
    assert curves["lora targets=all_linear"][0][2] == pytest.approx(0.000707, abs=1e-6)
    png = zoo_ranks(table, runs, tmp_path / "zoo-ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_run(tmp_path, peft: str, seed: int, overall: float, *overrides: str) -> Run:
    """A finished zoo run with only what the margins read: its choice, seed, overrides, score."""
    return Run(tmp_path / f"{peft}-{seed}-{len(overrides)}", {"seed": seed}, "finished",
               {"dev/overall": overall}, choices={"peft": peft}, overrides=overrides)


def test_margins_pair_each_row_with_the_heads_only_baseline_by_seed(tmp_path):
    runs = [fake_run(tmp_path, *args) for args in (
        ("frozen", 1, 0.50), ("frozen", 2, 0.60),
        ("lora", 1, 0.55), ("lora", 2, 0.62),             # +0.05, +0.02: clearly
        ("lora", 1, 0.49, "peft.lr=0.1"), ("lora", 2, 0.58, "peft.lr=0.1"),  # below on both
        ("ia3", 1, 0.51), ("ia3", 2, 0.59),               # +0.01, -0.01: level
        ("vera", 1, 0.503), ("vera", 2, 0.603),           # above on both, mean gain < MIN_GAIN
        ("prompt", 1, 0.70),                              # one seed
        ("dora", 3, 0.70))]                               # no seed in common
    found = {" ".join(m.key): m for m in margins(runs)}
    assert list(found) == ["dora", "ia3", "lora", "lora lr=0.1", "prompt", "vera"]
    assert found["lora"].gain == pytest.approx(0.035) and found["lora"].clearly_beats
    assert found["lora lr=0.1"].verdict == "below it on every seed"
    assert found["ia3"].gain == pytest.approx(0.0) and found["ia3"].verdict.startswith("level")
    assert found["vera"].verdict == "above it, not clearly" and not found["vera"].clearly_beats
    assert found["prompt"].verdict == "above it (one seed)"
    assert found["dora"].gain is None and found["dora"].verdict.startswith("no common seed")
    text = margins_markdown(runs)
    assert "seed 1: 0.500, seed 2: 0.600" in text
    assert "| lora | 2 | 0.585 | +0.035 | 1: +0.050, 2: +0.020 | clearly beats it |" in text
    assert margins(runs[2:]) is None and margins_markdown(runs[2:]) is None  # no baseline


def test_a_summed_metric_is_missing_where_any_part_is(tmp_path):
    run = fake_run(tmp_path, "lora", 1, 0.5)
    run.metrics.update({"memory/param_bytes": 100, "memory/grad_bytes": 20})
    assert run.metric("memory/param_bytes+memory/grad_bytes") == 120
    assert run.metric("memory/param_bytes+memory/optimizer_state_bytes") is None
