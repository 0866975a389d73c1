import json

import jax
import numpy as np
import pytest

from chest_jax import checkpoint as ckpt
from chest_jax import config as C
from chest_jax import loading
from chest_jax.train import TrainingError, run_training
from conftest import quiet


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_params(run_dir):
    model, _, _ = loading.load_model(str(run_dir))
    return loading.model_params(model)


def test_training_reduces_the_loss(tiny_cfg):
    # an easy channel population (nearly flat RMa, no random delay) so a tiny model learns within 60 steps
    cfg = tiny_cfg("training.num_iter=60", "training.evaluation_step=60", "training.model_save_step=60",
                   "training.logging_step=5", "ch_estimation.transformer.dropout=0.0", "training.lr=1e-2",
                   "training.num_warmup_steps=5", "dataset.max_random_tap_delay_cp_proportion=0",
                   "dataset.channel_type=[RMa_Los]")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    losses = [m["loss"] for m in _metrics(result.run_dir) if "loss" in m]
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:2])
    assert (result.run_dir / "final").is_dir() and (result.run_dir / "config.yaml").is_file()
    assert list((result.run_dir / "plots").glob("eval_*.png"))
    assert result.val_nmse_db is not None and np.isfinite(result.val_nmse_db)


def test_save_restore_gives_identical_outputs(tiny_cfg):
    cfg = tiny_cfg("training.num_iter=5")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    model, saved_cfg, meta = loading.load_model(str(result.run_dir))
    assert saved_cfg == cfg and meta["kind"] == "base" and meta["step"] == 5
    x = jax.random.normal(jax.random.key(0), (3, 1, 384, 2))
    again, _, _ = loading.load_model(str(result.run_dir / "final"))
    np.testing.assert_array_equal(loading.make_predict_fn(model)(x)[0], loading.make_predict_fn(again)(x)[0])
    ckpt_params = ckpt.restore_tree(result.run_dir / "checkpoints" / "5", loading.abstract_model_params(model),
                                    expected_from="test")
    jax.tree.map(np.testing.assert_array_equal, ckpt_params, loading.model_params(model))


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, tiny_cfg):
    full = tiny_cfg("training.saved_model_name=full")
    run_training(full, kind="base", log=quiet, progress=False)
    part = tiny_cfg("training.saved_model_name=part")
    first = run_training(part, kind="base", stop_after=7, log=quiet, progress=False)
    assert first.interrupted and first.final_step == 7 and not (first.run_dir / "final").exists()
    second = run_training(part, kind="base", resume=True, log=quiet, progress=False)
    assert second.final_step == 20
    jax.tree.map(np.testing.assert_array_equal, _final_params(first.run_dir), _final_params(tmp_path / "runs/full"))


def test_existing_run_is_never_overwritten_silently(tiny_cfg):
    cfg = tiny_cfg("training.num_iter=2")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    before = (result.run_dir / "final").stat().st_mtime_ns
    with pytest.raises(TrainingError, match="already holds a run.*--resume.*saved_model_name.*--overwrite"):
        run_training(cfg, kind="base", log=quiet, progress=False)
    assert (result.run_dir / "final").stat().st_mtime_ns == before
    run_training(cfg, kind="base", overwrite=True, log=quiet, progress=False)
    with pytest.raises(TrainingError, match="config differs"):
        run_training(C.load(None, [*_overrides_of(cfg), "training.lr=0.5"]), kind="base", resume=True, log=quiet,
                     progress=False)


def _overrides_of(cfg):
    from conftest import TINY
    return [*TINY, f"training.output_dir={cfg.training.output_dir}", "training.num_iter=2"]


def test_config_error_stops_before_training(tiny_cfg, tmp_path):
    with pytest.raises(C.ConfigError, match="ch_estimation.peft"):
        run_training(tiny_cfg(), kind="lora", log=quiet, progress=False)
    with pytest.raises(C.ConfigError, match="pretrained_model_name"):
        run_training(tiny_cfg("ch_estimation.peft={r: 2}"), kind="lora", log=quiet, progress=False)
    assert not (tmp_path / "runs").exists()


def test_lora_without_a_base_stops_before_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg("ch_estimation.peft={r: 2}", "training.pretrained_model_name=" + str(tmp_path / "nothing"))
    with pytest.raises(ckpt.CheckpointError, match="no model checkpoint found"):
        run_training(cfg, kind="lora", log=quiet, progress=False)
    assert not (tmp_path / "runs").exists()


