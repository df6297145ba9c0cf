"""Every config option composes and instantiates; bad choices fail with the valid ones listed."""
import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import options
from minbert import BertModel
from common.errors import CheckpointError, ConfigError
from minbert.peft import PeftMethod, param_counts
from tasks.registry import get_tasks
from trainers.engine.build import build, build_model, resolve_device


def test_groups_have_the_documented_choices():
    assert options("model") == ["bert-base", "minilm", "tiny"]
    assert options("heads") == ["concat", "joint", "separate"]
    assert len(options("order")) == 6
    assert {"none", "lora", "lora_fa", "dora", "vera"} <= set(options("peft"))
    assert {"sequential"} <= set(options("trainer"))
    assert options("logger") == ["none", "wandb"]


def test_default_config_is_the_reports_recipe(compose_cfg):
    cfg = compose_cfg()
    assert cfg.model.name == "minilm" and cfg.logger.mode == "offline"
    assert cfg.trainer.optimizer.lr == 1e-5 and cfg.trainer.epochs == 10
    assert cfg.data.batch_size == 32 and cfg.heads.dropout == 0.3
    assert cfg.tasks == ["sst", "para", "sts"]
    assert cfg.heads.pair_regression.aggregator == "cosine"
    assert cfg.heads.pair_classification.aggregator is None  # inner for 2 classes


@pytest.mark.parametrize("order", options("order"))
def test_every_order_is_a_permutation_of_the_three_tasks(compose_cfg, order):
    cfg = compose_cfg([f"order={order}"])
    assert "-".join(cfg.tasks) == order
    assert sorted(t.name for t in get_tasks(list(cfg.tasks))) == ["para", "sst", "sts"]


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_model_options_instantiate(compose_cfg, model):
    cfg = compose_cfg([f"model={model}"])
    encoder = instantiate(cfg.model.encoder)
    assert isinstance(encoder, BertModel)
    assert encoder.hidden_size == {"tiny": 64, "minilm": 384}[model]


def test_bert_base_offline_is_a_clear_checkpoint_error(compose_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    cfg = compose_cfg(["model=bert-base"])
    with pytest.raises(CheckpointError, match="model.encoder: could not load 'bert-base-uncased'"):
        build(cfg.model.encoder, "model.encoder")


@pytest.mark.parametrize("peft", options("peft"))
def test_peft_options_instantiate_and_apply(compose_cfg, peft):
    cfg = compose_cfg(["model=tiny", f"peft={peft}"])
    method = instantiate(cfg.peft)
    assert isinstance(method, PeftMethod) and cfg.trainer.optimizer.lr == cfg.peft.lr
    model = build_model(cfg, get_tasks(["sst"]), method)
    counts = param_counts(model)
    assert 0 < counts["params/trainable"] <= counts["params/total"]
    assert all(p.requires_grad for p in model.heads.parameters())  # heads always train


@pytest.mark.parametrize("heads", options("heads"))
def test_head_options_build_a_model(compose_cfg, heads):
    cfg = compose_cfg(["model=tiny", f"heads={heads}"])
    model = build_model(cfg, get_tasks(["sst", "para", "sts"]))
    assert model.heads["sst"].out.out_features == 5
    assert model.heads["sts"].joint == (heads == "joint")


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_options_instantiate(compose_cfg, trainer):
    from trainers.engine.loop import TrainingStrategy

    t = instantiate(compose_cfg([f"trainer={trainer}"]).trainer)
    assert isinstance(t, TrainingStrategy)


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_options_instantiate(compose_cfg, logger):
    lg = instantiate(compose_cfg([f"logger={logger}"]).logger)
    assert all(callable(getattr(lg, m)) for m in ("start", "log", "summary", "finish"))


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_presets_compose(compose_cfg, debug):
    cfg = compose_cfg([f"debug={debug}"])
    assert cfg.trainer.epochs == 1 and cfg.logger._target_.endswith("NullLogger")
    assert OmegaConf.to_container(cfg, resolve=True)


def test_unknown_group_choice_lists_the_valid_ones(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg(["heads=siamese"])
    assert all(o in str(e.value) for o in ("concat", "joint", "separate"))


def test_bad_values_are_config_errors_naming_the_key(compose_cfg):
    cfg = compose_cfg(["model=tiny", "heads.pair_regression.aggregator=euclid"])
    with pytest.raises(ConfigError, match=r"heads.pair_regression \(task sts\): unknown aggregator "
                                          r"'euclid'.*\['inner', 'cosine', 'sbert'\]"):
        build_model(cfg, get_tasks(["sts"]))
    with pytest.raises(ConfigError, match="trainer.epochs=0 must be a whole number >= 1"):
        build(compose_cfg(["trainer.epochs=0"]).trainer, "trainer")
    with pytest.raises(ConfigError, match="logger.mode='cloud'"):
        build(compose_cfg(["logger.mode=cloud"]).logger, "logger")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use device=cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("overrides,conflict", [
    (["peft=galore"], "conflicts with peft=galore"),
    (["peft=gradnormlorp"], "conflicts with peft=gradnormlorp"),
    (["optim.state_bits=8"], "conflicts with optim.state_bits=8"),
])
def test_a_configured_optimizer_is_never_silently_replaced(synthetic_root, tmp_path, overrides,
                                                           conflict):
    """GaLore and 8-bit states train with an AdamW of their own: another optimizer, or an AdamW
    option they cannot honour, stops the run naming both keys, before any training."""
    from conftest import compose_config, smoke_overrides
    from trainers.engine.run import run

    sgd = ["trainer.optimizer._target_=torch.optim.SGD", "~trainer.optimizer.weight_decay"]
    cfg = compose_config(smoke_overrides(synthetic_root, *overrides, *sgd))
    with pytest.raises(ConfigError, match=r"trainer.optimizer._target_=torch.optim.sgd.SGD "
                                          + conflict):
        run(cfg, tmp_path / "sgd")
    assert not (tmp_path / "sgd" / "history.jsonl").exists()  # stopped before training
    cfg = compose_config(smoke_overrides(synthetic_root, *overrides,
                                         "+trainer.optimizer.amsgrad=true"))
    with pytest.raises(ConfigError, match="trainer.optimizer.amsgrad is an option"):
        run(cfg, tmp_path / "amsgrad")


def test_sgd_alone_is_honoured(compose_cfg):
    from trainers.engine.optim import build_optimizer

    cfg = compose_cfg(["model=tiny", "trainer.optimizer._target_=torch.optim.SGD",
                       "+trainer.optimizer.momentum=0.9"])
    model = build_model(cfg, get_tasks(["sst"]))
    optimizer = build_optimizer(instantiate(cfg.trainer.optimizer), model, head_lr=1e-3)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9


@pytest.mark.parametrize("recipe", options("recipe"))
def test_recipes_compose_and_build(compose_cfg, recipe):
    cfg = compose_cfg([f"recipe={recipe}", "model=tiny"])
    assert cfg.precision in ("fp32", "bf16", "auto") and cfg.heads.design == "joint"
    trainer = build(cfg.trainer, "trainer")
    assert trainer.options.scheduler in ("constant", "linear", "cosine")
    assert build_model(cfg, get_tasks(["sst", "sts"])) is not None
