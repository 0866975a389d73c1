"""Estimator_v4: parameter tree, shapes, init, dropout, invariances, and a NumPy re-derivation from SPEC 3."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chest_jax import config, references
from chest_jax.model import Estimator_v4, abstract_params, param_count, positional_encoding_sine, zero_forcing_equalize

TINY_DMRS = (0, 384, 6)
TINY_CP = config.DatasetConfig().cp_fraction  # the default 590 ns CP at 120 kHz: 0.0708 of the symbol


def tiny_cfg(**transformer):
    tf = dict(length=384, num_layers=2, d_model=32, n_token=32, n_head=4, dim_feedforward=64)
    tf.update(transformer)
    return config.from_dict({
        "dataset": {"fft_size": 512, "num_guard_subcarriers": 128, "ref_conf_dict": {"dmrs": list(TINY_DMRS)}},
        "ch_estimation": {"cond": {"length": 384, "step_size": 12}, "transformer": tf},
    }).ch_estimation


def random_input(seed, batch=3, symbols=14, k=384):
    return jax.random.normal(jax.random.key(seed), (batch, symbols, k, 2), jnp.float32)


@pytest.fixture(scope="module")
def tiny_model():
    return Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))


def flat_shapes(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_default_tree(num_layers=4, d=128, ff=1024, cond_d=24, n_token=256, k=3072):
    tree = {"ch_tf/_embedding": (n_token, d), "ch_tf/_linear/kernel": (d, 2 * k // n_token),
            "ch_tf/_linear/bias": (2 * k // n_token,)}
    for i in range(num_layers):
        p = f"ch_tf/_layers/{i}/"
        for norm in ("norm1", "norm2", "norm3"):
            tree[p + norm + "/scale"] = (d,)
            tree[p + norm + "/bias"] = (d,)
        for proj in ("mha_q_proj", "mha_k_proj", "mha_v_proj"):
            tree[p + proj + "/kernel"] = (d, d)
            tree[p + proj + "/bias"] = (d,)
        for mha, kdim in (("mha", d), ("cond_mha", cond_d)):
            tree[p + mha + "/q_proj_weight"] = (d, d)
            tree[p + mha + "/k_proj_weight"] = (kdim, d)
            tree[p + mha + "/v_proj_weight"] = (kdim, d)
            tree[p + mha + "/in_proj_bias"] = (3 * d,)
            tree[p + mha + "/out_proj/kernel"] = (d, d)
            tree[p + mha + "/out_proj/bias"] = (d,)
        tree[p + "ffnn_linear1/kernel"] = (d, ff)
        tree[p + "ffnn_linear1/bias"] = (ff,)
        tree[p + "ffnn_linear2/kernel"] = (ff, d)
        tree[p + "ffnn_linear2/bias"] = (d,)
    return tree


def test_default_config_parameter_tree_and_count():
    cfg = config.Config().ch_estimation
    params = abstract_params(cfg)
    assert flat_shapes(params) == expected_default_tree()
    assert param_count(params) == 1_712_152
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    # Positional encodings are constants, not state: the whole state is exactly the parameters.
    abstract_model = nnx.eval_shape(lambda: Estimator_v4(cfg, rngs=nnx.Rngs(0)))
    assert flat_shapes(nnx.to_pure_dict(nnx.state(abstract_model))) == flat_shapes(params)


@pytest.mark.parametrize("symbols", [14, 1])
def test_output_shapes_and_dtypes(tiny_model, symbols):
    h_est, eq = tiny_model(random_input(1, batch=2, symbols=symbols))
    assert h_est.shape == (2, 384, 2) and h_est.dtype == jnp.float32
    assert eq.shape == (2, symbols, 384, 2) and eq.dtype == jnp.float32
    assert np.isfinite(h_est).all() and np.isfinite(eq).all()


def test_init_matches_original(tiny_model):
    params = nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))
    layer = params["ch_tf"]["_layers"][0]
    for norm in ("norm1", "norm2", "norm3"):
        np.testing.assert_array_equal(layer[norm]["scale"], 1.0)
        np.testing.assert_array_equal(layer[norm]["bias"], 0.0)
    for name in ("mha_q_proj", "ffnn_linear1", "ffnn_linear2"):
        np.testing.assert_array_equal(layer[name]["bias"], 0.0)
        kernel = np.asarray(layer[name]["kernel"])
        bound = math.sqrt(6.0 / sum(kernel.shape))  # xavier-uniform
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    k_proj = np.asarray(layer["cond_mha"]["k_proj_weight"])
    assert np.abs(k_proj).max() <= math.sqrt(6.0 / (24 + 32))
    np.testing.assert_array_equal(layer["cond_mha"]["in_proj_bias"], 0.0)
    out_proj = np.asarray(layer["mha"]["out_proj"]["kernel"])  # torch MHA leaves out_proj at nn.Linear's init
    assert np.abs(out_proj).max() <= 1 / math.sqrt(32) and np.abs(out_proj).max() > 0.9 / math.sqrt(32)
    embedding = np.asarray(params["ch_tf"]["_embedding"])
    assert abs(embedding.mean()) < 0.1 and abs(embedding.std() - 1.0) < 0.1


def test_eval_deterministic_and_train_applies_dropout(tiny_model):
    x = random_input(2)
    h_eval, _ = tiny_model(x)
    h_eval_with_rngs, _ = tiny_model(x, deterministic=True, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(h_eval, h_eval_with_rngs)
    h_a, _ = tiny_model(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    h_a_again, _ = tiny_model(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    h_b, _ = tiny_model(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(h_a, h_a_again)
    assert not np.allclose(h_a, h_b) and not np.allclose(h_a, h_eval)


def test_train_mode_without_rngs_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
        tiny_model(random_input(0), deterministic=False)


def test_wrong_input_shape_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="384"):
        tiny_model(jnp.zeros((2, 14, 512, 2)))


@pytest.mark.parametrize("a", [1e-3, 3.7, 250.0])
def test_scale_equivariance(tiny_model, a):
    x = random_input(3)
    h, _ = tiny_model(x)
    h_scaled, _ = tiny_model(a * x)
    np.testing.assert_allclose(h_scaled, a * h, rtol=1e-5, atol=1e-6 * a)


def test_only_symbol0_pilots_enter_the_estimate(tiny_model):
    x = random_input(4)
    not_pilot = np.ones((14, 384, 1), bool)
    not_pilot[0, slice(*TINY_DMRS)] = False
    x_changed = jnp.where(not_pilot, random_input(5), x)
    h, eq = tiny_model(x)
    h_changed, eq_changed = tiny_model(x_changed)
    np.testing.assert_array_equal(h, h_changed)
    assert not np.allclose(eq, eq_changed)


def test_all_zero_input_gives_finite_output_and_gradient(tiny_model):
    h, eq = tiny_model(jnp.zeros((2, 14, 384, 2)))
    assert np.isfinite(h).all() and np.isfinite(eq).all()
    graphdef, params = nnx.split(tiny_model, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.zeros((2, 1, 384, 2)))[0]))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_equalizer_is_zero_forcing_without_gradient(tiny_model):
    x = random_input(6, batch=2)
    h, eq = tiny_model(x)
    y_c = np.asarray(x[..., 0]) + 1j * np.asarray(x[..., 1])
    h_c = np.asarray(h[..., 0]) + 1j * np.asarray(h[..., 1])
    expected = y_c * np.conj(h_c)[:, None] / np.abs(h_c[:, None]) ** 2
    np.testing.assert_allclose(np.asarray(eq[..., 0]) + 1j * np.asarray(eq[..., 1]), expected, rtol=1e-4, atol=1e-5)
    graphdef, params = nnx.split(tiny_model, nnx.Param)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)[1]))(params)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))


def test_gelu_and_relu_differ():
    x = random_input(7)
    h_relu, _ = Estimator_v4(tiny_cfg(activation="relu"), TINY_DMRS, rngs=nnx.Rngs(0))(x)
    h_gelu, _ = Estimator_v4(tiny_cfg(activation="gelu"), TINY_DMRS, rngs=nnx.Rngs(0))(x)
    assert not np.allclose(h_relu, h_gelu, atol=1e-4)


def test_jit_matches_eager_in_eval_and_train(tiny_model):
    x = random_input(8)
    graphdef, params = nnx.split(tiny_model, nnx.Param)

    def forward(p, x, key, deterministic):
        return nnx.merge(graphdef, p)(x, deterministic=deterministic, rngs=nnx.Rngs(dropout=key))

    key = jax.random.key(3)
    jitted = jax.jit(forward, static_argnums=3)
    for deterministic in (True, False):
        h_eager, eq_eager = forward(params, x, key, deterministic)
        h_jit, eq_jit = jitted(params, x, key, deterministic)
        np.testing.assert_allclose(h_jit, h_eager, rtol=1e-5, atol=1e-5)
        # eq = Y / H amplifies H's float32 rounding where |H| is small, so compare each with the equalizer of its
        # own estimate rather than eq_jit with eq_eager elementwise.
        for h, eq in ((h_jit, eq_jit), (h_eager, eq_eager)):
            np.testing.assert_allclose(eq, zero_forcing_equalize(x, h), rtol=1e-5, atol=1e-5)


def test_bfloat16_mixed_precision_keeps_float32_params_and_outputs():
    x = random_input(9)
    model32 = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))
    model16 = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    h32, _ = model32(x)
    h16, eq16 = model16(x)
    assert h16.dtype == jnp.float32 and eq16.dtype == jnp.float32
    relative_error = float(jnp.linalg.norm(h16 - h32) / jnp.linalg.norm(h32))
    assert 0 < relative_error < 0.05


def test_bfloat16_matmuls_take_bfloat16_operands_and_accumulate_in_float32():
    """Every matmul of the bf16 forward is bf16 x bf16 -> f32 (the float32 parameter folds aside), and XLA:CPU
    keeps such dots in bfloat16; a bf16 -> bf16 dot, which it rewrites into a float32 dot on converted operands,
    is emitted nowhere. In float32 every matmul is float32."""
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO / "benchmarks"))
    import precision_hlo

    x = random_input(9)
    for dtype, expected in ((jnp.bfloat16, {"bf16 x bf16 -> f32", "f32 x f32 -> f32"}),
                            (jnp.float32, {"f32 x f32 -> f32"})):
        model = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0), compute_dtype=dtype)
        graphdef, state = nnx.split(model)
        lowered = jax.jit(lambda st, inputs: nnx.merge(graphdef, st)(inputs)[0]).lower(state, x)
        emitted = precision_hlo.lowered_dots(lowered.as_text())
        assert set(emitted) == expected, emitted
        if dtype == jnp.bfloat16:
            # the per-token matmuls (projections, feed-forward, output layer) are bf16: more than the f32 folds
            assert emitted["bf16 x bf16 -> f32"] > emitted["f32 x f32 -> f32"], emitted
            if jax.default_backend() == "cpu":
                compiled = precision_hlo.compiled_dots(lowered.compile().as_text())
                assert compiled.get("bf16 x bf16 -> f32", 0) > 0 and "bf16 x bf16 -> bf16" not in compiled, compiled


def test_positional_encoding_formula():
    n, d = 32, 24
    pe = positional_encoding_sine(n, d)
    assert pe.shape == (n, d) and pe.dtype == np.float32
    i = np.arange(1, n + 1)[:, None]
    j = np.arange(d)[None, :]
    angle = (i / (n + 1e-6) * 2 * np.pi * n) / n ** (2 * (j // 2) / d)
    np.testing.assert_allclose(pe, np.where(j % 2 == 0, np.sin(angle), np.cos(angle)), atol=5e-5)


# ---------------------------------------------------------------------------------------------------------
# An independent NumPy (float64) re-derivation of the whole forward pass from SPEC 3, in the original's
# token-major (token, batch, feature) layout.

def _np_layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_mha(query, key, value, p, n_head):
    d = query.shape[-1]
    b_q, b_k, b_v = np.split(p["in_proj_bias"], 3)
    q = (query @ p["q_proj_weight"] + b_q).reshape(*query.shape[:2], n_head, d // n_head)
    k = (key @ p["k_proj_weight"] + b_k).reshape(*key.shape[:2], n_head, d // n_head)
    v = (value @ p["v_proj_weight"] + b_v).reshape(*value.shape[:2], n_head, d // n_head)
    logits = np.einsum("qbhe,kbhe->bhqk", q, k) / np.sqrt(d // n_head)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,kbhe->qbhe", weights, v).reshape(query.shape[0], query.shape[1], d)
    return out @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def _np_pe(n, d):
    i = np.arange(1, n + 1)[:, None]
    j = np.arange(d)[None, :]
    angle = (i / (n + 1e-6) * 2 * np.pi * n) / n ** (2 * (j // 2) / d)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle))


def numpy_reference(params, x, *, n_head, step, n_token, dmrs, activation):
    x = np.asarray(x, np.float64)
    batch, _, k, _ = x.shape
    idx = np.arange(*dmrs)
    c = np.zeros((batch, 2, k))
    c[:, :, idx] = x[:, 0, idx, :].transpose(0, 2, 1)
    s = np.sqrt((c ** 2).sum((1, 2)) / k)[:, None, None]
    c = c / s
    cond = c.reshape(batch, 2, k // step, step).transpose(2, 0, 1, 3).reshape(k // step, batch, 2 * step)
    tf = params["ch_tf"]
    emb = tf["_embedding"]
    h = np.repeat(emb[:, None, :], batch, axis=1)
    pe = _np_pe(n_token, emb.shape[1])[:, None, :]
    cond_pe = _np_pe(k // step, 2 * step)[:, None, :]
    act = {"relu": lambda v: np.maximum(v, 0),
           "gelu": lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / np.sqrt(2)))}[activation]
    dense = lambda v, p: v @ p["kernel"] + p["bias"]  # noqa: E731
    for i in sorted(tf["_layers"]):
        p = tf["_layers"][i]
        n = _np_layer_norm(h, p["norm1"])
        q, kk, v = dense(n, p["mha_q_proj"]), dense(n, p["mha_k_proj"]), dense(n, p["mha_v_proj"])
        h = h + _np_mha(q + pe, kk + pe, v, p["mha"], n_head)
        n = _np_layer_norm(h, p["norm2"])
        h = h + _np_mha(dense(n, p["mha_q_proj"]) + pe, cond + cond_pe, cond, p["cond_mha"], n_head)
        n = _np_layer_norm(h, p["norm3"])
        h = h + dense(act(dense(n, p["ffnn_linear1"])), p["ffnn_linear2"])
    y = dense(h, tf["_linear"])  # (token, batch, 2 * K / n_token)
    y = y.reshape(n_token, batch, 2, -1).transpose(1, 2, 0, 3).reshape(batch, 2, k) * s
    return y.transpose(0, 2, 1)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_matches_numpy_rederivation_of_spec(activation):
    model = Estimator_v4(tiny_cfg(activation=activation), TINY_DMRS, rngs=nnx.Rngs(4))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    # Non-zero biases and norms, so every bias and LayerNorm parameter is exercised.
    params = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(a.size).standard_normal(a.shape), params)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params))
    nnx.update(model, state)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    x = random_input(10, batch=2, symbols=2)
    h, _ = model(x)
    expected = numpy_reference(params, x, n_head=4, step=12, n_token=32, dmrs=TINY_DMRS, activation=activation)
    np.testing.assert_allclose(h, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_attention_gradient_written_out_equals_autodiff_of_its_forward(rate):
    """`_attention_core`'s hand-written backward against jax.grad of the same forward, with and without a dropout
    mask; the forward is the one the model always ran (eval: no mask)."""
    from chest_jax import rng
    from chest_jax.model import _attention_core, _attention_forward
    ks = jax.random.split(jax.random.key(0), 4)
    q, kt, v = (jax.random.normal(k, shape) for k, shape in zip(ks, [(2, 3, 8, 4), (2, 3, 4, 8), (2, 3, 8, 4)]))
    w = jax.random.normal(ks[3], (2, 3, 8, 4))
    seed = None if rate == 0.0 else rng.hash_seed(jax.random.key(5))
    written = jax.grad(lambda *a: jnp.sum(_attention_core(*a, seed, rate) * w), argnums=(0, 1, 2))(q, kt, v)
    autodiff = jax.grad(lambda *a: jnp.sum(_attention_forward(*a, seed, rate)[0] * w), argnums=(0, 1, 2))(q, kt, v)
    for a, b in zip(written, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
        assert float(jnp.max(jnp.abs(b))) > 1e-3  # a real gradient, not two zeros agreeing
    if seed is not None:  # the mask drops something, and the same key drops the same entries
        out = _attention_core(q, kt, v, seed, rate)
        assert not np.allclose(out, _attention_core(q, kt, v, None, rate))
        np.testing.assert_array_equal(out, _attention_core(q, kt, v, rng.hash_seed(jax.random.key(5)), rate))


def test_dropout_masks_keep_the_right_fraction_and_are_independent():
    from chest_jax.rng import hash_bits as dropout_bits
    bits = np.asarray(dropout_bits(jax.random.key(0), (64, 256, 256)))
    u = bits.astype(np.float64) / 2.0**32
    assert abs(u.mean() - 0.5) < 1e-3 and abs(u.var() - 1 / 12) < 1e-3
    keep = u >= 0.1
    assert abs(keep.mean() - 0.9) < 2e-3
    flat = u.ravel()
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 5e-3
    other = np.asarray(dropout_bits(jax.random.key(1), (64, 256, 256))).astype(np.float64) / 2.0**32
    assert abs(np.corrcoef(flat, other.ravel())[0, 1]) < 5e-3
    np.testing.assert_array_equal(bits, np.asarray(dropout_bits(jax.random.key(0), (64, 256, 256))))


def _ls_linear_numpy(x_BxSxKx2, dmrs):
    """LS + linear interpolation written out independently: np.interp over the pilot positions (edges held)."""
    pilots = np.arange(*dmrs)
    k = np.arange(x_BxSxKx2.shape[2])
    y = np.asarray(x_BxSxKx2)[:, 0, pilots, :]
    return np.stack([[np.interp(k, pilots, y[b, :, c]) for c in range(2)] for b in range(y.shape[0])]
                    ).transpose(0, 2, 1)


def _lmmse_robust_numpy(x_BxSxKx2, dmrs):
    """The robust LMMSE written out as its formula: a direct solve of R_KP (R_PP + (sigma^2 / rho) I)^-1 y, with
    R[k, k'] the mean of exp(-2j pi (k - k') t) over delays t uniform on [0, TINY_CP) (numerical quadrature),
    sigma^2 from the Hann-windowed pilots' delay bins beyond the CP, rho = mean |y|^2 - sigma^2 (floored at 30 dB
    below mean |y|^2: this random input is noise-like, so the floor is met)."""
    pilots = np.arange(*dmrs)
    y = np.asarray(x_BxSxKx2, np.float64)[:, 0, pilots, 0] + 1j * np.asarray(x_BxSxKx2, np.float64)[:, 0, pilots, 1]
    k = np.arange(x_BxSxKx2.shape[2])
    t = (np.arange(4000) + 0.5) / 4000 * TINY_CP  # midpoint rule over the CP
    R_KxP = np.mean(np.exp(-2j * np.pi * (k[:, None, None] - pilots[None, :, None]) * t), axis=-1)
    P = pilots.size
    first = int(np.ceil(TINY_CP * dmrs[2] * P)) + references.NOISE_GUARD_BINS
    w = np.hanning(P + 2)[1:-1]
    w = w / np.sqrt(np.mean(w**2))
    sigma2 = P * np.mean(np.abs(np.fft.ifft(y * w, axis=1)[:, first: P - references.NOISE_GUARD_BINS]) ** 2, axis=1)
    received = np.mean(np.abs(y) ** 2, axis=1)
    rho = np.maximum(received - sigma2, 1e-3 * received)
    h = np.stack([R_KxP @ np.linalg.solve(R_KxP[pilots] + s2 / r * np.eye(P), yb) for yb, s2, r in zip(y, sigma2, rho)])
    return np.stack([h.real, h.imag], axis=-1)


def _lmmse_adaptive_numpy(x_BxSxKx2, dmrs):
    """The adaptive LMMSE through the baseline's numpy code (tested against its formula in test_evaluate)."""
    pilots = np.asarray(x_BxSxKx2, np.float64)[:, 0, np.arange(*dmrs)]
    h = references.adaptive_lmmse(pilots[..., 0] + 1j * pilots[..., 1], dmrs, x_BxSxKx2.shape[2], TINY_CP)
    return np.stack([h.real, h.imag], axis=-1)


