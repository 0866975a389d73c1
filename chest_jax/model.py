"""`Estimator_v4`: the original's transformer channel estimator for DMRS pilots, in Flax NNX.

Every module and parameter carries the PyTorch original's name (`ch_tf._layers.N.mha_q_proj`, ...), so a
reader of the original, and the PyTorch importer, find each piece in the same place. Kernels and
`*_proj_weight`s are stored (in, out), the transpose of PyTorch's (out, in) weights. Layouts are batch-first
internally; the arithmetic is the original's (SPEC.md section 3).

The model holds parameters only: positional encodings are constants computed from static sizes, and dropout
keys come from the `rngs` passed to `__call__` (training: `nnx.Rngs(dropout=key)`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chest_jax import references, rng
from chest_jax.config import ChEstimationConfig, dmrs_problem

# PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the torch MultiheadAttention
# leaves its out_proj weight at this default (only the in-projections get xavier).
torch_linear_default_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = jax.nn.initializers.xavier_uniform()

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch's F.gelu default is the exact erf form
}


def matmul(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """a @ b on operands in `dtype` (the compute dtype), accumulated and returned in float32.

    Every matmul of the model goes through here (or through `Linear`, which does the same), so that bfloat16
    means bfloat16 operands with float32 accumulation on every backend. On XLA:CPU this is also what makes
    bfloat16 fast: a bf16 x bf16 -> f32 dot runs natively (avx512_bf16: 2048^3 in 45 ms against 92 ms in float32
    on this project's CPU), while a bf16 x bf16 -> bf16 dot is rewritten into a float32 dot on converted operands
    (104 ms). With dtype float32 it is the plain float32 product.
    """
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class Linear(nnx.Linear):
    """`nnx.Linear` with the original's init: xavier-uniform kernel, zero bias, float32 parameters; the product
    accumulates in float32 (see `matmul`) and the output is in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Any = None,
                 kernel_init: nnx.Initializer = xavier_uniform,
                 bias_init: nnx.Initializer = jax.nn.initializers.zeros):
        super().__init__(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                         preferred_element_type=jnp.float32, kernel_init=kernel_init, bias_init=bias_init,
                         rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y if self.dtype is None else y.astype(self.dtype)

    def affine(self) -> tuple[jax.Array, jax.Array] | None:
        """(kernel (in, out), bias (out,)) float32 of the map this layer applies now, or None when it is not a
        fixed affine map (a LoRA layer with dropout active): what `MultiheadAttention` folds into its own
        projection."""
        return self.kernel[...], self.bias[...]


class LinearInput(NamedTuple):
    """An attention input given as `linear(x) + offset` (offset broadcast over the batch, or None), so that
    `MultiheadAttention` can fold `linear` into its own projection: x (W1 W2) + ((b1 + offset) W2 + b2) costs one
    matmul per token instead of two, forward and backward, and is the same map (float rounding aside)."""

    x: jax.Array
    linear: Linear
    offset: jax.Array | None = None


@functools.lru_cache(maxsize=None)
def positional_encoding_sine(n_pos: int, d_model: int) -> np.ndarray:
    """Sine/cosine encoding of the original (SPEC 3), (n_pos, d_model) float32, with max_n_pos = n_pos.

    pos_i = i / (n + 1e-6) * 2 pi * n for i = 1..n; w_j = n ** (2 floor(j/2) / D);
    even j: sin(pos_i / w_j), odd j: cos(pos_i / w_j). Evaluated in float32, as PyTorch computed the
    original's `pe` / `cond_pe` buffers. Angles reach 2 pi n rad, so any float32 evaluation is only good to
    ~1e-4 absolute (1.4e-4 against float64 at n = 256); at the default config that moves the estimate by
    ~3e-6 relative.
    """
    f32 = np.float32
    pos_N = np.arange(1, n_pos + 1, dtype=f32) / f32(n_pos + 1e-6) * f32(2 * math.pi * n_pos)
    dim_D = np.arange(d_model, dtype=f32)
    freq_D = f32(n_pos) ** (f32(2) * np.floor(dim_D / f32(2)) / f32(d_model))
    angle_NxD = pos_N[:, None] / freq_D[None, :]
    pe_NxD = np.where(np.arange(d_model) % 2 == 0, np.sin(angle_NxD), np.cos(angle_NxD)).astype(f32)
    pe_NxD.setflags(write=False)
    return pe_NxD


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: each element zeroed with probability `rate`, the rest scaled by 1 / (1 - rate).

    The mask comes from `chest_jax.rng.hash_bits` (why not `jax.random.bernoulli`: see `chest_jax.rng`); its hash
    fuses into the consumer and costs nothing beyond the pass over x on this CPU. x is multiplied by the scaled
    mask rather than selected with `where`: the gradient of a select made XLA:CPU write a full array of zeros
    beside it, and the attention weights' dropout then cost 84 ms a call (32 x 8 x 256 x 256) in a training step,
    against 37 ms multiplied (measured side by side; 1.15 against 0.88 GB accessed).
    """
    if rate == 0.0:
        return x
    return x * _keep_scale(_keep_mask(rng.hash_seed(key), x.shape, rate), rate, x.dtype)


def _keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """The elements dropout keeps (bool), each with probability 1 - rate, from `rng.hash_seed` words."""
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    return rng.seeded_hash_bits(seed, shape) >= threshold


def _keep_scale(keep: jax.Array, rate: float, dtype: Any) -> jax.Array:
    """The mask dropout multiplies by: 1 / (1 - rate) where kept, 0 where dropped."""
    return keep.astype(dtype) * jnp.asarray(1.0 / (1.0 - rate), dtype)


def _dropout(x: jax.Array, rate: float, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    if deterministic or rate == 0.0:
        return x
    return dropout(x, rate, rngs.dropout())


class Dropout(nnx.Module):
    """Inverted dropout with keys from the `rngs` given at call time (the module stores no RNG state)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        return _dropout(x, self.rate, deterministic, rngs)


def _softmax_attention(q_BxHxQxE: jax.Array, kt_BxHxExK: jax.Array, v_BxHxKxE: jax.Array, rate: float,
                       deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """softmax(q k^T) v per head, the softmax in float32, dropout on the weights in training; q is pre-scaled.

    Heads lead and k comes transposed, so both products are plain batched matmuls (XLA:CPU spent most of the
    attention in the transposes of a `bqhe,bkhe->bhqk` einsum). The softmax's normalisation is applied to the
    (Q, E) output instead of the (Q, K) weights: the same arithmetic with K / E times fewer divides. With dropout
    too: dropping normalised weights, as the original does, is dropping the unnormalised ones and dividing by the
    unmasked total, so the mask is applied to exp(logits) and the total stays the sum before masking. The
    gradient is written out (`_attention_core`).
    """
    seed = None if deterministic or rate == 0.0 else rng.hash_seed(rngs.dropout())
    return _attention_core(q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, seed, rate)


def _attention_forward(q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, seed, rate):
    """The attention's value and what its backward pass needs (exp(logits), their total, the dropout mask)."""
    cd = v_BxHxKxE.dtype
    logits_BxHxQxK = matmul(q_BxHxQxE, kt_BxHxExK, cd)
    # the max only guards exp against overflow (the result does not depend on it): held constant, as the
    # backward below assumes, also when this forward is differentiated by autodiff (the tests compare both)
    e_BxHxQxK = jnp.exp(logits_BxHxQxK - jax.lax.stop_gradient(jnp.max(logits_BxHxQxK, axis=-1, keepdims=True)))
    total_BxHxQx1 = jnp.sum(e_BxHxQxK, axis=-1, keepdims=True)
    keep_BxHxQxK = None if seed is None else _keep_mask(seed, e_BxHxQxK.shape, rate)
    d_BxHxQxK = e_BxHxQxK if keep_BxHxQxK is None else e_BxHxQxK * _keep_scale(keep_BxHxQxK, rate, jnp.float32)
    out_BxHxQxE = (matmul(d_BxHxQxK, v_BxHxKxE, cd) / total_BxHxQx1).astype(cd)
    return out_BxHxQxE, (q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, e_BxHxQxK, total_BxHxQx1, keep_BxHxQxK, out_BxHxQxE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, seed, rate):
    return _attention_forward(q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, seed, rate)[0]


def _attention_backward(rate, residuals, dout_BxHxQxE):
    """The attention's gradient, with every product a plain (M, K) @ (K, N) batched matmul.

    Autodiff of the forward contracts the (Q, K) weights over Q for dk and dv, which XLA:CPU ran as slow generic
    dots (about 35 ms each at the full config, beside 5-10 ms for the forward's products); here those products
    are taken transposed (dv^T = u^T d, dk^T = q^T ds), so only (Q, E)-sized arrays are transposed. With
    e = exp(s - max s) (the max held constant), t = sum_k e, d = e * mask / (1 - rate), out = (d v) / t:
      u = dout / t,  dv = d^T u,  dd = u v^T,  dt = -sum_e(dout * out) / t,  ds = e * (dd * mask / (1 - rate) + dt),
      dq = ds k,  dk^T = q^T ds.
    """
    q, kt, v, e, total, keep, out = residuals
    cd = v.dtype
    swap = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    dout = dout_BxHxQxE.astype(jnp.float32)
    u_BxHxQxE = dout / total
    scale_BxHxQxK = 1.0 if keep is None else _keep_scale(keep, rate, jnp.float32)
    dv_BxHxKxE = swap(matmul(swap(u_BxHxQxE), e * scale_BxHxQxK, cd))
    dd_BxHxQxK = matmul(u_BxHxQxE, swap(v), cd) * scale_BxHxQxK
    dt_BxHxQx1 = -jnp.sum(dout * out.astype(jnp.float32), axis=-1, keepdims=True) / total
    ds_BxHxQxK = (e * (dd_BxHxQxK + dt_BxHxQx1)).astype(cd)
    dq_BxHxQxE = matmul(ds_BxHxQxK, swap(kt), cd)
    dkt_BxHxExK = matmul(swap(q), ds_BxHxQxK, cd)
    return dq_BxHxQxE.astype(q.dtype), dkt_BxHxExK.astype(kt.dtype), dv_BxHxKxE.astype(v.dtype), None


_attention_core.defvjp(_attention_forward, _attention_backward)


class MultiheadAttention(nnx.Module):
    """PyTorch-style multi-head attention with separate in-projections (`q/k/v_proj_weight`, (in, out)).

    query (B, Lq, embed_dim), key (B, Lk, kdim), value (B, Lk, vdim) -> (B, Lq, embed_dim):
    softmax((q Wq + bq)(k Wk + bk)^T / sqrt(embed_dim / num_heads)) (v Wv + bv) per head, dropout on the
    attention weights in training, then `out_proj` (called as a module, so a LoRA on it is live).
    `in_proj_bias` is (3 embed_dim,): the q, k, v biases in that order.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, dropout: float, *,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                             "choose n_head dividing d_model")
        self.embed_dim, self.num_heads, self.kdim, self.vdim = embed_dim, num_heads, kdim, vdim
        self.dropout = dropout
        self.dtype = dtype
        self.q_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (embed_dim, embed_dim), jnp.float32))
        self.k_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (kdim, embed_dim), jnp.float32))
        self.v_proj_weight = nnx.Param(xavier_uniform(rngs.params(), (vdim, embed_dim), jnp.float32))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,), jnp.float32))
        self.out_proj = Linear(embed_dim, embed_dim, kernel_init=torch_linear_default_init, dtype=dtype,
                               rngs=rngs)

    def _project(self, inp: jax.Array | LinearInput, weight: jax.Array, bias: jax.Array) -> jax.Array:
        """inp @ weight + bias in the compute dtype; a `LinearInput` whose layer is a fixed affine map is folded
        in (the d x d weight product in float32 at full precision, so the GPU's TF32 default cannot touch it)."""
        cd = self.dtype
        if isinstance(inp, LinearInput):
            affine = inp.linear.affine()
            if affine is not None:
                kernel, first_bias = affine
                offset = first_bias if inp.offset is None else first_bias + inp.offset
                w = jnp.matmul(kernel, weight, precision=jax.lax.Precision.HIGHEST)
                b = jnp.matmul(offset, weight, precision=jax.lax.Precision.HIGHEST) + bias
                return (matmul(inp.x, w, cd) + b).astype(cd)
            first = inp.linear(inp.x)
            inp = first if inp.offset is None else first + inp.offset.astype(first.dtype)
        return (matmul(inp, weight, cd) + bias).astype(cd)

    def __call__(self, query: jax.Array | LinearInput, key: jax.Array | LinearInput,
                 value: jax.Array | LinearInput, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        cd = self.dtype
        d, h = self.embed_dim, self.num_heads
        b_q, b_k, b_v = jnp.split(self.in_proj_bias[...], 3)
        q_BxQxD = self._project(query, self.q_proj_weight[...], b_q)
        k_BxKxD = self._project(key, self.k_proj_weight[...], b_k)
        v_BxKxD = self._project(value, self.v_proj_weight[...], b_v)
        batch, n_q, n_k = q_BxQxD.shape[0], q_BxQxD.shape[1], k_BxKxD.shape[1]
        heads = lambda x, n: x.reshape(batch, n, h, d // h).transpose(0, 2, 1, 3)  # noqa: E731
        q_BxHxQxE = heads(q_BxQxD * jnp.asarray(1.0 / math.sqrt(d // h), cd), n_q)
        kt_BxHxExK = heads(k_BxKxD, n_k).transpose(0, 1, 3, 2)
        v_BxHxKxE = heads(v_BxKxD, n_k)
        out_BxHxQxE = _softmax_attention(q_BxHxQxE, kt_BxHxExK, v_BxHxKxE, self.dropout, deterministic, rngs)
        out_BxQxD = out_BxHxQxE.transpose(0, 2, 1, 3).reshape(batch, n_q, d)
        return self.out_proj(out_BxQxD)


class ConditionNetwork(nnx.Module):
    """Cuts the normalized pilot grid c (B, in_channels, length) into condition tokens.

    Returns (B, n_token, d_model) with n_token = length / step_size and d_model = in_channels * step_size:
    token t holds [re of subcarriers t*step .. t*step+step-1, then im of the same], the original's
    (token, batch, re/im, step) order in batch-first layout.
    """

    def __init__(self, length: int, in_channels: int, step_size: int, steps_per_token: int):
        if length % step_size:
            raise ValueError(f"cond length={length} is not divisible by step_size={step_size}")
        if steps_per_token != 1:
            raise ValueError(f"steps_per_token={steps_per_token} is not supported; use 1 (as Estimator_v4)")
        self.length, self.in_channels, self.step_size = length, in_channels, step_size
        self.n_token = length // step_size - steps_per_token + 1
        self.d_model = step_size * steps_per_token * in_channels

    def __call__(self, c_BxCxK: jax.Array) -> jax.Array:
        batch = c_BxCxK.shape[0]
        c_BxCxTxS = c_BxCxK.reshape(batch, self.in_channels, self.n_token, self.step_size)
        return c_BxCxTxS.transpose(0, 2, 1, 3).reshape(batch, self.n_token, self.d_model)


class TransformerLayer(nnx.Module):
    """One Pre-LN layer: self-attention over the queries, cross-attention to the condition, feed-forward.

    x (B, n_token, d_model), cond (B, cond_n_token, cond_d_model) -> (B, n_token, d_model). `mha_q_proj` is
    applied twice (self-attention query, then cross-attention query): one shared layer, as in the original.
    """

    def __init__(self, d_model: int, n_token: int, n_head: int, dim_feedforward: int, dropout: float,
                 activation: str, cond_d_model: int, cond_n_token: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        self.d_model, self.n_token = d_model, n_token
        self.cond_d_model, self.cond_n_token = cond_d_model, cond_n_token
        self.activation = activation
        self.dtype = dtype
        self.mha_q_proj = Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.mha_k_proj = Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.mha_v_proj = Linear(d_model, d_model, dtype=dtype, rngs=rngs)
        self.mha = MultiheadAttention(d_model, n_head, d_model, d_model, dropout, dtype=dtype, rngs=rngs)
        self.cond_mha = MultiheadAttention(d_model, n_head, cond_d_model, cond_d_model, dropout, dtype=dtype,
                                           rngs=rngs)
        self.ffnn_linear1 = Linear(d_model, dim_feedforward, dtype=dtype, rngs=rngs)
        self.ffnn_dropout = Dropout(dropout)
        self.ffnn_linear2 = Linear(dim_feedforward, d_model, dtype=dtype, rngs=rngs)
        self.norm1 = self._layer_norm(d_model, rngs)
        self.norm2 = self._layer_norm(d_model, rngs)
        self.norm3 = self._layer_norm(d_model, rngs)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)

    @staticmethod
    def _layer_norm(d_model: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
        return nnx.LayerNorm(d_model, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, cond_BxCxE: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        # The residual stream stays float32; sublayers compute in self.dtype.
        kw = dict(deterministic=deterministic, rngs=rngs)
        pe_TxD = jnp.asarray(positional_encoding_sine(self.n_token, self.d_model))
        cond_pe_CxE = jnp.asarray(positional_encoding_sine(self.cond_n_token, self.cond_d_model))

        # mha_*_proj and the attention's own input projections are two affine maps in a row; the attention folds
        # them into one (LinearInput).
        n = self.norm1(x_BxTxD)
        attn = self.mha(LinearInput(n, self.mha_q_proj, pe_TxD), LinearInput(n, self.mha_k_proj, pe_TxD),
                        LinearInput(n, self.mha_v_proj), **kw)
        x_BxTxD = x_BxTxD + self.dropout1(attn, **kw).astype(jnp.float32)

        n = self.norm2(x_BxTxD)
        attn = self.cond_mha(LinearInput(n, self.mha_q_proj, pe_TxD), cond_BxCxE + cond_pe_CxE, cond_BxCxE, **kw)
        x_BxTxD = x_BxTxD + self.dropout2(attn, **kw).astype(jnp.float32)

        n = self.norm3(x_BxTxD)
        hidden = self.ffnn_dropout(_ACTIVATIONS[self.activation](self.ffnn_linear1(n)), **kw)
        x_BxTxD = x_BxTxD + self.dropout3(self.ffnn_linear2(hidden), **kw).astype(jnp.float32)
        return x_BxTxD


class Transformer(nnx.Module):
    """Learned queries `_embedding` (n_token, d_model), num_layers layers, output Dense `_linear`.

    cond (B, channels, length) normalized pilots -> (B, channels, length): token t's `_linear` output
    (channels * step) is split into channels rows of step = length / n_token subcarriers at t*step.
    The two variants (both off in the original): queries="pilots" adds `_query_proj` of condition token t to
    query token t; residual="add" adds the output to `reference` (a classical estimate from the pilots,
    normalized like cond), and "gated" scales each token's share of the reference by 1 + `_reference_gate`(x_t)
    first.
    """

    def __init__(self, length: int, channels: int, num_layers: int, d_model: int, n_token: int, n_head: int,
                 dim_feedforward: int, dropout: float, activation: str, cond_net: ConditionNetwork, *,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, residual: str = "none", queries: str = "learned"):
        if length % n_token:
            raise ValueError(f"transformer length={length} is not divisible by n_token={n_token}")
        if queries == "pilots" and cond_net.n_token != n_token:
            raise ValueError(f"ch_estimation.queries=pilots starts query token t from condition token t, so it needs "
                             f"as many condition tokens (cond.length / cond.step_size = {cond_net.n_token}) as "
                             f"query tokens (transformer.n_token = {n_token}); make them equal or use "
                             "queries: learned")
        self.length, self.channels, self.n_token, self.d_model = length, channels, n_token, d_model
        self.dtype = dtype
        self._cond_net = cond_net
        self._layers = nnx.List([
            TransformerLayer(d_model, n_token, n_head, dim_feedforward, dropout, activation,
                             cond_net.d_model, cond_net.n_token, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])
        self._embedding = nnx.Param(jax.random.normal(rngs.params(), (n_token, d_model), jnp.float32))
        self.queries = queries
        if queries == "pilots":
            self._query_proj = Linear(cond_net.d_model, d_model, dtype=dtype, rngs=rngs)
        # The residual variants: the output layer starts at exactly 0, so the model starts at its reference
        # estimate; the kernel's gradient (activations x output error) is non-zero from step 1.
        self.residual = residual
        out_init = jax.nn.initializers.zeros if residual != "none" else xavier_uniform
        self._linear = Linear(d_model, channels * length // n_token, kernel_init=out_init, dtype=dtype, rngs=rngs)
        if residual == "gated":
            # Each token scales its share of the reference by 1 + gate(x_t), zero at init (exactly the reference):
            # the model can turn the noisy reference down where it cannot cancel the noise itself (low SNR).
            self._reference_gate = Linear(d_model, 1, kernel_init=jax.nn.initializers.zeros, dtype=dtype,
                                          rngs=rngs)

    def __call__(self, cond_BxCxK: jax.Array, reference_BxCxK: jax.Array | None = None,
                 correction_scale_B: jax.Array | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """reference (B, channels, length), residual variants only: the estimate the output corrects;
        correction_scale (B,), optional: each sample's correction (output and gate) is multiplied by it."""
        c_BxCxE = self._cond_net(cond_BxCxK)
        batch = c_BxCxE.shape[0]
        x_BxTxD = jnp.broadcast_to(self._embedding[...], (batch, self.n_token, self.d_model))
        if self.queries == "pilots":
            x_BxTxD = x_BxTxD + self._query_proj(c_BxCxE).astype(jnp.float32)
        for layer in self._layers:
            x_BxTxD = layer(x_BxTxD, c_BxCxE, deterministic=deterministic, rngs=rngs)
        y_BxTxO = self._linear(x_BxTxD).astype(jnp.float32)
        y_BxTxCxS = y_BxTxO.reshape(batch, self.n_token, self.channels, -1)
        if self.residual != "none":
            ref_BxTxCxS = reference_BxCxK.reshape(batch, self.channels, self.n_token, -1).transpose(0, 2, 1, 3)
            scale_Bx1x1x1 = 1.0 if correction_scale_B is None else correction_scale_B[:, None, None, None]
            y_BxTxCxS = y_BxTxCxS * scale_Bx1x1x1
            if self.residual == "gated":
                gate_BxTx1x1 = self._reference_gate(x_BxTxD).astype(jnp.float32)[..., None]
                ref_BxTxCxS = ref_BxTxCxS * (1.0 + gate_BxTx1x1 * scale_Bx1x1x1)
            y_BxTxCxS = y_BxTxCxS + ref_BxTxCxS
        return y_BxTxCxS.transpose(0, 2, 1, 3).reshape(batch, self.channels, self.length)


class Estimator_v4(nnx.Module):  # noqa: N801 - the original's class name
    """Transformer channel estimator from the DMRS pilots of OFDM symbol 0.

    Args:
      cfg: the `ch_estimation` config section (cond, transformer; peft is applied separately by
        `chest_jax.lora.apply_lora`).
      dmrs: (start, stop, step) of the pilot subcarriers over the K used subcarriers (`ref_conf_dict.dmrs`).
      compute_dtype: jnp.float32, or jnp.bfloat16 for mixed precision (matmul operands and activations in bf16,
        products accumulated in float32 (`matmul`); parameters, LayerNorm, softmax, the input scale and the
        outputs in float32).
      cp_fraction: the cyclic prefix as a fraction of the symbol (`DatasetConfig.cp_fraction`); needed only by
        the residual variants on an LMMSE reference, whose priors spread the channel over it.
    """

    def __init__(self, cfg: ChEstimationConfig, dmrs: tuple[int, int, int] = (0, 3072, 6), *, rngs: nnx.Rngs,
                 compute_dtype: Any = jnp.float32, cp_fraction: float | None = None):
        tf, cond = cfg.transformer, cfg.cond
        if cond.length != tf.length:
            raise ValueError(f"ch_estimation.cond.length={cond.length} must equal "
                             f"ch_estimation.transformer.length={tf.length} (both are the K used subcarriers)")
        problem = dmrs_problem(dmrs, tf.length)
        if problem:
            raise ValueError(f"dataset.ref_conf_dict.dmrs: {problem}")
        self.num_subcarriers = tf.length
        self.dmrs = tuple(int(v) for v in dmrs)
        self.compute_dtype = compute_dtype
        self.residual = cfg.residual
        self.reference = cfg.reference if cfg.residual != "none" else None
        self.cp_fraction = cp_fraction
        if self.reference in _LMMSE_REFERENCES:
            if cp_fraction is None:
                raise ValueError(f"ch_estimation.reference={self.reference} needs the cyclic prefix: pass cp_fraction "
                                 "(DatasetConfig.cp_fraction)")
            problem = references.lmmse_problem(self.dmrs, cp_fraction)
            if problem:
                raise ValueError(f"ch_estimation.reference={self.reference}: {problem}")
        cond_net = ConditionNetwork(cond.length, cond.in_channels, cond.step_size, cond.steps_per_token)
        self.ch_tf = Transformer(tf.length, tf.channels, tf.num_layers, tf.d_model, tf.n_token, tf.n_head,
                                 tf.dim_feedforward, tf.dropout, tf.activation, cond_net, dtype=compute_dtype,
                                 rngs=rngs, residual=cfg.residual, queries=cfg.queries)

    def __call__(self, x_BxSxKx2: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """Estimate the channel from `ref_comp_rx_signal`.

        Args:
          x_BxSxKx2: received grid (B, S, K, re/im), pilots already divided by their known symbol (LS); only
            symbol 0's DMRS subcarriers are read. S >= 1 (14 for full slots, 1 for pilots-only batches).
          deterministic: False in training (dropout on); then `rngs` must hold a `dropout` stream.
          rngs: e.g. `nnx.Rngs(dropout=key)`.

        Returns:
          h_est_BxKx2: estimated frequency response (B, K, re/im), float32, in the input's linear units.
          eq_BxSxKx2: zero-forcing equalized grid Y conj(H_est) / |H_est|^2 (B, S, K, re/im), float32,
            without gradient.
        """
        if x_BxSxKx2.ndim != 4 or x_BxSxKx2.shape[2] != self.num_subcarriers or x_BxSxKx2.shape[3] != 2 \
                or x_BxSxKx2.shape[1] < 1:
            raise ValueError(f"Estimator_v4 expects input (batch, symbols >= 1, {self.num_subcarriers}, 2), got "
                             f"{tuple(x_BxSxKx2.shape)}; check dataset.fft_size - num_guard_subcarriers against "
                             "ch_estimation.transformer.length")
        if not deterministic and rngs is None:
            raise ValueError("training mode (deterministic=False) needs dropout keys: pass "
                             "rngs=nnx.Rngs(dropout=key)")
        x = x_BxSxKx2.astype(jnp.float32)
        batch = x.shape[0]
        pilots = slice(*self.dmrs)
        c_BxKx2 = jnp.zeros((batch, self.num_subcarriers, 2), jnp.float32).at[:, pilots, :].set(x[:, 0, pilots, :])
        c_Bx2xK = c_BxKx2.transpose(0, 2, 1)
        # The floor keeps an all-zero input (and its gradient) finite; any real pilot power is far above it.
        mean_power_B = jnp.sum(jnp.square(c_Bx2xK), axis=(1, 2)) / self.num_subcarriers
        scale_Bx1x1 = jnp.sqrt(jnp.maximum(mean_power_B, jnp.finfo(jnp.float32).tiny))[:, None, None]

        reference_Bx2xK = correction_scale_B = None
        if self.reference in _LMMSE_REFERENCES:
            # Computed on the normalised pilots: the LMMSEs are linear in them for given statistics, and their
            # statistics (noise and channel power) scale with them.
            p_BxPx2 = x[:, 0, pilots, :] / scale_Bx1x1
            p_BxP = jax.lax.complex(p_BxPx2[..., 0], p_BxPx2[..., 1])
            noise_B = references.estimate_noise_variance(p_BxP, self.dmrs, self.cp_fraction, xp=jnp)
            lmmse_BxK = _LMMSE_REFERENCES[self.reference](p_BxP, self.dmrs, self.num_subcarriers, self.cp_fraction,
                                                          xp=jnp, noise_B=noise_B)
            reference_Bx2xK = jnp.stack([jnp.real(lmmse_BxK), jnp.imag(lmmse_BxK)], axis=1)
            # The reference's error is of the order of the noise, so the correction is expressed in units of the
            # noise amplitude relative to the pilots' (sqrt(sigma^2 / mean |y|^2), ~0.016 at 36 dB SNR): the same
            # output then means a small fix at high SNR and a large one at low SNR, and the network's output
            # error no longer sets a floor under a reference that is already good (without it, the robust
            # reference's model lost 4.8 dB to its own reference at 10 m in a 900-step screen).
            received_B = jnp.mean(jnp.square(jnp.abs(p_BxP)), axis=1)
            correction_scale_B = jax.lax.stop_gradient(
                jnp.sqrt(jnp.clip(noise_B / jnp.maximum(received_B, jnp.finfo(jnp.float32).tiny), 0.0, 1.0)))
        elif self.reference == "ls_linear":
            ls_BxKx2 = references.interpolate(x[:, 0, pilots, :], self.dmrs, self.num_subcarriers, xp=jnp)
            reference_Bx2xK = ls_BxKx2.transpose(0, 2, 1) / scale_Bx1x1
        h_Bx2xK = self.ch_tf(c_Bx2xK / scale_Bx1x1, reference_Bx2xK, correction_scale_B,
                             deterministic=deterministic, rngs=rngs) * scale_Bx1x1
        h_est_BxKx2 = h_Bx2xK.transpose(0, 2, 1)
        return h_est_BxKx2, zero_forcing_equalize(x, jax.lax.stop_gradient(h_est_BxKx2))


_LMMSE_REFERENCES = {"lmmse_robust": references.robust_lmmse, "lmmse_adaptive": references.adaptive_lmmse,
                     "lmmse_pdp": references.pdp_lmmse}


def zero_forcing_equalize(y_BxSxKx2: jax.Array, h_BxKx2: jax.Array) -> jax.Array:
    """Y conj(H) / |H|^2 for every symbol, (B, S, K, 2) float32; subcarriers with H == 0 give 0, not NaN."""
    y_re, y_im = y_BxSxKx2[..., 0], y_BxSxKx2[..., 1]
    h_re, h_im = h_BxKx2[:, None, :, 0], h_BxKx2[:, None, :, 1]
    power_Bx1xK = jnp.maximum(jnp.square(h_re) + jnp.square(h_im), jnp.finfo(jnp.float32).tiny)
    eq_re = (y_re * h_re + y_im * h_im) / power_Bx1xK
    eq_im = (y_im * h_re - y_re * h_im) / power_Bx1xK
    return jnp.stack([eq_re, eq_im], axis=-1)


def param_count(tree: Any) -> int:
    """Number of scalar parameters in a pure dict, an `nnx.State` or a tree of `jax.ShapeDtypeStruct`."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_params(cfg: ChEstimationConfig, dmrs: tuple[int, int, int] = (0, 3072, 6), *,
                    compute_dtype: Any = jnp.float32, cp_fraction: float | None = None) -> dict:
    """The base model's parameter pure dict as `jax.ShapeDtypeStruct`s (no arrays allocated), for strict restore."""
    abstract_model = nnx.eval_shape(
        lambda: Estimator_v4(cfg, dmrs, rngs=nnx.Rngs(0), compute_dtype=compute_dtype, cp_fraction=cp_fraction))
    return nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
