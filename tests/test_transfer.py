"""train_lora.py: strict base restore, frozen base, adapter and merged outputs."""
import jax
import numpy as np
import pytest

from chest_jax import checkpoint as ckpt
from chest_jax import loading
from chest_jax.lora import lora_leaves, params_fingerprint
from chest_jax.train import run_training
from conftest import quiet

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
    first = run_training(_lora_cfg(tiny_cfg, base_run, "training.saved_model_name=lora1"), kind="lora",
                         log=quiet, progress=False)
    cfg = _lora_cfg(tiny_cfg, first.run_dir, "training.model_load_mode=finetune", "training.saved_model_name=lora2")
    second = run_training(cfg, kind="lora", log=quiet, progress=False)
    a = lora_leaves(ckpt.load_adapter(first.run_dir / "adapter")[0])
    b = lora_leaves(ckpt.load_adapter(second.run_dir / "adapter")[0])
    diffs = [float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    assert max(diffs) > 0
    assert ckpt.read_meta(second.run_dir / "adapter")["base_fingerprint"] == \
        ckpt.read_meta(first.run_dir / "adapter")["base_fingerprint"]