def _lmmse_pdp_numpy(x_BxSxKx2, dmrs):
    """The estimated-PDP LMMSE through the baseline's numpy code (tested against its formula in test_evaluate)."""
    pilots = np.asarray(x_BxSxKx2, np.float64)[:, 0, np.arange(*dmrs)]
    h = references.pdp_lmmse(pilots[..., 0] + 1j * pilots[..., 1], dmrs, x_BxSxKx2.shape[2], TINY_CP)
    return np.stack([h.real, h.imag], axis=-1)


_REFERENCES = {"ls_linear": _ls_linear_numpy, "lmmse_robust": _lmmse_robust_numpy,
               "lmmse_adaptive": _lmmse_adaptive_numpy, "lmmse_pdp": _lmmse_pdp_numpy}


@pytest.mark.parametrize("residual,reference", [("add", "ls_linear"), ("gated", "ls_linear"), ("add", "lmmse_robust"),
                                                ("gated", "lmmse_robust"), ("gated", "lmmse_adaptive"),
                                                ("gated", "lmmse_pdp")])
def test_residual_variant_starts_exactly_at_its_reference_and_learns(residual, reference):
    import optax

    cfg = dataclasses.replace(tiny_cfg(), residual=residual, reference=reference)
    model = Estimator_v4(cfg, TINY_DMRS, rngs=nnx.Rngs(0), cp_fraction=TINY_CP)
    x = random_input(5)
    h0, _ = model(x)
    reference = _REFERENCES[reference](x, TINY_DMRS)
    np.testing.assert_allclose(np.asarray(h0), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    # Its output layer is zero-initialised, the rest as in the default model, and a gradient step leaves LS.
    assert not np.any(np.asarray(model.ch_tf._linear.kernel[...]))
    target = jax.random.normal(jax.random.key(9), h0.shape)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x)[0] - target))

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["ch_tf"]["_linear"]["kernel"][...]).max()) > 0
    if residual == "gated":  # the gate starts at zero and moves with the first step
        assert not np.any(np.asarray(model.ch_tf._reference_gate.kernel[...]))
        assert float(jnp.abs(grads["ch_tf"]["_reference_gate"]["kernel"][...]).max()) > 0
    tx = optax.sgd(1e-2)
    params = optax.apply_updates(params, tx.update(grads, tx.init(params))[0])
    h1, _ = nnx.merge(graphdef, params)(x)
    assert float(jnp.abs(h1 - h0).max()) > 1e-4
    assert float(loss(params)) < float(loss(nnx.state(model, nnx.Param)))


