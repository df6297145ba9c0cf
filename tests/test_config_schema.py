"""The typed config, checked whole before anything runs (trainers.engine.schema, .targets, .recipe):
every config option passes; every bad key, value and combination is refused with a line naming
the key (the closest known key for a typo); Hydra draws from the schema never produce a
traceback (Hypothesis); and `train.py` prints one `error:` line, makes no folder and changes no
file when it refuses."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError, MinbertError
from conftest import REPO, compose_config, options, smoke_overrides
from trainers.engine.recipe import check_config

GROUPS = ["peft", "trainer", "heads", "model", "experiment", "scale", "recipe", "debug", "order",
          "logger"]
OFFLINE_ONLY = {("model", "bert-base"), ("scale", "full")}  # bert-base-uncased: a hub download


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)
                                          if (g, o) not in OFFLINE_ONLY])
def test_every_config_option_passes_the_schema(group, option):
    checked = check_config(compose_config([f"{group}={option}"]))
    assert checked.tasks and checked.trainer is not None and checked.method is not None


def test_the_hub_model_is_refused_offline_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(MinbertError, match="model.encoder: could not load 'bert-base-uncased'"):
        check_config(compose_config(["model=bert-base"]))


# (class, overrides, what the message says): each is refused by check_config alone
BAD = [
    # keys nobody reads: refused, naming the closest known key
    ("key", ["+trainer.epoch=3"], r"trainer.epoch: unknown key.*did you mean `epochs`"),
    ("key", ["+data.batchsize=8"], r"data.batchsize: unknown key.*did you mean `batch_size`"),
    ("key", ["+foo=1"], r"foo: unknown key; the keys here are \["),
    ("key", ["peft=lora", "+peft.rnk=4"], r"peft.rnk: unknown key.*did you mean `rank`"),
    ("key", ["+model.encoder.hiden_size=64"], r"model.encoder.hiden_size: unknown.*`hidden_size`"),
    ("key", ["logger=wandb", "+logger.projct=x"], r"logger.projct: unknown.*`project`"),
    ("key", ["+heads.pair_regression.hidden_size=8"], r"heads.pair_regression.hidden_size: set by"),
    # values out of range or of the wrong type
    ("value", ["trainer.max_grad_norm=-1"], r"trainer.max_grad_norm=-1 must be a positive"),
    ("value", ["trainer.head_lr=-1"], r"trainer.head_lr=-1 must be a number >= 0"),
    ("value", ["trainer.optimizer.lr=-1"], r"trainer.optimizer.lr=-1 must be a number >= 0"),
    ("value", ["peft=lora", "peft.lr=-0.1"], r"peft.lr=-0.1 must be a number >= 0"),
    ("value", ["trainer.optimizer.weight_decay=-0.1"], r"weight_decay=-0.1 must be a number >= 0"),
    ("value", ["model.max_length=1000"], r"model.max_length=1000: the encoder has 512 position"),
    ("value", ["data.eval_batch_size=0"], r"data.eval_batch_size=0: must be greater than or equal"),
    ("value", ["data.batch_size=abc"], r"data.batch_size='abc': must be a whole number"),
    ("value", ["trainer.epochs=1.5"], r"trainer.epochs=1.5: must be a whole number"),
    ("value", ["seed=-1"], r"seed=-1: .*seeds are in \[0, 2\*\*32\)"),
    ("value", ["seed=4294967296"], r"seed=4294967296: .*seeds are in"),
    ("value", ["device=tpu"], r"device='tpu' is not a device"),
    ("value", ["device=cuda:7"], r"device='cuda:7' but"),
    ("value", ["checkpoint.every_n_steps=-1"], r"checkpoint.every_n_steps=-1: must be greater"),
    ("value", ["checkpoint.keep=0"], r"checkpoint.keep=0: must be greater than or equal to 1"),
    ("value", ["tasks=sst"], r"tasks='sst': must be a list.*tasks=\[sst\]"),
    ("value", ["tasks=[]"], r"tasks=\[\]: "),
    ("value", ["progress=yes"], r"progress='yes': must be true or false"),
    ("value", ["precision=fp8"], r"precision='fp8': "),
    ("value", ["optim.state_bits=4"], r"optim.state_bits=4: must be 32 or 8"),
    ("value", ["heads.dropout=1.5"], r"heads.dropout=1.5: must be less than 1"),
    ("value", ["heads.pair_regression.aggregator=euclid"], r"aggregator='euclid': must be 'inner'"),
    ("value", ["peft=lora", "peft.rank=1.5"], r"peft.rank=1.5: must be a whole number"),
    ("value", ["peft=lora", "peft.rank=0"], r"rank=0 must be a positive integer"),
    ("value", ["data.download=sometimes"], r"data.download='sometimes': "),
    ("value", ["model=tiny", "model.encoder.hidden_size=65"],
     r"model.encoder: hidden_size=65 is not a multiple"),
    ("value", ["trainer.scheduler=step"], r"trainer.scheduler='step'"),
    ("value", ["trainer=interleaved", "trainer.schedule.sampler=random"], r"sampler='random'"),
    ("value", ["model=minilm", "model.encoder.name_or_path=/nowhere"], r"model.encoder: /nowhere"),
    # choices that would silently override each other, and rules across keys
    ("rule", ["trainer=single", "tasks=[sts]"], r"`tasks=\[sts\]` would be ignored.*trainer.task"),
    ("rule", ["trainer=single", "order=sts-sst-para"], r"`order=sts-sst-para` would be ignored"),
    ("rule", ["order=sts-sst-para", "tasks=[sst]"], r"both choose the tasks of the run"),
    ("rule", ["trainer=fedavg", "peft=lora", "trainer.finisher.weights=[1,2]"],
     r"trainer.finisher.weights=\[1.0, 2.0\] has 2 values for the run's 3 tasks"),
    ("rule", ["trainer=fedavg", "peft=prefix"], r"trainer=fedavg merges in weight space"),
    ("rule", ["precision=fp16", "device=cpu"], r"precision=fp16 needs a GPU"),
    ("rule", ["peft=galore", "trainer.optimizer._target_=torch.optim.SGD",
              "~trainer.optimizer.weight_decay"], r"conflicts with peft=galore"),
    ("rule", ["tasks=[sst,sst]"], r"names a task twice"),
    ("rule", ["tasks=[nope]"], r"no task 'nope'"),
]


@pytest.mark.parametrize("kind,overrides,message", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_input_is_refused_naming_the_key(kind, overrides, message):
    with pytest.raises(MinbertError, match=message):
        check_config(compose_config(overrides), overrides)


def test_every_problem_is_its_own_line():
    overrides = ["data.batch_size=0", "seed=-3", "+trainer.epoch=2"]
    with pytest.raises(ConfigError) as e:
        check_config(compose_config(overrides), overrides)
    lines = str(e.value).splitlines()  # the sections' problems; the trainer's key once they pass
    assert sorted(line.split("=")[0] for line in lines) == ["data.batch_size", "seed"]


# ---- Hypothesis: draws from the schema's keys, valid and invalid, never a traceback ----------

KEYS = ["seed", "device", "precision", "progress", "data.batch_size", "data.eval_batch_size",
        "data.limit_train", "data.limit_eval", "data.predict_test", "data.download",
        "checkpoint.every_n_steps", "checkpoint.keep", "optim.state_bits", "model.max_length",
        "model.pooling", "heads.dropout", "heads.proj_dim", "trainer.epochs", "trainer.head_lr",
        "trainer.max_grad_norm", "trainer.scheduler", "trainer.warmup_ratio", "trainer.patience",
        "trainer.eval_every_n_steps", "trainer.optimizer.lr", "peft.lr", "tasks",
        "+trainer.epoch", "+data.batchsize", "peft.rank", "peft.alpha", "peft.dropout"]
VALUES = st.one_of(
    st.integers(-5, 300).map(str), st.sampled_from(["0", "1", "2", "64", "4294967296"]),
    st.floats(-2, 2, allow_nan=False).map(lambda v: f"{v:.3g}"),
    st.sampled_from(["null", "true", "false", "abc", "auto", "cpu", "cuda", "fp32", "bf16", "mean",
                     "cosine", "linear", "[sst]", "[sst,para]", "[]", "sst", "[1,2]", "32", "8"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3,
                unique_by=lambda kv: kv[0]),
       st.sampled_from(["peft=lora", "peft=none", "peft=ia3", "trainer=interleaved",
                        "trainer=fedavg", "model=tiny"]))
def test_drawn_overrides_are_accepted_or_refused_cleanly(pairs, choice):
    overrides = [choice] + [f"{k}={v}" for k, v in pairs]
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException):
        return  # Hydra's own refusal: train.py prints it as one error: line
    try:
        check_config(cfg, overrides)
    except MinbertError as e:
        assert str(e).strip() and "Traceback" not in str(e)


# ---- train.py end to end: one error: line, no folder made, a finished run never touched -------

def train(*args, env=None, check=False):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


REFUSED = [["+trainer.epoch=3"], ["trainer.epochs=1.5"], ["device=tpu"], ["tasks=sst"],
           ["trainer.epoch=3"], ["peft=nope"]]


@pytest.mark.parametrize("bad", REFUSED, ids=[" ".join(b) for b in REFUSED])
def test_train_py_refuses_with_one_error_line_and_makes_nothing(shared_synthetic_root, tmp_path,
                                                                 bad):
    out = tmp_path / "run"
    proc = train(*smoke_overrides(shared_synthetic_root), f"hydra.run.dir={out}", *bad)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()  # not even an empty folder


def test_a_sweep_with_one_bad_job_starts_none(shared_synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = train("-m", *smoke_overrides(shared_synthetic_root), f"hydra.sweep.dir={sweep}",
                 "trainer.epochs=1,0")
    assert proc.returncode == 1 and "job 1 (" in proc.stderr and "no job ran" in proc.stderr
    assert not sweep.exists()


def test_an_unmakeable_run_dir_is_one_error_line(shared_synthetic_root, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = train(*smoke_overrides(shared_synthetic_root), f"hydra.run.dir={tmp_path}/file/run")
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def finished_cli_run(shared_synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train(*smoke_overrides(shared_synthetic_root), f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("extra", [["trainer.epochs=2"], ["seed=-1"], [], ["peft=lora"]],
                         ids=["another config", "a bad value", "the same config", "another peft"])
def test_a_refused_or_finished_command_leaves_the_run_byte_identical(
        finished_cli_run, shared_synthetic_root, extra):
    before = snapshot(finished_cli_run)
    assert (finished_cli_run / ".hydra" / "config.yaml").is_file() and "run.json" in before
    proc = train(*smoke_overrides(shared_synthetic_root), f"hydra.run.dir={finished_cli_run}",
                 *extra)
    assert proc.returncode == (0 if not extra else 1), proc.stderr[-2000:]
    assert snapshot(finished_cli_run) == before


VALID = {"trainer.epochs": st.sampled_from(["1", "2"]),
         "data.batch_size": st.sampled_from(["8", "16"]),
         "trainer.scheduler": st.sampled_from(["constant", "linear", "cosine"]),
         "trainer.max_grad_norm": st.sampled_from(["null", "1.0"]),
         "peft": st.sampled_from(["lora", "ia3", "bitfit", "none"]),
         "heads": st.sampled_from(["joint", "separate", "concat"]),
         "seed": st.integers(0, 2**32 - 1).map(str)}


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries(VALID))
def test_drawn_valid_configs_train(shared_synthetic_root, tmp_path_factory, draw):
    """A few configs drawn from the valid values pass the check and train end to end."""
    from trainers.engine.run import run

    overrides = smoke_overrides(shared_synthetic_root, "data.limit_train=32",
                                "data.limit_eval=32", *[f"{k}={v}" for k, v in draw.items()])
    score = run(check_config(compose_config(overrides), overrides),
                tmp_path_factory.mktemp("drawn"))
    assert 0 <= score <= 1
