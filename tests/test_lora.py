"""LoRA: injection by target name, exact start from the base, frozen base under training, merge, fingerprints."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chest_jax import checkpoint as ckpt
from chest_jax import config
from chest_jax import loading
from chest_jax.lora import LoRALinear, apply_lora, dropout_keys, merge_lora, params_fingerprint
from chest_jax.model import Estimator_v4, Linear, param_count
from chest_jax.train import run_training
from chest_jax.trees import path_str
from conftest import quiet, tiny_overrides

TINY_DMRS = (0, 384, 6)
PEFT_R8 = config.PeftConfig(r=8, lora_alpha=16.0, lora_dropout=0.1)


def tiny_cfg():
    return config.from_dict({
        "dataset": {"fft_size": 512, "num_guard_subcarriers": 128, "ref_conf_dict": {"dmrs": list(TINY_DMRS)}},
        "ch_estimation": {"cond": {"length": 384, "step_size": 12},
                          "transformer": {"length": 384, "num_layers": 2, "d_model": 32, "n_token": 32,
                                          "n_head": 4, "dim_feedforward": 64}},
    }).ch_estimation


def random_input(seed, batch=3, symbols=1):
    return jax.random.normal(jax.random.key(seed), (batch, symbols, 384, 2), jnp.float32)


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_default_config_r8_adds_114688_parameters():
    cfg = config.Config().ch_estimation

    def build():
        model = Estimator_v4(cfg, rngs=nnx.Rngs(0))
        apply_lora(model, PEFT_R8, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert param_count(lora_state) == 114_688
    assert param_count(nnx.state(model, nnx.Param)) == 1_712_152 + 114_688
    lora = flat(nnx.to_pure_dict(lora_state))
    assert len(lora) == 4 * 7 * 2
    layer0 = {path: leaf.shape for path, leaf in lora.items() if path.startswith("ch_tf/_layers/0/")}
    assert sum(np.prod(s) for s in layer0.values()) == 28_672
    assert layer0["ch_tf/_layers/0/cond_mha/out_proj/lora_A"] == (128, 8)
    assert layer0["ch_tf/_layers/0/mha/out_proj/lora_B"] == (8, 128)
    assert layer0["ch_tf/_layers/0/ffnn_linear1/lora_A"] == (128, 8)
    assert layer0["ch_tf/_layers/0/ffnn_linear1/lora_B"] == (8, 1024)


@pytest.fixture()
def base_and_lora():
    base = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))
    lora = nnx.clone(base)
    wrapped = apply_lora(lora, PEFT_R8, rngs=nnx.Rngs(1))
    return base, lora, wrapped


def test_apply_lora_wraps_every_target_and_keeps_base_paths(base_and_lora):
    base, lora, wrapped = base_and_lora
    assert len(wrapped) == 2 * 7
    assert "ch_tf._layers.1.cond_mha.out_proj" in wrapped and "ch_tf._layers.0.mha.out_proj" in wrapped
    assert "ch_tf._linear" not in wrapped
    _, _, base_state = nnx.split(lora, nnx.LoRAParam, nnx.Param)
    base_params = flat(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    lora_base_params = flat(nnx.to_pure_dict(base_state))
    assert lora_base_params.keys() == base_params.keys()
    for path in base_params:
        np.testing.assert_array_equal(lora_base_params[path], base_params[path])


def test_fresh_lora_model_equals_base_bit_for_bit(base_and_lora):
    base, lora, _ = base_and_lora
    x = random_input(0, symbols=14)
    for got, want in zip(lora(x), base(x)):
        np.testing.assert_array_equal(got, want)


def test_lora_linear_formula_and_dropout():
    layer = LoRALinear(6, 5, r=2, lora_alpha=3.0, lora_dropout=0.5, rngs=nnx.Rngs(0))
    layer.lora_B[...] = jax.random.normal(jax.random.key(1), (2, 5))
    layer.bias[...] = jnp.arange(5.0)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    expected = x @ layer.kernel[...] + layer.bias[...] + 1.5 * (x @ layer.lora_A[...] @ layer.lora_B[...])
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    holder = nnx.List([layer])  # dropout_keys finds the adapters held inside a module
    with dropout_keys(holder, jax.random.key(0)):
        dropped_a = layer(x)
    with dropout_keys(holder, jax.random.key(1)):
        dropped_b = layer(x)
    assert not np.allclose(dropped_a, dropped_b)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)  # no key: no dropout
    # PEFT's lora_A init: U(+-1/sqrt(in_features)).
    assert np.abs(layer.lora_A[...]).max() <= 1 / np.sqrt(6)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(6, 5, r=0, lora_alpha=1.0, rngs=nnx.Rngs(0))


def test_from_linear_keeps_weights():
    linear = Linear(4, 3, rngs=nnx.Rngs(0))
    wrapped = LoRALinear.from_linear(linear, r=2, alpha=2.0, dropout=0.0, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(wrapped.kernel[...], linear.kernel[...])
    np.testing.assert_array_equal(wrapped.bias[...], linear.bias[...])
    np.testing.assert_array_equal(wrapped.lora_B[...], 0.0)


def _nmse_loss(model, x, h_true, key):
    h_est, _ = model(x, deterministic=False, rngs=nnx.Rngs(dropout=key))
    err = jnp.sum(jnp.square(h_est - h_true), axis=(1, 2))
    return jnp.mean(err / jnp.sum(jnp.square(h_true), axis=(1, 2)))


def train_lora_steps(model, num_steps=3):
    """A few Adam steps on the LoRA leaves only: multi_transform with set_to_zero on the base leaves."""
    graphdef, params = nnx.split(model, nnx.Param)
    labels = jax.tree.map(lambda v: "lora" if isinstance(v, nnx.LoRAParam) else "frozen", params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    tx = optax.multi_transform(
        {"lora": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), "frozen": optax.set_to_zero()},
        labels)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, h_true, key):
        loss, grads = jax.value_and_grad(lambda p: _nmse_loss(nnx.merge(graphdef, p), x, h_true, key))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(num_steps):
        x = random_input(100 + i)
        h_true = jax.random.normal(jax.random.key(200 + i), (3, 384, 2))
        params, opt_state, _ = step(params, opt_state, x, h_true, jax.random.key(i))
    nnx.update(model, params)


def test_training_lora_only_moves_lora_leaves_and_merge_matches(base_and_lora):
    base, lora, wrapped = base_and_lora
    before = flat(nnx.to_pure_dict(nnx.state(lora, nnx.Param)))
    train_lora_steps(lora)
    _, lora_state, base_state = nnx.split(lora, nnx.LoRAParam, nnx.Param)
    after_base = flat(nnx.to_pure_dict(base_state))
    after_lora = flat(nnx.to_pure_dict(lora_state))
    assert after_base.keys() | after_lora.keys() == before.keys()
    for path, leaf in after_base.items():
        assert np.asarray(leaf).tobytes() == np.asarray(before[path]).tobytes(), path
    for path, leaf in after_lora.items():
        assert not np.array_equal(leaf, before[path]), f"LoRA leaf {path} did not train"
    # The out_proj adapters are live (the original's attention bypassed them, leaving lora_B at zero).
    assert np.any(after_lora["ch_tf/_layers/0/mha/out_proj/lora_B"])
    assert np.any(after_lora["ch_tf/_layers/0/cond_mha/out_proj/lora_B"])

    x = random_input(7, symbols=14)
    h_lora, eq_lora = lora(x)
    h_base, _ = base(x)
    assert not np.allclose(h_lora, h_base)
    merged = nnx.clone(lora)
    assert merge_lora(merged) == len(wrapped)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    merged_params = flat(nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
    assert merged_params.keys() == flat(nnx.to_pure_dict(nnx.state(base, nnx.Param))).keys()
    h_merged, _ = merged(x)
    np.testing.assert_allclose(h_merged, h_lora, rtol=1e-5, atol=1e-5 * float(jnp.abs(h_lora).max()))
    assert merge_lora(merged) == 0


def test_target_not_found_and_double_apply_are_errors(base_and_lora):
    base, lora, _ = base_and_lora
    bad = dataclasses.replace(PEFT_R8, target_modules=("mha_q_proj", "q_proj", "fc1"))
    with pytest.raises(ValueError, match=r"target modules not found.*\['fc1', 'q_proj'\]"):
        apply_lora(base, bad, rngs=nnx.Rngs(0))
    assert not jax.tree.leaves(nnx.state(base, nnx.LoRAParam)), "a failed apply_lora must not modify the model"
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lora, PEFT_R8, rngs=nnx.Rngs(0))


def test_subset_of_targets():
    model = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))
    wrapped = apply_lora(model, dataclasses.replace(PEFT_R8, target_modules=("out_proj",)), rngs=nnx.Rngs(0))
    assert sorted(wrapped) == sorted(f"ch_tf._layers.{i}.{m}.out_proj" for i in range(2) for m in ("mha", "cond_mha"))


def test_fingerprint_stable_and_sensitive(base_and_lora):
    base, _, _ = base_and_lora
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    fingerprint = params_fingerprint(params)
    assert fingerprint == params_fingerprint(params) == params_fingerprint(nnx.state(base, nnx.Param))
    # a SHA-256 hex digest: 64 lowercase hex digits
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    reordered = {"ch_tf": dict(reversed(list(params["ch_tf"].items())))}
    assert params_fingerprint(reordered) == fingerprint
    changed = jax.tree.map(lambda a: a, params)
    changed["ch_tf"]["_layers"][1]["norm2"]["bias"] = params["ch_tf"]["_layers"][1]["norm2"]["bias"].at[3].add(1e-6)
    assert params_fingerprint(changed) != fingerprint
    as_bf16 = jax.tree.map(lambda a: a, params)
    as_bf16["ch_tf"]["_embedding"] = params["ch_tf"]["_embedding"].astype(jnp.bfloat16)
    assert params_fingerprint(as_bf16) != fingerprint
    # the shape is hashed too: the same bytes as a flat vector
    embedding = params["ch_tf"]["_embedding"]
    reshaped = jax.tree.map(lambda a: a, params)
    reshaped["ch_tf"]["_embedding"] = embedding.reshape(-1)
    assert np.asarray(reshaped["ch_tf"]["_embedding"]).tobytes() == np.asarray(embedding).tobytes()
    assert params_fingerprint(reshaped) != fingerprint
    # and the path: the same arrays under other names
    renamed = {"ch_tf": {("renamed" if k == "_embedding" else k): v for k, v in params["ch_tf"].items()}}
    assert params_fingerprint(renamed) != fingerprint


# ---------------------------------------------------------------------------------------------
# LoRA dropout: rate, scaling and placement


def _identity_adapter(width, rate, base_kernel):
    """A LoRALinear (width -> width, r = width) with lora_A = lora_B = I, scaling 1 and the given base kernel."""
    layer = LoRALinear(width, width, r=width, lora_alpha=float(width), lora_dropout=rate, rngs=nnx.Rngs(0))
    layer.lora_A[...] = jnp.eye(width)
    layer.lora_B[...] = jnp.eye(width)
    layer.kernel[...] = base_kernel
    layer.bias[...] = jnp.zeros(width)
    return layer


def test_lora_dropout_rate_and_inverted_scaling_on_the_adapter_input():
    rate, width, rows = 0.3, 64, 400
    layer = _identity_adapter(width, rate, jnp.zeros((width, width)))
    assert layer.scaling == 1.0
    x = jnp.ones((rows, width))
    with dropout_keys(nnx.List([layer]), jax.random.key(7)):
        y = np.asarray(layer(x))
    # base path zero, adapter identity: y is dropout(x) itself, each entry 0 or 1 / (1 - rate)
    n = y.size
    zero = y == 0.0
    # each of the n entries is dropped independently with probability rate: 5 binomial standard deviations
    assert abs(zero.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[~zero], np.float32(1.0) / np.float32(1.0 - rate), rtol=1e-6)
    # an element-wise mask, not a whole-row one: a fully dropped row has probability 0.3^64
    assert not np.any(zero.all(axis=1))


def test_lora_dropout_never_touches_the_base_path():
    rate, width = 0.5, 32
    kernel = jax.random.normal(jax.random.key(3), (width, width))
    x = jax.random.normal(jax.random.key(4), (200, width))
    base = np.asarray(x @ kernel)
    key = jax.random.key(9)

    def call(layer):
        # each layer alone in its holder gets the same key, fold_in(key, 0), hence the same mask
        with dropout_keys(nnx.List([layer]), key):
            return np.asarray(layer(x))

    # lora_B zero: the adapter adds nothing, so dropout (on its input only) must change nothing
    silent = _identity_adapter(width, rate, kernel)
    silent.lora_B[...] = jnp.zeros((width, width))
    np.testing.assert_allclose(call(silent), base, rtol=1e-6, atol=1e-6)
    # the mask, read off an adapter-only layer (zero kernel): y = dropout(x)
    dropped = call(_identity_adapter(width, rate, jnp.zeros((width, width)))) == 0.0
    assert abs(dropped.mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / dropped.size)
    # both paths live: where the adapter's input is dropped the base output x W is still all there, elsewhere
    # x / (1 - rate) is added to it; nothing is dropped after the sum
    y = call(_identity_adapter(width, rate, kernel))
    np.testing.assert_allclose(y[dropped], base[dropped], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[~dropped], base[~dropped] + np.asarray(x)[~dropped] / (1 - rate),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# LoRA runs: the optimizer state, and LoRA dropout inside run_training

# Transformer dropout off, so LoRA dropout is the only randomness of the step besides the data; constant lr so
# both steps update.
_RUN = ["ch_estimation.transformer.dropout=0.0", "training.num_iter=2", "training.use_scheduler=false",
        "training.evaluation_step=2", "training.model_save_step=2", "training.logging_step=2",
        "training.validation_size=4", "training.validation_distances=[]", "dataset.channel_type=[InF_Los]"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """Three 2-step LoRA runs on one (untrained, saved) base: lora_dropout 0.5 twice and 0.0 once, one seed."""
    tmp = tmp_path_factory.mktemp("lora_runs")
    base_cfg = config.load(None, tiny_overrides(tmp, *_RUN))
    params = loading.model_params(loading.new_model(base_cfg, jax.random.key(0)))
    base = ckpt.save_model(tmp / "base", params, base_cfg, kind="base", step=0,
                           fingerprint=params_fingerprint(params))

    def run(name, rate):
        cfg = config.load(None, tiny_overrides(
            tmp, *_RUN, f"ch_estimation.peft={{r: 2, lora_alpha: 4, lora_dropout: {rate}}}",
            f"training.pretrained_model_name={base}", f"training.saved_model_name={name}"))
        return run_training(cfg, kind="lora", log=quiet, progress=False)

    return {"dropout": run("dropout", 0.5), "again": run("again", 0.5), "no_dropout": run("no_dropout", 0.0)}


def _adapter(result):
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(ckpt.load_adapter(result.adapter_path)[0])[0]}


def _stored_leaves(path, item):
    tree = ckpt.stored_tree(path, item)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return {path_str(p): tuple(leaf.shape) for p, leaf in leaves[0]}


def test_lora_optimizer_state_holds_only_lora_leaves(lora_runs):
    checkpoint = lora_runs["dropout"].run_dir / "checkpoints" / "2"
    params = _stored_leaves(checkpoint, "params")
    lora = {p: shape for p, shape in params.items() if p.rsplit("/", 1)[-1] in ("lora_A", "lora_B")}
    assert len(lora) == 2 * 7 and len(params) > len(lora)  # 7 adapted layers; the base leaves are saved too
    opt = _stored_leaves(checkpoint, "opt_state")
    moments = {"mu": {}, "nu": {}}
    for path, shape in opt.items():
        parts = path.split("/")
        if parts[-1] == "count":  # optax's step counters, scalars
            assert shape == ()
            continue
        at = [i for i, part in enumerate(parts) if part in moments]  # Adam's first and second moments
        assert at, f"optimizer leaf {path} is neither a step counter nor an Adam moment"
        moments[parts[at[0]]]["/".join(parts[at[0] + 1:])] = shape
    # each moment is exactly the LoRA leaves, at their paths and shapes: no kernel, bias or embedding
    assert moments["mu"] == lora and moments["nu"] == lora


def test_lora_dropout_in_a_run_changes_the_adapter_and_is_deterministic(lora_runs):
    dropped, again, plain = (_adapter(lora_runs[k]) for k in ("dropout", "again", "no_dropout"))
    assert dropped.keys() == plain.keys() == again.keys()
    # same config twice: bit-identical adapters (the masks come from fold_in(dropout_key, step))
    for path in dropped:
        assert dropped[path].tobytes() == again[path].tobytes(), path
    # the same seed without LoRA dropout trains another adapter: dropout acted on the training step
    assert any(not np.array_equal(dropped[p], plain[p]) for p in dropped if p.endswith("lora_B"))


@pytest.mark.parametrize("group", sorted(config.LORA_TARGET_GROUPS))
def test_target_groups_select_exactly_the_modules_they_name(group):
    """The transfer study's attention / ffn / all arms: each wraps every module of its group and nothing else."""
    model = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))
    modules = config.LORA_TARGET_GROUPS[group]
    wrapped = apply_lora(model, dataclasses.replace(PEFT_R8, target_modules=modules), rngs=nnx.Rngs(0))
    per_layer = {"mha_q_proj": ["mha_q_proj"], "mha_k_proj": ["mha_k_proj"], "mha_v_proj": ["mha_v_proj"],
                 "out_proj": ["mha.out_proj", "cond_mha.out_proj"], "ffnn_linear1": ["ffnn_linear1"],
                 "ffnn_linear2": ["ffnn_linear2"]}
    want = {f"ch_tf._layers.{i}.{path}" for i in range(2) for m in modules for path in per_layer[m]}
    assert set(wrapped) == want