def test_lmmse_residual_needs_the_cyclic_prefix_and_noise_bins():
    cfg = dataclasses.replace(tiny_cfg(), residual="add", reference="lmmse_robust")
    with pytest.raises(ValueError, match="needs the cyclic prefix: pass cp_fraction"):
        Estimator_v4(cfg, TINY_DMRS, rngs=nnx.Rngs(0))
    # A CP of 19% of the symbol leaves no delay bins beyond it for the noise estimate (pilot period 1/6 symbol).
    with pytest.raises(ValueError, match="lmmse_robust: .*leave 0 such bins.*dmrs.*or the ls_linear reference"):
        Estimator_v4(cfg, TINY_DMRS, rngs=nnx.Rngs(0), cp_fraction=0.6 / 6 * 1.9)


def test_residual_off_is_the_default_and_keeps_xavier_output():
    model = Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0))
    assert tiny_cfg().residual == "none"
    assert np.any(np.asarray(model.ch_tf._linear.kernel[...]))


def test_pilot_queries_start_each_token_from_its_own_pilots():
    """queries=pilots: with every sublayer's output zeroed (each layer is then the identity on the residual
    stream), the estimate is the output layer applied to embedding + _query_proj(condition token t), worked out
    here by hand from the pilots."""
    model = Estimator_v4(dataclasses.replace(tiny_cfg(), queries="pilots"), TINY_DMRS, rngs=nnx.Rngs(0))
    for layer in model.ch_tf._layers:
        for lin in (layer.mha.out_proj, layer.cond_mha.out_proj, layer.ffnn_linear2):
            lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
            lin.bias[...] = jnp.zeros_like(lin.bias[...])
    x = random_input(4)
    h, _ = model(x)

    xn = np.asarray(x, np.float64)
    c = np.zeros((3, 384, 2))
    c[:, 0:384:6, :] = xn[:, 0, 0:384:6, :]
    scale = np.sqrt(np.sum(c**2, axis=(1, 2)) / 384)[:, None, None]
    # condition token t: re of subcarriers 12t..12t+11, then their im
    tokens = (c / scale).transpose(0, 2, 1).reshape(3, 2, 32, 12).transpose(0, 2, 1, 3).reshape(3, 32, 24)
    p = lambda a: np.asarray(a[...], np.float64)  # noqa: E731
    q = p(model.ch_tf._embedding) + tokens @ p(model.ch_tf._query_proj.kernel) + p(model.ch_tf._query_proj.bias)
    y = q @ p(model.ch_tf._linear.kernel) + p(model.ch_tf._linear.bias)  # (B, T, channels * 12)
    expect = y.reshape(3, 32, 2, 12).transpose(0, 2, 1, 3).reshape(3, 2, 384).transpose(0, 2, 1) * scale
    np.testing.assert_allclose(np.asarray(h), expect, rtol=1e-4, atol=1e-5)


