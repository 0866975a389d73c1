"""Linear interpolation of the DMRS pilots over the used subcarriers: one definition for the LS + linear
baseline (`chest_jax.baselines.ls_linear`, numpy) and the residual model variant (`chest_jax.model`, jnp).

Subcarriers outside the pilot range (below the first or beyond the last pilot, e.g. the last 5 of 3072 with
dmrs range(0, 3072, 6)) take the nearest edge pilot's value (held, not extrapolated): extrapolating the edge
segment would amplify the noise of two pilots up to 4x at low SNR.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def linear_weights(dmrs: tuple[int, int, int], num_used: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left_K, right_K, weight_K): subcarrier k = (1 - weight) * pilot[left] + weight * pilot[right].

    left/right index the pilot array (range(*dmrs)), weight is float32 in [0, 1]. Read-only arrays (cached).
    """
    pilots = np.arange(*dmrs)
    k = np.arange(num_used)
    if pilots.size == 1:
        left = right = np.zeros(num_used, np.int32)
        weight = np.zeros(num_used, np.float32)
    else:
        k_held = np.clip(k, pilots[0], pilots[-1])
        left = np.clip(np.searchsorted(pilots, k_held, side="right") - 1, 0, pilots.size - 2).astype(np.int32)
        right = left + 1
        weight = ((k_held - pilots[left]) / (pilots[right] - pilots[left])).astype(np.float32)
    for a in (left, right, weight):
        a.setflags(write=False)
    return left, right, weight


def interpolate(pilots_BxP, dmrs: tuple[int, int, int], num_used: int, xp=np):
    """Pilot values (B, P, ...) -> (B, K, ...) on every used subcarrier, with numpy or jax.numpy as `xp`."""
    left, right, weight = linear_weights(tuple(int(v) for v in dmrs), num_used)
    w = weight.reshape((1, num_used) + (1,) * (pilots_BxP.ndim - 2))
    w = xp.asarray(w, dtype=np.float64 if xp is np and np.iscomplexobj(pilots_BxP) else np.float32)
    return (1 - w) * pilots_BxP[:, left] + w * pilots_BxP[:, right]
