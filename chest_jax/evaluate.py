"""Scoring: a prediction function or a classical estimator on every sample of a test set.

Library code that never imports training code. A prediction function maps the model input to the channel
estimate and the equalized frame:

    predict_fn(inputs_BxSxKx2) -> (h_est_BxKx2, eq_BxSxKx2)      (numpy or jax arrays)

with `inputs` the received frame whose DMRS REs (symbol 0) are already divided by the pilot (SPEC 1.8),
S = num_symbol (full frames) or 1 (pilots only), K used subcarriers, last axis (re, im). Metrics
(`chest_jax.metrics`) are computed on the host in float64, over every sample (the last partial batch included).
The estimators live in `chest_jax.baselines`, the test sets in `chest_jax.testsets`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from chest_jax import baselines, ofdm
from chest_jax.metrics import db, evm_per_sample, evm_percent_from_db, nmse_db, nmse_per_sample, to_complex, zf_equalize
from chest_jax.testsets import TestBatch, TestSet, TestSetError

EstimateFn = Callable[[TestBatch], tuple[np.ndarray, Optional[np.ndarray]]]


def _check_against_spec(test_set: TestSet, spec: ofdm.FrameSpec) -> None:
    shape = test_set.arrays["inputs"].shape
    if shape[2] != spec.num_used or shape[1] not in (1, spec.num_symbol):
        raise TestSetError(f"test set {test_set.name!r} has inputs {shape} but the frame has K={spec.num_used} used "
                         f"subcarriers and {spec.num_symbol} symbols (or 1 for pilots only): evaluate it with the "
                         "dataset config it was made for")


def score(estimate_fn: EstimateFn, test_set: TestSet, spec: ofdm.FrameSpec, batch_size: int = 32) -> dict[str, Any]:
    """Score `estimate_fn(batch) -> (h_est (B, K) complex or (B, K, 2), eq (B, S, K, 2) or None)` on every
    sample. EVM uses `eq` when given, else the zero-forcing equalization with h_est; it is None when the
    test set has no transmitted frames."""
    _check_against_spec(test_set, spec)
    per_sample_nmse, per_sample_evm = [], []
    error_sum = power_sum = 0.0
    for batch in test_set.batches(batch_size):
        h_est, eq = estimate_fn(batch)
        h_est, h_true = to_complex(h_est), to_complex(batch.h)
        if h_est.shape != h_true.shape:
            raise ValueError(f"the estimate has shape {h_est.shape}, expected (B, K) = {h_true.shape}")
        per_sample_nmse.append(nmse_per_sample(h_true, h_est))
        error_sum += float(np.sum(np.abs(h_true - h_est) ** 2))
        power_sum += float(np.sum(np.abs(h_true) ** 2))
        if batch.tx is not None:
            if eq is None:
                eq = zf_equalize(batch.inputs, h_est)
            per_sample_evm.append(evm_per_sample(eq, batch.tx, spec))
    nmse = np.concatenate(per_sample_nmse)
    result: dict[str, Any] = {
        "num_samples": int(nmse.size),
        "per_sample_nmse": nmse,
        "nmse_db": nmse_db(nmse),
        "pooled_nmse_db": db(error_sum / power_sum),
        "evm_db": None,
        "evm_percent": None,
    }
    if per_sample_evm:
        evm = np.concatenate(per_sample_evm)
        result["evm_db"] = db(float(np.mean(evm)))
        result["evm_percent"] = evm_percent_from_db(result["evm_db"])
    return result


def evaluate(predict_fn: Callable, test_set: TestSet, spec: ofdm.FrameSpec, batch_size: int = 32) -> dict[str, Any]:
    """Score a model: `predict_fn(inputs_BxSxKx2) -> (h_est_BxKx2, eq_BxSxKx2)` on every sample of test_set.

    predict_fn always receives `batch_size` samples (the last batch is zero-padded, the padding ignored).
    Returns num_samples, per_sample_nmse (linear, (B,)), nmse_db (mean of per-sample NMSE, SPEC 5),
    pooled_nmse_db (sum of errors / sum of powers), evm_db and evm_percent of the model's equalized data
    REs (None without transmitted frames).
    """
    def estimate(batch: TestBatch) -> tuple[np.ndarray, Optional[np.ndarray]]:
        inputs = np.asarray(batch.inputs)
        num_real = len(inputs)
        if num_real < batch_size:
            # Zero-padding the last batch to the full size keeps a jitted predict_fn at one compiled shape;
            # the padded rows are dropped before scoring.
            inputs = np.concatenate([inputs, np.zeros((batch_size - num_real, *inputs.shape[1:]), inputs.dtype)])
        h_est, eq = predict_fn(inputs)
        return np.asarray(h_est)[:num_real], None if eq is None else np.asarray(eq)[:num_real]

    return score(estimate, test_set, spec, batch_size)


def evaluate_baseline(name: str, test_set: TestSet, spec: ofdm.FrameSpec, *, correlation: Any = None,
                      noise_var: Optional[float] = None, batch_size: int = 32) -> dict[str, Any]:
    """Score a classical estimator (`baselines.REGISTRY`) like `evaluate`, equalizing with its own estimate.

    The practical LMMSEs need `correlation` (K, K) from `baselines.training_correlation`; `noise_var` (mW per RE)
    stands in for the test set's when that has none. lmmse_genie needs a generated test set (true taps).
    """
    estimate = baselines.estimator(name, spec, correlation=correlation, noise_var=noise_var,
                                   has_taps=test_set.has_taps, has_noise_var=test_set.arrays["noise_var"] is not None,
                                   where=f"test set {test_set.name!r}")
    return score(lambda batch: (estimate(batch), None), test_set, spec, batch_size)