def test_pilot_queries_are_off_by_default_and_need_matching_token_counts():
    assert tiny_cfg().queries == "learned"
    assert not hasattr(Estimator_v4(tiny_cfg(), TINY_DMRS, rngs=nnx.Rngs(0)).ch_tf, "_query_proj")
    with pytest.raises(ValueError, match="queries=pilots.*condition tokens.*n_token = 16"):
        Estimator_v4(dataclasses.replace(tiny_cfg(n_token=16), queries="pilots"), TINY_DMRS, rngs=nnx.Rngs(0))


def test_gated_residual_scales_each_tokens_reference_by_one_plus_its_gate():
    model = Estimator_v4(dataclasses.replace(tiny_cfg(), residual="gated"), TINY_DMRS, rngs=nnx.Rngs(0))
    x = random_input(6)
    ls = _ls_linear_numpy(x, TINY_DMRS)
    model.ch_tf._reference_gate.bias[...] = jnp.full((1,), -1.0)  # gate -1: the reference is switched off
    np.testing.assert_allclose(np.asarray(model(x)[0]), 0.0, atol=1e-6)
    model.ch_tf._reference_gate.bias[...] = jnp.full((1,), -0.75)  # a quarter of LS + linear
    np.testing.assert_allclose(np.asarray(model(x)[0]), 0.25 * ls, rtol=1e-5, atol=1e-6)


