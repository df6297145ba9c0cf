"""The report's experiment presets, the scale knob and the sweep configs: every option composes to
the grid the report describes, and every preset runs end to end at smoke scale (`-m`, in a
subprocess, on the synthetic data set), with a failing job reported without losing the others."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
# The sweep extra's plugins, imported so that a missing one fails here instead of skipping.
import hydra_plugins.hydra_joblib_launcher  # noqa: F401
import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
import hydra_plugins.hydra_submitit_launcher  # noqa: F401
from conftest import REPO, compose_config, finished_runs, options, train_cli

ORDERS = ["sst-para-sts", "sst-sts-para", "para-sst-sts", "para-sts-sst", "sts-sst-para",
          "sts-para-sst"]


def sweep_params(experiment: str) -> dict[str, list[str]]:
    """The grid an experiment preset sweeps: key -> its values."""
    cfg = compose_config([f"experiment={experiment}"], hydra=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_groups_of_the_experiments(compose_cfg):
    assert options("experiment") == ["figure2", "table1", "table2", "table3", "zoo", "zoo_ranks"]
    assert options("scale") == ["cpu", "full", "smoke"]
    assert len(options("table2")) == 8 and len(options("table3")) == 9
    assert options("sweep") == ["optuna_dora", "optuna_lora"]
    assert options("hydra/launcher") == ["local", "local_ddp", "parallel", "slurm", "slurm_ddp"]


def composition(cfg) -> tuple[str, str, str]:
    """(schedule, combiner, finisher) of a composed trainer config."""
    name = lambda node: node._target_.rsplit(".", 1)[1]  # noqa: E731
    return name(cfg.trainer.schedule), cfg.trainer.combiner, name(cfg.trainer.finisher)


def test_table1_is_the_submitted_full_finetuning_model(compose_cfg):
    """Table 1 is one run: full fine-tuning, sequential, the joint encoding the report chose."""
    assert not compose_config(["experiment=table1"], hydra=True).hydra.sweeper.params
    cfg = compose_cfg(["experiment=table1"])
    assert cfg.peft._target_.endswith("FullFinetune") and cfg.heads.design == "joint"
    assert composition(cfg) == ("Sequential", "sum", "KeepBest") and cfg.experiment_name == "table1"


def test_figure2_is_full_finetuning_over_designs_and_orders(compose_cfg):
    assert sweep_params("figure2") == {"heads": ["concat", "separate", "joint"], "order": ORDERS}
    cfg = compose_cfg(["experiment=figure2", "heads=concat", "order=sts-para-sst"])
    assert cfg.peft._target_.endswith("FullFinetune") and cfg.heads.design == "concat"
    assert composition(cfg) == ("Sequential", "sum", "KeepBest") and cfg.experiment_name == "figure2"


@pytest.mark.parametrize("experiment", ["table2", "table3"])
def test_peft_tables_use_the_joint_encoding_the_report_chose(compose_cfg, experiment):
    assert compose_cfg([f"experiment={experiment}"]).heads.design == "joint"
    assert compose_cfg([f"experiment={experiment}", "heads=separate"]).heads.design == "separate"


TABLE2_ROWS = {  # row -> (method, rank, targets, bias): the report's Table 2
    "lora-qkv-r2": ("Lora", 2, "attn_qkv", "none"), "lora-qkv-r4": ("Lora", 4, "attn_qkv", "none"),
    "lora-qkv-r16": ("Lora", 16, "attn_qkv", "none"),
    "lora-qkv-r64": ("Lora", 64, "attn_qkv", "none"),
    "dora-qkv-r64": ("Dora", 64, "attn_qkv", "none"),
    "lora-all-r64": ("Lora", 64, "all_linear", "none"),
    "lora-all-bias-r64": ("Lora", 64, "all_linear", "all"),
    "lora-all-r128": ("Lora", 128, "all_linear", "none"),
}


@pytest.mark.parametrize("row", sorted(TABLE2_ROWS))
def test_table2_rows_are_single_task_peft(compose_cfg, row):
    assert sweep_params("table2") == {"table2": list(TABLE2_ROWS), "trainer.task": ["sst", "para",
                                                                                    "sts"]}
    cfg = compose_cfg(["experiment=table2", f"table2={row}", "trainer.task=sts"])
    peft = cfg.peft
    assert (peft._target_.rsplit(".", 1)[1], peft.rank, peft.targets, peft.bias) == TABLE2_ROWS[row]
    assert composition(cfg) == ("Sequential", "sum", "KeepBest") and cfg.trainer.task == "sts"
    assert cfg.trainer.optimizer.lr == peft.lr


@pytest.mark.parametrize("row", options("table3"))
def test_table3_rows_share_lora_r64_all_linear(compose_cfg, row):
    assert sorted(sweep_params("table3")["table3"]) == options("table3")
    cfg = compose_cfg(["experiment=table3", f"table3={row}"])
    assert cfg.peft._target_.endswith(".Lora") and (cfg.peft.rank, cfg.peft.targets) == (
        64, "all_linear")
    expected = {"eoe": "Experts", "fedavg": "MergeExperts",
                "orthoada": "MergeExperts"}.get(row, "KeepBest")
    assert composition(cfg) == ("Sequential", "sum", expected)
    assert (cfg.trainer.init is not None) == (row == "orthoada")
    if row.startswith("seq-"):
        assert "-".join(cfg.tasks) == row[4:]


@pytest.mark.parametrize("scale,model,epochs,limit", [("smoke", "tiny", 1, 64),
                                                      ("cpu", "minilm", 2, 2000),
                                                      ("full", "bert-base", 10, None)])
def test_scale_sets_size_whatever_the_experiment(compose_cfg, scale, model, epochs, limit):
    for experiment in options("experiment"):
        cfg = compose_cfg([f"experiment={experiment}", f"scale={scale}"])
        assert (cfg.model.name, cfg.trainer.epochs, cfg.data.limit_train) == (model, epochs, limit)
    base = compose_cfg(["experiment=table3"])
    scaled = compose_cfg(["experiment=table3", f"scale={scale}"])
    assert scaled.peft == base.peft and scaled.trainer._target_ == base.trainer._target_


@pytest.mark.parametrize("sweep,method", [("optuna_lora", "Lora"), ("optuna_dora", "Dora")])
def test_optuna_sweeps_search_lr_rank_alpha_dropout(sweep, method):
    cfg = compose_config([f"sweep={sweep}"], hydra=True)
    assert cfg.peft._target_.endswith("." + method)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"peft.lr", "peft.rank", "peft.alpha", "peft.dropout"}


@pytest.mark.parametrize("launcher,target", [("parallel", "JoblibLauncher"),
                                             ("local", "LocalLauncher"),
                                             ("slurm", "SlurmLauncher"),
                                             ("local_ddp", "LocalDDPLauncher"),
                                             ("slurm_ddp", "SlurmDDPLauncher")])
def test_launcher_configs_compose(launcher, target):
    from hydra.utils import get_class

    launcher_cfg = compose_config([f"hydra/launcher={launcher}"], hydra=True).hydra.launcher
    assert launcher_cfg._target_.endswith("." + target)
    assert get_class(launcher_cfg._target_).__name__ == target  # importable
    if launcher.endswith("_ddp"):  # a data-parallel job: two ranks, the rest of its base option
        assert launcher_cfg.tasks_per_node == 2
    if launcher == "slurm_ddp":  # one rank per GPU; preemption as in `slurm`
        assert launcher_cfg.gpus_per_node == 2
        assert launcher_cfg.signal_delay_s == 120 and launcher_cfg.max_num_timeout == 3


def test_the_zoo_sweeps_every_peft_choice_with_one_strategy(compose_cfg):
    """A new conf/peft file joins the zoo or this fails: the sweep lists every choice."""
    assert sweep_params("zoo") == {"peft": options("peft")}
    cfg = compose_cfg(["experiment=zoo", "peft=vera"])
    assert composition(cfg) == ("Sampled", "sum", "KeepBest") and cfg.heads.design == "joint"
    assert cfg.trainer.optimizer.lr == cfg.peft.lr and cfg.experiment_name == "zoo"


def test_the_rank_ladder_is_the_zoo_over_lora_and_dora_ranks_and_targets(compose_cfg):
    assert sweep_params("zoo_ranks") == {"peft": ["lora", "dora"],
                                         "peft.rank": ["1", "2", "4", "8", "16", "64"],
                                         "peft.targets": ["attn_qkv", "all_linear"]}
    cfg = compose_cfg(["experiment=zoo_ranks", "peft=dora", "peft.rank=64"])
    assert composition(cfg) == ("Sampled", "sum", "KeepBest") and cfg.heads.design == "joint"
    assert cfg.experiment_name == "zoo" and cfg.peft.rank == 64 and cfg.peft.alpha == 16


@pytest.mark.slow  # about two minutes: 1 + 18 + 24 + 9 + 21 + 24 smoke runs
@pytest.mark.parametrize("experiment,runs", [("table1", 1), ("figure2", 18), ("table2", 24),
                                             ("table3", 9), ("zoo", 21), ("zoo_ranks", 24)])
def test_every_preset_runs_at_smoke_scale(tmp_path, shared_synthetic_root, experiment, runs):
    sweep = tmp_path / "sweep"
    train_cli("-m", f"experiment={experiment}", "scale=smoke",
              f"data.root={shared_synthetic_root}", f"hydra.sweep.dir={sweep}")
    done = finished_runs(sweep)
    assert len(done) == runs and not list(sweep.rglob("error.txt"))
    assert {r["cfg"]["experiment_name"] for r in done} == {experiment.replace("_ranks", "")}
    assert {r["cfg"]["model"]["name"] for r in done} == {"tiny"}
    for run in done:
        assert 0.0 <= run["metrics"]["dev/overall"] <= 1.0
        assert run["metrics"]["params/trainable"] > 0
    if experiment == "zoo":  # its table: a row per method, each with its costs
        proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(sweep), "--table",
                               "zoo"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        table = (sweep / "tables" / "zoo.md").read_text()
        rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
        assert sorted(row.split(" | ")[0][2:].split(" ")[0] for row in rows) == options("peft")
        assert all(" / s | " in row and "MiB" in row for row in rows)
        assert (sweep / "tables" / "zoo-pareto.png").is_file()
        margins = (sweep / "tables" / "zoo-margins.md").read_text()  # each against frozen
        rows = [line for line in margins.splitlines() if line.startswith("| ")][2:]
        assert sorted(row.split(" | ")[0][2:].split(" ")[0] for row in rows) == sorted(
            set(options("peft")) - {"frozen"})
        assert margins in proc.stdout
    if experiment == "zoo_ranks":  # a row per method, target set and rank, and the rank plot
        proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(sweep), "--table",
                               "zoo"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        rows = [line.split(" | ")[0][2:] for line in proc.stdout.splitlines()
                if line.startswith("| ")][2:]
        assert rows[:3] == ["dora targets=all_linear rank=1", "dora targets=all_linear rank=2",
                            "dora targets=all_linear rank=4"] and len(rows) == 24
        assert "lora targets=attn_qkv rank=64" in rows
        assert (sweep / "tables" / "zoo-ranks.png").is_file()


def test_failed_job_is_reported_and_the_others_kept(tmp_path, shared_synthetic_root):
    """A job whose data turns out bad (every config is checked before the sweep starts, so the
    failure is the data's) fails alone: the others finish and the sweep reports it."""
    root = tmp_path / "data"
    shutil.copytree(shared_synthetic_root, root)
    para = root / "quora-train.csv"
    para.write_text(para.read_text().splitlines()[0] + "\n")  # a header and no rows
    sweep = tmp_path / "sweep"
    proc = train_cli("-m", "experiment=table2", "scale=smoke", "table2=lora-qkv-r2",
                     "trainer.task=sst,para,sts", f"data.root={root}",
                     f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1
    assert "1 run(s) of the multirun failed" in proc.stderr and str(sweep / "1") in proc.stderr
    assert "Traceback" not in proc.stderr
    error = (sweep / "1" / "error.txt").read_text()
    assert error.startswith(f"{para} has a header but no data rows")
    assert sorted(r["cfg"]["trainer"]["task"] for r in finished_runs(sweep)) == ["sst", "sts"]
    assert (sweep / "1" / "run.json").exists() is False  # it failed before writing anything


def test_count_params_gives_table2_parameters_on_bert_base_shapes(capsys):
    """scripts/count_params.py --meta: bert-base's shapes without its checkpoint. LoRA r=2 on
    query/key/value trains 12 layers x 3 x 2 x (768 + 768) = 110,592 adapter parameters, plus the
    SST head's 768 x 5 + 5 = 3,845: the report's "~0.1 %" for a single-task run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("count_params", REPO / "scripts" /
                                                  "count_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--meta", "--tasks", "sst", "--ranks", "2", "--targets", "attn_qkv"]) == 0
    assert torch.is_grad_enabled()  # the script leaves the process's autograd state alone
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == "| attn_qkv | 2 | 114,437 | 109,596,677 | 0.104 | 0.101 |"
