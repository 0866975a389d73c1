import dataclasses

import pytest
from conftest import REPO

from chest_jax import config as C


def test_defaults_are_the_originals():
    cfg = C.load(None)
    assert cfg.dataset.fft_size == 4096 and cfg.dataset.num_used_subcarriers == 3072
    assert cfg.dataset.ref_conf_dict.dmrs == (0, 3072, 6)
    assert cfg.ch_estimation.transformer.d_model == 128 and cfg.ch_estimation.transformer.n_token == 256
    assert cfg.training.lr == 1e-4 and cfg.training.max_norm == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0


SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def test_every_shipped_config_is_listed():
    assert len(SHIPPED) >= 11 and "configs/base_best.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_load(path):
    cfg = C.load(REPO / path)
    assert cfg.to_dict()["dataset"]["channel_type"]


def test_best_full_size_recipe_is_the_original_run_with_the_chosen_changes_only():
    base, best = C.load(REPO / "configs/base.yaml").to_dict(), C.load(REPO / "configs/base_best.yaml").to_dict()
    changed = {(s, k) for s in base for k in base[s] if isinstance(base[s], dict) and base[s][k] != best[s][k]}
    assert changed == {("ch_estimation", "queries"), ("ch_estimation", "residual"), ("ch_estimation", "reference"),
                       ("training", "loss"), ("training", "saved_model_name")}
    assert best["ch_estimation"]["queries"] == "pilots" and best["training"]["loss"] == "nmse_db"


def test_lora_configs_have_peft_and_inherit_the_base():
    cfg = C.load("configs/lora_inf.yaml")
    assert cfg.ch_estimation.peft.r == 8 and cfg.training.lr == 1e-5 and cfg.training.num_iter == 200_000
    assert cfg.dataset.channel_type == ("InF_Los", "InF_Nlos")
    assert cfg.ch_estimation.transformer.num_layers == C.load("configs/base.yaml").ch_estimation.transformer.num_layers


def test_overrides_parse_yaml_values():
    cfg = C.load(None, ["training.lr=3e-4", "dataset.channel_type=[InF_Los, RMa_Nlos]",
                        "ch_estimation.transformer.d_model=64", "training.use_wandb=true"])
    assert cfg.training.lr == pytest.approx(3e-4)
    assert cfg.dataset.channel_type == ("InF_Los", "RMa_Nlos")
    assert cfg.ch_estimation.transformer.d_model == 64 and cfg.training.use_wandb is True


def test_round_trip_through_yaml(tmp_path):
    cfg = C.load("configs/lora_inf.yaml", ["training.lr=2e-5"])
    C.dump(cfg, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, words", [
    (["dataset.foo=1"], ["unknown key dataset.foo", "allowed keys in dataset", "channel_type"]),
    (["trainin.lr=1"], ["unknown key trainin", "allowed keys"]),
    (["dataset.channel_type=[InF_LOS]"], ["dataset.channel_type[0]", "'InF_LOS'", "InF_Los"]),
    (["training.lr=fast"], ["training.lr", "'fast'", "a number"]),
    (["dataset.batch_size=3.5"], ["dataset.batch_size", "an integer"]),
    (["ch_estimation.cond.step_size=7"], ["ch_estimation.cond.length", "3072", "multiple of", "step_size=7"]),
    (["dataset.distance_range=[-10, 50]"], ["dataset.distance_range", "positive"]),
    (["dataset.distance_range=[100, 50]"], ["dataset.distance_range", "low <= high"]),
    (["training.optimizer=rmsprop"], ["training.optimizer", "'adam'", "'sgd'"]),
    (["ch_estimation.transformer.n_head=7"], ["n_head", "divide d_model=128"]),
    (["ch_estimation.peft.target_modules=[q_proj]"], ["target_modules[0]", "mha_q_proj"]),
    (["dataset.mod_order=32"], ["dataset.mod_order", "square QAM"]),
    (["dataset.pdp_dir=/nonexistent/dir"], ["dataset.pdp_dir", "existing directory"]),
    (["training.lr"], ["expected section.key=value"]),
])
def test_config_errors_name_key_value_and_fix(override, words):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, override)
    for w in words:
        assert w in str(e.value)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  channel_type: [InF_Los]\n  distance_range: [50, -1]\n")
    with pytest.raises(C.ConfigError, match=str(bad)):
        C.load(bad)
    (tmp_path / "broken.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(tmp_path / "broken.yaml")
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")
