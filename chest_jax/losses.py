"""Training objectives (`training.loss`), differentiable, in JAX.

Both start from the per-sample NMSE of SPEC.md section 4, sum |H - H_est|^2 / sum |H|^2 (the same definition
`chest_jax.metrics.nmse_per_sample` reports in float64):

  nmse     mean over the batch of the linear per-sample NMSE: the original's loss. Its gradient weights a sample
           by its error, so far (low-SNR) samples, whose NMSE is 100-1000x larger, dominate and the model can
           give up high-SNR accuracy for them.
  nmse_db  mean over the batch of 10 log10(per-sample NMSE): every sample's relative improvement counts alike
           (d loss / d nmse_b = 10 / (ln 10 * nmse_b)), so high-SNR samples are not drowned.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Keeps log10 finite for an exact estimate; 1e-12 is 120 dB below any NMSE a channel estimate reaches here.
_NMSE_FLOOR = 1e-12


def nmse_per_sample(h_true_BxK: jax.Array, h_est_BxKx2: jax.Array) -> jax.Array:
    """Per-sample NMSE (B,), linear: h_true complex (B, K), h_est real (B, K, 2) (re, im)."""
    err = jnp.sum((h_est_BxKx2[..., 0] - h_true_BxK.real) ** 2 + (h_est_BxKx2[..., 1] - h_true_BxK.imag) ** 2, -1)
    return err / jnp.maximum(jnp.sum(jnp.abs(h_true_BxK) ** 2, -1), np.finfo(np.float32).tiny)


def _nmse(nmse_B: jax.Array) -> jax.Array:
    return jnp.mean(nmse_B)


def _nmse_db(nmse_B: jax.Array) -> jax.Array:
    return jnp.mean(jnp.log(jnp.maximum(nmse_B, _NMSE_FLOOR))) * (10.0 / math.log(10.0))


OBJECTIVES: dict[str, Callable[[jax.Array], jax.Array]] = {"nmse": _nmse, "nmse_db": _nmse_db}


def objective(name: str) -> Callable[[jax.Array], jax.Array]:
    """The reduction of per-sample NMSE (B,) to the scalar loss named `name` (see the module docstring)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown training.loss {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