def test_wandb_without_network_falls_back_to_offline(tiny_cfg, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    from chest_jax import runlog
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(runlog, "_network_reachable", lambda *a, **k: False)
    lines = []
    cfg = tiny_cfg("training.num_iter=2", "training.use_wandb=true", "training.wandb_mode=online")
    result = run_training(cfg, kind="base", log=lines.append, progress=False)
    assert any("no network" in l and "offline" in l and "wandb sync" in l for l in lines), lines
    assert list((result.run_dir / "wandb").glob("offline-run-*"))
    assert (result.run_dir / "final").is_dir()


@pytest.mark.parametrize("change", ["ch_estimation.transformer.n_head=4", "ch_estimation.residual=add",
                                    "ch_estimation.transformer.activation=gelu"])
def test_base_restore_refuses_settings_that_change_the_function_but_not_the_shapes(tiny_cfg, change):
    """n_head, the activation and the residual variant leave every parameter shape alone: a strict structure
    check passes, so the stored config must refuse them, or the base would compute something else silently."""
    result = run_training(tiny_cfg("training.num_iter=2"), kind="base", log=quiet, progress=False)
    with pytest.raises(ckpt.CheckpointMismatchError, match=change.split("=")[0].replace(".", r"\.")):
        loading.restore_base(result.run_dir, tiny_cfg(change), config_source="test")
    loading.restore_base(result.run_dir, tiny_cfg("ch_estimation.transformer.dropout=0.3"), config_source="test")


def test_residual_base_trains_saves_and_reloads_as_residual(tiny_cfg):
    cfg = tiny_cfg("training.num_iter=4", "ch_estimation.residual=gated", "ch_estimation.reference=lmmse_adaptive",
                   "training.loss=nmse_db")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    model, saved_cfg, _ = loading.load_model(str(result.run_dir))
    assert (saved_cfg.ch_estimation.residual, saved_cfg.ch_estimation.reference) == ("gated", "lmmse_adaptive")
    assert (model.residual, model.reference) == ("gated", "lmmse_adaptive")
    assert np.any(np.asarray(model.ch_tf._linear.kernel[...]))  # the zero-initialised output layer moved
    # a base trained on one reference does not restore as a model of another (same shapes, other function)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"ch_estimation\.reference"):
        loading.restore_base(result.run_dir, tiny_cfg("ch_estimation.residual=gated"), config_source="test")
    # the summary records what the run is read against: the pilot-only estimators on the same validation sets
    summary = json.loads((result.run_dir / "summary.json").read_text())
    refs = summary["validation_references"]
    assert set(refs) == {"ls_linear", "lmmse_robust", "lmmse_adaptive", "lmmse_pdp"}
    assert set(refs["ls_linear"]) == {k for k in summary if k.startswith("val_")}


def test_pilot_queries_base_trains_reloads_and_refuses_the_default_model(tiny_cfg):
    cfg = tiny_cfg("training.num_iter=4", "ch_estimation.queries=pilots", "training.loss=nmse_db")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    model, saved_cfg, _ = loading.load_model(str(result.run_dir))
    assert saved_cfg.ch_estimation.queries == "pilots" and hasattr(model.ch_tf, "_query_proj")
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"ch_estimation\.queries: checkpoint 'pilots'"):
        loading.restore_base(result.run_dir, tiny_cfg(), config_source="test")


def _train_on_cpu_devices(tmp_path, devices, *extra):
    import os
    import subprocess
    import sys

    from conftest import REPO, tiny_overrides
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, str(REPO / "train_base.py"), "--no-progress",
                           *tiny_overrides(tmp_path, "training.saved_model_name=dp", *extra)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("extra", [(), ("ch_estimation.residual=gated", "ch_estimation.reference=lmmse_pdp")],
                         ids=["default", "lmmse_pdp"])
def test_training_data_parallel_over_two_cpu_devices_matches_one_device(tmp_path, tiny_cfg, extra):
    # XLA_FLAGS=--xla_force_host_platform_device_count=2: the batch is sharded over two CPU devices (one per
    # core). Same data, dropout masks and updates; only the gradient's summation order differs. lmmse_pdp: its
    # per-sample Cholesky loop runs per device (it deadlocked there as one batched call).
    proc = _train_on_cpu_devices(tmp_path, 2, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "devices: 2 x cpu" in proc.stdout + proc.stderr
    single = run_training(tiny_cfg("training.saved_model_name=single", *extra), kind="base", log=quiet,
                          progress=False)
    parallel = json.loads((tmp_path / "runs" / "dp" / "summary.json").read_text())
    assert parallel["steps"] == single.final_step
    assert abs(parallel["val_nmse_db"] - single.val_nmse_db) < 0.01
    a, b = _final_params(tmp_path / "runs" / "dp"), _final_params(single.run_dir)
    # Adam divides by sqrt(v): where a gradient is near zero its rounding difference is amplified (JAX_NOTES)
    worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert worst < 2e-3, worst
