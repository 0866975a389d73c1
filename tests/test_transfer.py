"""train_lora.py: strict base restore, frozen base, adapter and merged outputs."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from chest_jax import checkpoint as ckpt
from chest_jax import loading
from chest_jax.lora import lora_leaves, params_fingerprint
from chest_jax.train import run_training
from chest_jax.trees import flatten
from conftest import REPO, TINY, quiet

LORA = ["ch_estimation.peft={r: 2, lora_alpha: 4, lora_dropout: 0.0}", "dataset.channel_type=[InF_Los]",
        "training.num_iter=10", "training.lr=1e-2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from chest_jax import config as C
    from conftest import tiny_overrides
    tmp = tmp_path_factory.mktemp("base")
    cfg = C.load(None, tiny_overrides(tmp, "training.num_iter=10", "training.saved_model_name=base"))
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    return result.run_dir


def _lora_cfg(tiny_cfg, base, *extra):
    return tiny_cfg(*LORA, f"training.pretrained_model_name={base}", *extra)


def _tree_without(tree, path):
    out = {k: (_tree_without(v, path[1:]) if isinstance(v, dict) and k == path[0] else v) for k, v in tree.items()}
    if len(path) == 1:
        out.pop(path[0])
    return out


def _broken_base(tmp_path, base_run, change):
    params = loading.model_params(loading.load_model(str(base_run))[0])
    cfg = ckpt.config_from_meta(ckpt.read_meta(base_run / "final"), base_run)
    params = change(params)
    path = tmp_path / "broken"
    ckpt.save_model(path, params, cfg, kind="base", step=0, fingerprint="")
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda p: _tree_without(_tree_without(p, ["ch_tf", "_layers", 0, "mha_k_proj", "bias"]),
                             ["ch_tf", "_linear", "bias"]),
     ["missing     ch_tf/_layers/0/mha_k_proj/bias", "missing     ch_tf/_linear/bias", "2 problems"]),
    (lambda p: {**p, "ch_tf": {**p["ch_tf"], "extra": np.zeros(3, np.float32)}}, ["unexpected  ch_tf/extra"]),
    (lambda p: {**p, "ch_tf": {**p["ch_tf"], "_embedding": np.zeros((31, 16), np.float32)}},
     ["mismatched  ch_tf/_embedding: expected (32, 16) float32, found (31, 16) float32"]),
    (lambda p: {**p, "ch_tf": {**p["ch_tf"], "_embedding": np.zeros((32, 16), np.float64)}},
     ["mismatched  ch_tf/_embedding", "float64"]),
])
def test_strict_restore_refuses_and_trains_nothing(tiny_cfg, tmp_path, base_run, change, expected):
    broken = _broken_base(tmp_path, base_run, change)
    cfg = _lora_cfg(tiny_cfg, broken)
    with pytest.raises(ckpt.CheckpointError) as e:
        run_training(cfg, kind="lora", log=quiet, progress=False)
    for text in expected:
        assert text in str(e.value)
    assert str(broken) in str(e.value) and "train_lora.py" in str(e.value) and "nothing was loaded" in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_wrong_model_config_is_refused_with_every_path(tiny_cfg, tmp_path, base_run):
    cfg = _lora_cfg(tiny_cfg, base_run, "ch_estimation.transformer.d_model=32")
    with pytest.raises(ckpt.CheckpointError) as e:
        run_training(cfg, kind="lora", log=quiet, progress=False)
    msg = str(e.value)
    assert "ch_estimation.transformer.d_model: checkpoint 16, config 32" in msg
    assert msg.count("mismatched") >= 10
    assert not (tmp_path / "runs").exists()


def test_lora_trains_only_lora_leaves(tiny_cfg, tmp_path, base_run):
    lines = []
    result = run_training(_lora_cfg(tiny_cfg, base_run), kind="lora", log=lines.append, progress=False)
    assert any("trainable" in l and "%" in l for l in lines)
    base = loading.model_params(loading.load_model(str(base_run))[0])
    trained = ckpt.restore_tree(result.run_dir / "checkpoints" / "10",
                                loading.abstract_model_params(_lora_model(base_run, result)), expected_from="test")
    lora = lora_leaves(trained)
    base_leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    trained_flat = dict(jax.tree_util.tree_flatten_with_path(trained)[0])
    for path, leaf in base_leaves:
        assert np.asarray(trained_flat[path]).tobytes() == np.asarray(leaf).tobytes(), path
    assert any(np.any(b != 0) for b in jax.tree.leaves(_only(lora, "lora_B")))


def _only(tree, name):
    if isinstance(tree, dict):
        return {k: _only(v, name) for k, v in tree.items() if isinstance(v, dict) or k == name}
    return tree


def _lora_model(base_run, result):
    model, _, _ = loading.load_model(f"{base_run}+{result.run_dir}")
    return model


def test_merged_equals_base_plus_adapter_and_adapter_checks_its_base(tiny_cfg, tmp_path, base_run):
    result = run_training(_lora_cfg(tiny_cfg, base_run), kind="lora", log=quiet, progress=False)
    merged, _, meta = loading.load_model(str(result.run_dir))
    assert meta["kind"] == "merged"
    unmerged = _lora_model(base_run, result)
    x = jax.random.normal(jax.random.key(1), (4, 1, 384, 2))
    np.testing.assert_allclose(loading.make_predict_fn(merged)(x)[0], loading.make_predict_fn(unmerged)(x)[0],
                               rtol=1e-5, atol=1e-5)
    adapter_meta = ckpt.read_meta(result.run_dir / "adapter")
    assert adapter_meta["base_fingerprint"] == params_fingerprint(
        loading.model_params(loading.load_model(str(base_run))[0]))
    # the merged model is a plain model: applying the adapter to it (a different base) is refused
    with pytest.raises(ckpt.CheckpointError, match="trained on a different base"):
        loading.load_model(f"{result.run_dir / 'final'}+{result.run_dir / 'adapter'}")


def test_finetune_continues_a_lora_run(tiny_cfg, base_run):
    fast = "training.validation_distances=[]"
    first = run_training(_lora_cfg(tiny_cfg, base_run, "training.saved_model_name=lora1", fast), kind="lora",
                         log=quiet, progress=False)
    first_adapter = flatten(ckpt.load_adapter(first.run_dir / "adapter")[0])
    # the first run trained lora_B away from its zero init, so a fresh adapter is told apart from it
    assert any(np.any(v != 0) for p, v in first_adapter.items() if p[-1] == "lora_B")
    # With num_warmup_steps=1 the schedule is 0 at the first step, so step 1's update is exactly zero and the
    # checkpoint of step 1 (model_save_step=1 keeps every step) holds the adapter finetune started from.
    cfg = _lora_cfg(tiny_cfg, first.run_dir, "training.model_load_mode=finetune", "training.saved_model_name=lora2",
                    "training.num_warmup_steps=1", "training.model_save_step=1", "training.num_iter=3", fast)
    second = run_training(cfg, kind="lora", log=quiet, progress=False)
    start = flatten(lora_leaves(ckpt.restore_tree(second.run_dir / "checkpoints" / "1",
                                                  loading.abstract_model_params(_lora_model(base_run, first)),
                                                  expected_from="test")))
    assert start.keys() == first_adapter.keys()
    for path, leaf in first_adapter.items():  # bit for bit: the first run's adapter, not a fresh init
        assert np.asarray(start[path]).tobytes() == np.asarray(leaf).tobytes(), path
    # and then it trained on from there
    b = flatten(ckpt.load_adapter(second.run_dir / "adapter")[0])
    assert any(not np.array_equal(b[p], first_adapter[p]) for p in first_adapter)
    assert ckpt.read_meta(second.run_dir / "adapter")["base_fingerprint"] == \
        ckpt.read_meta(first.run_dir / "adapter")["base_fingerprint"]


def _copy_of_base(base_run, path, change=None):
    """Save base_run's final model (optionally changed) as a base checkpoint at `path`; its fingerprint."""
    params = loading.model_params(loading.load_model(str(base_run))[0])
    if change is not None:
        params = change(params)
    cfg = ckpt.config_from_meta(ckpt.read_meta(base_run / "final"), base_run)
    fingerprint = params_fingerprint(params)
    ckpt.save_model(path, params, cfg, kind="base", step=10, fingerprint=fingerprint, overwrite=True)
    return fingerprint