def test_folded_input_projections_compute_what_the_two_layers_in_a_row_compute(tiny_model, monkeypatch):
    """mha_*_proj followed by the attention's own projection is folded into one matmul (LinearInput): outputs and
    every parameter's gradient equal those of applying the two layers one after the other (Linear.affine None
    forces that path), in eval and in training mode with the same dropout keys."""
    from chest_jax import model as model_lib

    x = random_input(8)
    graphdef, params = nnx.split(tiny_model, nnx.Param)

    def run(p, deterministic):
        h, _ = nnx.merge(graphdef, p)(x, deterministic=deterministic, rngs=nnx.Rngs(dropout=jax.random.key(3)))
        return h

    def loss(p):
        return jnp.mean(jnp.square(run(p, False)))

    folded = (run(params, True), run(params, False), jax.grad(loss)(params))
    monkeypatch.setattr(model_lib.Linear, "affine", lambda self: None)
    chained = (run(params, True), run(params, False), jax.grad(loss)(params))
    for i, (a, b) in enumerate(zip(folded, chained)):
        # one tolerance per output or gradient tree: some gradients are zero in exact arithmetic (the key bias:
        # softmax ignores a constant added to every logit) and only rounding noise in either path
        scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(b))
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-4, atol=1e-6 * scale, err_msg=str(i))
