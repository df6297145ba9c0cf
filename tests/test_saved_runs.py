"""A finished run rebuilt by the one loader (`trainers.engine.record.load_run`) for every script: the task
list the run trained is saved with it, the rebuilt model scores dev exactly as the run did for
every kind of strategy, `export_peft.py` exports single-task runs (Table 2's cells) and per-task
experts, and `predict.py` scores files and sentences with a trained run."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import REPO, trained_run
from tasks.data import load_task_data
from trainers.engine.build import encode_data
from trainers.engine.context import RunContext
from trainers.engine.evaluate import evaluate
from trainers.engine.record import load_run

SCORES = ("sst/dev/acc", "para/dev/acc", "sts/dev/pearson", "dev/overall")


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def dev_scores(saved, root) -> dict[str, float]:
    raw = load_task_data(saved.tasks, root, None, None)
    data = encode_data(saved.cfg, saved.model, raw)
    ctx = RunContext.for_scoring(saved.model, saved.tasks, data, saved.run_dir, saved.method,
                                 eval_batch_size=saved.cfg.data.eval_batch_size)
    return evaluate(ctx, "dev", weights=saved.weights)[0]


@pytest.mark.parametrize("overrides", [
    ["peft=lora", "trainer=single", "trainer.task=sts"],
    ["peft=lora", "order=sts-para-sst"],
    ["peft=lora", "trainer=eoe"],
    ["peft=dora", "trainer=fedavg", "trainer.finisher.merge=ties"],
    ["peft=none", "trainer=fedavg"],
    ["peft=lora", "trainer=orthoada"],
], ids=["single", "sequential", "eoe", "fedavg-ties", "fedavg-full", "orthoada"])
def test_load_run_rebuilds_the_runs_dev_scores(synthetic_root, tmp_path, overrides):
    cfg, metrics = trained_run(synthetic_root, tmp_path, *overrides)
    saved_tasks = [t["name"] for t in json.loads((tmp_path / "run.json").read_text())["tasks"]]
    assert saved_tasks == ([cfg.trainer.task] if "trainer=single" in overrides
                           else list(cfg.tasks))
    saved = load_run(tmp_path)
    assert [t.name for t in saved.tasks] == saved_tasks
    got = dev_scores(saved, synthetic_root)
    for key in got:
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_export_of_a_single_task_run(synthetic_root, tmp_path):
    """Table 2's cells are single-task runs: the export rebuilds the run's own head, not the
    three heads of `order` (which failed with missing `heads.para.*` keys)."""
    trained_run(synthetic_root, tmp_path / "run", "peft=lora", "trainer=single",
                "trainer.task=sts")
    r = script("export_peft.py", tmp_path / "run", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    heads = load_file(str(tmp_path / "export" / "minbert_heads.safetensors"))
    assert heads and all(k.startswith("sts.") for k in heads)
    assert (tmp_path / "export" / "adapter_model.safetensors").is_file()


def test_export_of_experts_writes_one_adapter_per_task(synthetic_root, tmp_path):
    trained_run(synthetic_root, tmp_path / "run", "peft=lora", "trainer=eoe")
    r = script("export_peft.py", tmp_path / "run", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    for task in ("sst", "para", "sts"):
        adapter = load_file(str(tmp_path / "export" / task / "adapter_model.safetensors"))
        expert = load_file(str(tmp_path / "run" / "experts" / f"{task}.safetensors"))
        a = next(k for k in adapter if k.endswith("layer.0.attention.self.query.lora_B.weight"))
        np.testing.assert_array_equal(adapter[a].numpy(),
                                      expert["encoder.layers.0.attn.query.lora_B"].numpy())
        heads = load_file(str(tmp_path / "export" / task / "minbert_heads.safetensors"))
        assert heads and all(k.startswith(f"{task}.") for k in heads)


def test_export_of_a_merged_run_says_why_it_cannot(synthetic_root, tmp_path):
    trained_run(synthetic_root, tmp_path / "run", "peft=lora", "trainer=fedavg")
    r = script("export_peft.py", tmp_path / "run", tmp_path / "export")
    assert r.returncode == 1 and "full-rank" in r.stderr and "Traceback" not in r.stderr


def test_predict_scores_a_labelled_file_as_the_run_did(synthetic_root, tmp_path):
    _, metrics = trained_run(synthetic_root, tmp_path, "peft=lora", "trainer=eoe")
    out = tmp_path / "sts-again.csv"
    r = script("predict.py", tmp_path, "--input", synthetic_root / "sts-dev.csv", "--out", out)
    assert r.returncode == 0, r.stderr
    score = float(r.stdout.split("sts/sts-dev/pearson: ")[1].split()[0])
    assert score == pytest.approx(metrics["sts/dev/pearson"], abs=1e-4)
    assert out.read_text() == (tmp_path / "predictions" / "sts-dev-output.csv").read_text()


def test_predict_an_unlabelled_file_and_sentences(synthetic_root, tmp_path):
    trained_run(synthetic_root, tmp_path, "peft=lora")
    r = script("predict.py", tmp_path, "--input", synthetic_root / "ids-sst-test-student.csv")
    assert r.returncode == 0, r.stderr
    written = tmp_path / "predictions" / "ids-sst-test-student-sst-output.csv"
    assert written.read_text() == (tmp_path / "predictions" / "sst-test-output.csv").read_text()
    r = script("predict.py", tmp_path, "--text", "a superb great movie")
    assert r.returncode == 0 and r.stdout.startswith("sst: ") and "para" not in r.stdout
    r = script("predict.py", tmp_path, "--text", "a dog runs fast", "a dog runs")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("para: class ") and "paraphrase" in lines[0]
    assert lines[1].startswith("sts: ") and lines[1].endswith("(a score in [0, 5])")
    r = script("predict.py", tmp_path, "--input", synthetic_root / "quora-test-student.csv")
    assert r.returncode == 0, r.stderr  # unlabelled pairs: the file name tells para from sts


def test_predict_errors_name_the_problem(synthetic_root, tmp_path):
    trained_run(synthetic_root, tmp_path, "peft=lora", "trainer=single", "trainer.task=sst")
    r = script("predict.py", tmp_path, "--input", synthetic_root / "sts-dev.csv")
    assert r.returncode == 1 and "cannot tell which of the run's tasks ['sst']" in r.stderr
    r = script("predict.py", tmp_path, "--text", "one", "two")
    assert r.returncode == 1 and "none of which takes a pair" in r.stderr
    r = script("predict.py", tmp_path, "--input", tmp_path / "nope.csv", "--task", "sst")
    assert r.returncode == 1 and "nope.csv not found" in r.stderr