def _nudged(params):
    bias = params["ch_tf"]["_linear"]["bias"]
    return {**params, "ch_tf": {**params["ch_tf"], "_linear": {**params["ch_tf"]["_linear"],
                                                               "bias": np.asarray(bias) + 1e-3}}}


def test_lora_resume_keeps_the_base_it_started_on(tiny_cfg, tmp_path, base_run):
    base_path = tmp_path / "base"
    original = _copy_of_base(base_run, base_path)
    cfg = _lora_cfg(tiny_cfg, base_path, "training.validation_distances=[]", "training.num_iter=4",
                    "training.evaluation_step=4", "training.model_save_step=4")
    first = run_training(cfg, kind="lora", stop_after=2, log=quiet, progress=False)
    assert first.interrupted and first.final_step == 2
    assert ckpt.read_meta(first.run_dir / "checkpoints" / "2")["base_fingerprint"] == original
    # another base at the same path (a valid checkpoint, its own fingerprint): --resume must refuse it, since
    # the run's adapter was trained on the base recorded in its checkpoint
    changed = _copy_of_base(base_run, base_path, _nudged)
    assert changed != original
    with pytest.raises(ckpt.CheckpointMismatchError, match="has changed since") as e:
        run_training(cfg, kind="lora", resume=True, log=quiet, progress=False)
    assert str(base_path) in str(e.value) and original[:12] in str(e.value) and changed[:12] in str(e.value)
    assert not (first.run_dir / "final").exists()
    # the original base back: the resumed run finishes and its adapter records that base
    assert _copy_of_base(base_run, base_path) == original
    done = run_training(cfg, kind="lora", resume=True, log=quiet, progress=False)
    assert done.final_step == 4 and not done.interrupted
    assert ckpt.read_meta(done.adapter_path)["base_fingerprint"] == original


