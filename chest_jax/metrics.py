"""Metrics of channel estimates, on the host in float64: NMSE (mean of per-sample and pooled), EVM of the
zero-forcing equalised data REs, and the conversions between complex arrays and (re, im) pairs.

Units: channels are complex amplitudes in sqrt(mW) per RE; NMSE and EVM are linear power ratios unless the name
says `_db` (10 log10) or `_percent` (100 * sqrt(ratio)). The training objectives (differentiable, in JAX) are in
`chest_jax.losses`; they use the same per-sample NMSE definition (SPEC.md section 4).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from chest_jax import ofdm


def to_complex(x: Any) -> np.ndarray:
    """(..., 2) real (re, im) or complex (...) -> complex128 (...)."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return x.astype(np.complex128)
    if x.shape[-1:] != (2,):
        raise ValueError(f"expected a complex array or a real array with a last axis (re, im) of size 2; "
                         f"got a real array of shape {x.shape}")
    x = x.astype(np.float64)
    return x[..., 0] + 1j * x[..., 1]


def to_real_pair(x: Any) -> np.ndarray:
    """complex (...) -> float32 (..., 2) with (re, im) on the last axis."""
    x = np.asarray(x)
    return np.stack([x.real, x.imag], axis=-1).astype(np.float32)


def db(ratio: float) -> float:
    """10 log10(ratio) of a linear power ratio: -inf for 0, NaN for a negative or non-finite ratio (+inf stays)."""
    ratio = float(ratio)
    if math.isnan(ratio) or ratio < 0:
        return math.nan
    return -math.inf if ratio == 0 else 10.0 * math.log10(ratio)


# ---------------------------------------------------------------------------------------------
# NMSE


def nmse_per_sample(h_true_BxK: Any, h_est_BxK: Any) -> np.ndarray:
    """Per-sample NMSE sum_k |H - H_est|^2 / sum_k |H|^2 (SPEC 4), linear, shape (B,).

    Both channels are complex (B, K) or real (B, K, 2).
    """
    h_true, h_est = to_complex(h_true_BxK), to_complex(h_est_BxK)
    if h_true.shape != h_est.shape:
        raise ValueError(f"true channel {h_true.shape} and estimate {h_est.shape} must have the same shape (B, K)")
    error = np.sum(np.abs(h_true - h_est) ** 2, axis=-1)
    power = np.sum(np.abs(h_true) ** 2, axis=-1)
    return error / np.maximum(power, np.finfo(np.float64).tiny)


def nmse_db(per_sample: Any) -> float:
    """NMSE in dB as reported (SPEC 5): 10 log10 of the mean over samples of the linear per-sample NMSE."""
    per_sample = np.asarray(per_sample, dtype=np.float64)
    if per_sample.size == 0:
        raise ValueError("nmse_db of zero samples is undefined")
    return db(float(np.mean(per_sample)))


def per_sample_db(per_sample: Any, floor: float = 1e-30) -> np.ndarray:
    """10 log10 of each per-sample NMSE (floored at `floor` so an exact estimate gives -300 dB, not -inf)."""
    return 10.0 * np.log10(np.maximum(np.asarray(per_sample, dtype=np.float64), floor))


def mean_of_db(per_sample: Any) -> float:
    """The mean over samples of the per-sample NMSE in dB: unlike `nmse_db` (dB of the mean), every sample counts
    alike, so the high-SNR samples, whose linear NMSE is tiny, are not drowned by the low-SNR ones."""
    per_sample = np.asarray(per_sample, dtype=np.float64)
    if per_sample.size == 0:
        raise ValueError("mean_of_db of zero samples is undefined")
    return float(np.mean(per_sample_db(per_sample)))


def pooled_nmse_db(h_true_BxK: Any, h_est_BxK: Any) -> float:
    """"Pooled" NMSE in dB: 10 log10(sum of all errors / sum of all powers) over the whole set.

    Unlike `nmse_db`, near (strong) samples dominate it; some of the original's scripts reported this one.
    """
    h_true, h_est = to_complex(h_true_BxK), to_complex(h_est_BxK)
    return db(float(np.sum(np.abs(h_true - h_est) ** 2) / np.sum(np.abs(h_true) ** 2)))


# ---------------------------------------------------------------------------------------------
# Equalisation and EVM


def data_re_mask(spec: ofdm.FrameSpec, num_symbol: int) -> np.ndarray:
    """(S, K) bool: REs carrying QAM data, i.e. every RE except symbol 0's DMRS subcarriers."""
    mask = np.ones((num_symbol, spec.num_used), dtype=bool)
    mask[0, np.asarray(spec.dmrs_index)] = False
    return mask


def zf_equalize(inputs_BxSxKx2: Any, h_est_BxK: Any) -> np.ndarray:
    """Zero-forcing equalization Y conj(H_est) / |H_est|^2 of every RE, as the model does (SPEC 3).

    Returns float32 (B, S, K, 2). A zero estimate gives a zero RE instead of NaN.
    """
    y = to_complex(inputs_BxSxKx2)
    h = to_complex(h_est_BxK)[:, None, :]
    power = np.abs(h) ** 2
    eq = np.where(power > 0, y * np.conj(h) / np.where(power > 0, power, 1.0), 0.0)
    return to_real_pair(eq)


def evm_per_sample(eq_BxSxK: Any, tx_BxSxK: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """Per-sample EVM^2 over the data REs (not DMRS): sum |eq - X|^2 / sum |X|^2, linear, shape (B,).

    `eq` is the equalized frame (complex (B, S, K) or real (B, S, K, 2)), `tx` the transmitted grid X.
    """
    eq, tx = to_complex(eq_BxSxK), to_complex(tx_BxSxK)
    if eq.shape != tx.shape:
        raise ValueError(f"equalized frame {eq.shape} and transmitted frame {tx.shape} must match (B, S, K); "
                         "EVM needs full frames (generate the test set with full=True)")
    mask = data_re_mask(spec, eq.shape[1])
    error = np.sum(np.abs(eq - tx) ** 2 * mask, axis=(1, 2))
    power = np.sum(np.abs(tx) ** 2 * mask, axis=(1, 2))
    return error / power


def evm_db(eq_or_est: Any, batch: Any, spec: ofdm.FrameSpec) -> float:
    """EVM of the zero-forcing equalized 64-QAM data REs (DMRS excluded), in dB: 10 log10(mean EVM^2).

    `eq_or_est` is either an equalized frame (B, S, K[, 2]) (the model's second output) or a channel
    estimate (B, K[, 2]), which is used to equalize `batch.inputs` the way the model does. `batch` needs
    `inputs` and `tx` (full frames). The percentage is `evm_percent_from_db`.
    """
    if batch.tx is None:
        raise ValueError("EVM needs the transmitted frame `tx`; this test set has none (pilots-only or an "
                         "imported original test set)")
    arr = np.asarray(eq_or_est)
    est_ndim = 2 if np.iscomplexobj(arr) else 3
    eq = zf_equalize(batch.inputs, arr) if arr.ndim == est_ndim else arr
    return db(float(np.mean(evm_per_sample(eq, batch.tx, spec))))


def evm_percent_from_db(evm_db_value: float) -> float:
    """EVM in % (RMS error amplitude relative to the RMS constellation amplitude)."""
    return float(100.0 * 10.0 ** (evm_db_value / 20.0))