# A tiny base run over 2 simulated CPU devices, stopped at its first step: which mesh run_training builds and
# where it places the arrays it hands the step. In a subprocess, since the device count is fixed at JAX start.
_MESH_PROBE = r"""
import json, sys
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from chest_jax import config as C, distributed, train

cfg = C.load(None, json.loads(sys.argv[1]))
calls, seen = [], {}
real_make_mesh, real_make_train_step = distributed.make_mesh, train.make_train_step

def recording_make_mesh(c):
    mesh = real_make_mesh(c)
    calls.append((c, mesh))
    return mesh

class Stop(Exception):
    pass

def recording_make_train_step(*args, **kwargs):
    seen["data_sharding"] = kwargs.get("data_sharding")
    def first_step(state, frozen, bank, distance_range, data_key, dropout_key):
        seen["placed"] = [x.sharding for x in jax.tree.leaves((state, frozen, bank, distance_range))]
        raise Stop
    return first_step

distributed.make_mesh, train.make_train_step = recording_make_mesh, recording_make_train_step
try:
    train.run_training(cfg, kind="base", log=lambda *_: None, progress=False)
except Stop:
    pass
mesh = calls[0][1] if calls else None
print(json.dumps({
    "calls": len(calls),
    "called_with_the_run_config": bool(calls) and calls[0][0] == cfg,
    "mesh_devices": [str(d) for d in mesh.devices.flat] if mesh else None,
    "cpu_devices": [str(d) for d in jax.devices("cpu")],
    "data_sharding_is_the_mesh_data_axis": mesh is not None and seen.get("data_sharding") == NamedSharding(mesh, P("data")),
    "num_placed": len(seen.get("placed", [])),
    "all_replicated_on_the_mesh": mesh is not None and all(s == NamedSharding(mesh, P()) for s in seen.get("placed", [])),
}))
"""


def test_run_training_shards_over_the_mesh_of_make_mesh(tmp_path):
    overrides = [*TINY, f"training.output_dir={tmp_path / 'runs'}", "training.device=cpu",
                 "training.validation_distances=[]"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", _MESH_PROBE, json.dumps(overrides)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # make_mesh is asked once, with the run's config, and gives the mesh over the devices of training.device
    assert r["calls"] == 1 and r["called_with_the_run_config"]
    assert len(r["cpu_devices"]) == 2 and r["mesh_devices"] == r["cpu_devices"]
    # the batch is sharded over that mesh's data axis; parameters, optimizer state, bank and distance range
    # are replicated on it
    assert r["data_sharding_is_the_mesh_data_axis"]
    assert r["num_placed"] > 10 and r["all_replicated_on_the_mesh"]
