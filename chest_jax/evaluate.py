"""Evaluation: NMSE and EVM metrics, classical estimators (LS, LMMSE) and fixed test sets.

Everything here is library code that scores a prediction function; it never imports training code.
A prediction function maps the model input to the channel estimate and the equalized frame:

    predict_fn(inputs_BxSxKx2) -> (h_est_BxKx2, eq_BxSxKx2)      (numpy or jax arrays)

with `inputs` the received frame whose DMRS REs (symbol 0) are already divided by the pilot (SPEC 1.8),
S = num_symbol (full frames) or 1 (pilots only), K used subcarriers, last axis (re, im).
Metrics are computed on the host in float64, over every sample (the last partial batch included).

Units: channels and received samples are complex amplitudes in sqrt(mW) per RE, noise variances are
linear mW per RE, NMSE and EVM are linear power ratios unless the name says `_db` (10 log10) or
`_percent` (100 * sqrt(ratio)), distances are in m and tap delays in ns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from chest_jax import channels, ofdm
from chest_jax.config import Config, DatasetConfig, TestSetConfig, to_dict

# Bump when the frame generator (ofdm.py) or the PDP sources (channels/) change what a given config
# produces, so that cached test sets are regenerated instead of silently reused.
TEST_SET_CODE_VERSION = 1

# Test sets and training correlations are generated in chunks of this many samples, independent of the
# config's training batch size, so the first n samples of a set do not depend on its size or the batch size.
GENERATION_CHUNK = 32

# Dataset keys that cannot change a test set: the test-set entry fixes the channel type and distance, the
# seed is passed explicitly, and pdp_dir is replaced by the content hash of the PDP file actually read.
_CACHE_IGNORED_DATASET_KEYS = ("channel_type", "channel_weights", "batch_size", "distance_range", "rnd_seed", "pdp_dir")

_ARRAY_NAMES = ("inputs", "h", "tx", "noise_var", "distance", "tap_delays_ns", "tap_powers")
_REQUIRED_ARRAYS = ("inputs", "h")

BASELINES = ("ls_linear", "lmmse_genie", "lmmse_practical")
BASELINE_TITLES = {
    "ls_linear": "LS + linear interp.",
    "lmmse_genie": "LMMSE (true PDP)",
    "lmmse_practical": "LMMSE (estimated corr.)",
}


# ---------------------------------------------------------------------------------------------
# Conversions


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


def _db(ratio: float) -> float:
    return float(10.0 * np.log10(ratio)) if ratio > 0 else -math.inf


# ---------------------------------------------------------------------------------------------
# Metrics


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
    return _db(float(np.mean(per_sample)))


def pooled_nmse_db(h_true_BxK: Any, h_est_BxK: Any) -> float:
    """"Pooled" NMSE in dB: 10 log10(sum of all errors / sum of all powers) over the whole set.

    Unlike `nmse_db`, near (strong) samples dominate it; some of the original's scripts reported this one.
    """
    h_true, h_est = to_complex(h_true_BxK), to_complex(h_est_BxK)
    return _db(float(np.sum(np.abs(h_true - h_est) ** 2) / np.sum(np.abs(h_true) ** 2)))


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
    return _db(float(np.mean(evm_per_sample(eq, batch.tx, spec))))


def evm_percent_from_db(evm_db_value: float) -> float:
    """EVM in % (RMS error amplitude relative to the RMS constellation amplitude)."""
    return float(100.0 * 10.0 ** (evm_db_value / 20.0))


# ---------------------------------------------------------------------------------------------
# Classical estimators


def pilot_observations(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """LS channel estimates at the DMRS subcarriers: symbol 0 of the input (already Y / pilot), complex (B, P)."""
    inputs = np.asarray(inputs_BxSxKx2)
    if inputs.ndim != 4 or inputs.shape[2] != spec.num_used or inputs.shape[3] != 2:
        raise ValueError(f"inputs must be (B, S, K={spec.num_used}, 2) real; got {inputs.shape}")
    return to_complex(inputs[:, 0, np.asarray(spec.dmrs_index), :])


def ls_linear(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """LS at the DMRS pilots, linearly interpolated over the subcarriers: complex (B, K).

    Subcarriers outside the pilot range (below the first or beyond the last pilot, e.g. the last 5 of
    3072 with dmrs range(0, 3072, 6)) take the nearest edge pilot's value (held, not extrapolated):
    extrapolating the edge segment would amplify the noise of two pilots up to 4x at low SNR.
    """
    y_BxP = pilot_observations(inputs_BxSxKx2, spec)
    pilots = np.asarray(spec.dmrs_index)
    k = np.arange(spec.num_used)
    if pilots.size == 1:
        return np.repeat(y_BxP, spec.num_used, axis=1)
    k_held = np.clip(k, pilots[0], pilots[-1])
    left = np.clip(np.searchsorted(pilots, k_held, side="right") - 1, 0, pilots.size - 2)
    weight = (k_held - pilots[left]) / (pilots[left + 1] - pilots[left])
    return (1.0 - weight) * y_BxP[:, left] + weight * y_BxP[:, left + 1]


_jitted_freq_response = jax.jit(ofdm.channel_freq_response, static_argnums=2)


def tap_responses(tap_delays_ns: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """Unit-energy frequency response of each single tap on the used band: complex128 (..., L, K).

    Built by the generator's own `ofdm.channel_freq_response` (sampled sinc, unit energy, orthonormal
    FFT, used band), so the genie's statistics use exactly the model that produced the channels.
    """
    delays = np.asarray(tap_delays_ns, dtype=np.float32)
    flat = delays.reshape(-1)
    # Padding the tap count to a power of two bounds the number of compiled shapes across batches and sets.
    padded = np.zeros(1 << max(int(flat.size - 1).bit_length(), 0), np.float32)
    padded[: flat.size] = flat
    response = _jitted_freq_response(padded[:, None], np.ones((padded.size, 1), np.complex64), spec)
    return np.asarray(response, dtype=np.complex128)[: flat.size].reshape(delays.shape + (spec.num_used,))


def _noise_var(noise_var: Any, spec: ofdm.FrameSpec, batch_size: int) -> np.ndarray:
    sigma2 = np.broadcast_to(np.asarray(noise_var, dtype=np.float64), (batch_size,))
    return sigma2 if spec.is_noise else np.zeros(batch_size)


def lmmse_genie(batch: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """Frequency-domain LMMSE with the true per-sample PDP, path loss and noise variance: complex (B, K).

    H_est = R_KP (R_PP + sigma^2 I)^-1 y_P, with y_P the LS estimates at the pilots and
    R = pl^2 * sum_l p_l u_l u_l^H, where u_l is the unit-energy response of tap l (`tap_responses`), p_l
    its power (the powers sum to 1) and pl the path-loss amplitude. Since the taps' sincs are nearly
    orthogonal, this is the covariance of the generator's unit-energy-normalised channel up to the
    normalisation's per-realisation fluctuation.
    R has rank <= L taps, so it is applied in the tap domain (push-through identity), an L x L solve:
    H_est = U_K S (S U_P^H U_P S + sigma^2 I_L)^-1 S U_P^H y_P, with S = diag(pl sqrt(p_l)).

    `batch` (an `ofdm.Batch` or `TestBatch`) needs inputs (B, S, K, 2), noise_var (B,) mW per RE,
    distance (B,) m, tap_delays_ns (B, L) and tap_powers (B, L) (after the extra delay and the CP drop,
    0 marks absent taps).
    """
    if batch.tap_delays_ns is None or batch.tap_powers is None:
        raise ValueError("lmmse_genie needs the true taps (tap_delays_ns, tap_powers); this test set has none "
                         "(an imported original test set): use ls_linear or lmmse_practical")
    y_BxP = pilot_observations(batch.inputs, spec)
    batch_size = y_BxP.shape[0]
    if not spec.is_channel:
        # Without a channel H is a flat, known-shape constant: the genie just averages the pilots.
        return np.repeat(y_BxP.mean(axis=1, keepdims=True), spec.num_used, axis=1)
    sigma2 = _noise_var(batch.noise_var, spec, batch_size)
    amplitude_B = np.asarray(ofdm.path_loss_amplitude(jnp.asarray(batch.distance, jnp.float32), spec), np.float64)
    scale_BxL = amplitude_B[:, None] * np.sqrt(np.asarray(batch.tap_powers, dtype=np.float64))
    u_BxLxK = tap_responses(batch.tap_delays_ns, spec) * scale_BxL[..., None]
    x_BxPxL = np.swapaxes(u_BxLxK[:, :, np.asarray(spec.dmrs_index)], 1, 2)
    x_h = np.conj(np.swapaxes(x_BxPxL, 1, 2))
    gram_BxLxL = x_h @ x_BxPxL
    num_taps = gram_BxLxL.shape[-1]
    # Coinciding taps (the LoS tap and the first cluster both at 0 ns), absent taps or sigma^2 = 0 make the
    # system singular; a loading far below any physical noise level picks the minimum-norm solution.
    trace_B = np.real(np.trace(gram_BxLxL, axis1=1, axis2=2))
    loading_B = np.maximum(sigma2, 1e-12 * trace_B / num_taps)
    coeff_BxL = np.linalg.solve(gram_BxLxL + loading_B[:, None, None] * np.eye(num_taps),
                                (x_h @ y_BxP[:, :, None]))[..., 0]
    return np.einsum("blk,bl->bk", u_BxLxK, coeff_BxL)


def estimate_correlation(h_BxK: Any) -> np.ndarray:
    """Normalised sample frequency correlation R[k, k'] = mean_b h_b[k] conj(h_b[k']), complex64 (K, K).

    Each sample is first scaled to unit mean power per subcarrier, so the path loss drops out and
    trace(R) = K; `lmmse_practical` rescales R per sample by a power estimated from its pilots.
    """
    h = to_complex(h_BxK)
    power = np.mean(np.abs(h) ** 2, axis=1, keepdims=True)
    h_unit = (h / np.sqrt(np.maximum(power, np.finfo(np.float64).tiny))).astype(np.complex64)
    return (h_unit.T @ h_unit.conj()) / np.float32(h.shape[0])


class PracticalLMMSE(NamedTuple):
    """A training correlation prepared for `lmmse_practical`: R_PP = V diag(eigval) V^H, and R_KP V."""

    eigval_P: np.ndarray
    eigvec_PxP: np.ndarray
    r_kp_v_KxP: np.ndarray


def prepare_practical(R_KxK: Any, spec: ofdm.FrameSpec) -> PracticalLMMSE:
    """Diagonalise the pilot block of a correlation from `estimate_correlation` once, for many batches."""
    R = np.asarray(R_KxK)
    if R.shape != (spec.num_used, spec.num_used):
        raise ValueError(f"the correlation must be (K, K) = ({spec.num_used}, {spec.num_used}); got {R.shape}. "
                         "Estimate it with estimate_correlation from training channels of the same frame")
    pilots = np.asarray(spec.dmrs_index)
    R_KxP = R[:, pilots].astype(np.complex128)
    R_PxP = R_KxP[pilots]
    eigval_P, eigvec_PxP = np.linalg.eigh((R_PxP + R_PxP.conj().T) / 2)
    return PracticalLMMSE(np.maximum(eigval_P, 0.0), eigvec_PxP, R_KxP @ eigvec_PxP)


def lmmse_practical(inputs_BxSxKx2: Any, noise_var: Any, R_KxK: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """LMMSE with a correlation estimated from training channels: complex (B, K).

    H_est = R_KP (R_PP + (sigma^2 / rho) I)^-1 y_P, with R from `estimate_correlation` (trace K) and rho the
    per-sample channel power estimated from the pilots alone, mean |y_P|^2 - sigma^2 (floored at -30 dB
    SNR), never from the true channel. `noise_var` is the known noise variance in mW per RE, (B,) or scalar.
    R_KxK may also be a `PracticalLMMSE` from `prepare_practical`, which saves the eigendecomposition.
    """
    prepared = R_KxK if isinstance(R_KxK, PracticalLMMSE) else prepare_practical(R_KxK, spec)
    y_BxP = pilot_observations(inputs_BxSxKx2, spec)
    sigma2 = _noise_var(noise_var, spec, y_BxP.shape[0])
    received_power = np.mean(np.abs(y_BxP) ** 2, axis=1)
    rho = np.maximum(received_power - sigma2, 1e-3 * received_power)
    eigval_P = prepared.eigval_P
    # sigma^2 = 0 (no noise) would invert R_PP's near-zero eigenvalues; a tiny floor keeps it stable.
    relative_noise = np.maximum(sigma2 / np.maximum(rho, np.finfo(np.float64).tiny), 1e-9 * eigval_P.mean())
    projected_BxP = (y_BxP @ prepared.eigvec_PxP.conj()) / (eigval_P[None, :] + relative_noise[:, None])
    return projected_BxP @ prepared.r_kp_v_KxP.T


# ---------------------------------------------------------------------------------------------
# Test sets


@dataclass
class TestSet:
    """A fixed evaluation set. `arrays` maps each of inputs (B, S, K, 2) float32, h (B, K) complex64,
    tx (B, S, K) complex64, noise_var (B,) mW per RE, distance (B,) m, tap_delays_ns (B, L) and
    tap_powers (B, L) to an array, or to None where the source lacks it (pilots-only sets have no tx,
    imported original sets have only inputs and h)."""

    __test__ = False  # not a pytest test class despite the name

    name: str
    channel_type: Optional[str]
    distance: Optional[float]  # m; None when unknown or mixed
    source: str  # "tr38901-v16", "pdp:<dir>" or "file:<prefix>"
    arrays: dict[str, Optional[np.ndarray]]
    cache_path: Optional[str] = None
    loaded_from_cache: bool = False

    def __post_init__(self) -> None:
        for key in _REQUIRED_ARRAYS:
            if self.arrays.get(key) is None:
                raise ValueError(f"test set {self.name!r} has no {key!r} array")
        self.arrays = {key: self.arrays.get(key) for key in _ARRAY_NAMES}
        n = len(self.arrays["inputs"])
        for key, value in self.arrays.items():
            if value is not None and len(value) != n:
                raise ValueError(f"test set {self.name!r}: {key} has {len(value)} samples, inputs has {n}")

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    @property
    def has_frames(self) -> bool:
        return self.arrays["tx"] is not None

    @property
    def has_taps(self) -> bool:
        return self.arrays["tap_delays_ns"] is not None and self.arrays["noise_var"] is not None

    def batches(self, size: int) -> Iterator["TestBatch"]:
        """Consecutive batches of `size` samples; the last one holds the remainder (nothing is dropped)."""
        if size < 1:
            raise ValueError(f"batch size must be at least 1; got {size}")
        for start in range(0, len(self), size):
            yield TestBatch(**{key: None if value is None else value[start: start + size]
                               for key, value in self.arrays.items()})


@dataclass(frozen=True)
class TestBatch:
    """A slice of a TestSet with the field names of ofdm.Batch (absent fields are None)."""

    __test__ = False

    inputs: np.ndarray
    h: np.ndarray
    tx: Optional[np.ndarray] = None
    noise_var: Optional[np.ndarray] = None
    distance: Optional[np.ndarray] = None
    tap_delays_ns: Optional[np.ndarray] = None
    tap_powers: Optional[np.ndarray] = None


def data_source(dataset: DatasetConfig) -> str:
    """Where channels come from: "pdp:<dir>" (the original's PDP files) or "tr38901-<version>" (generator)."""
    return f"pdp:{dataset.pdp_dir}" if dataset.pdp_dir is not None else f"tr38901-{dataset.tr38901_version}"


def default_name(ts: TestSetConfig) -> str:
    return f"{ts.channel_type}_{ts.distance:g}m"


def _single_type_dataset(cfg: Config, channel_type: str, distance_range: tuple[float, float]) -> DatasetConfig:
    return dataclasses.replace(cfg.dataset, channel_type=(channel_type,), channel_weights=None,
                               distance_range=(float(distance_range[0]), float(distance_range[1])))


_BATCH_FNS: dict[Any, Callable] = {}


def _batch_fn(spec: ofdm.FrameSpec, full: bool) -> Callable:
    """One jitted generator per frame spec, so repeated test sets do not recompile."""
    key = (spec, full)
    if key not in _BATCH_FNS:
        _BATCH_FNS[key] = ofdm.make_batch_fn(spec, GENERATION_CHUNK, full=full)
    return _BATCH_FNS[key]


def _generate(dataset: DatasetConfig, part: str, num_samples: int, key: Any, full: bool) -> dict[str, np.ndarray]:
    """num_samples samples of `part` ("train"/"val"/"test") of dataset's (single) channel type."""
    spec = ofdm.FrameSpec.from_config(dataset)
    bank = ofdm.make_bank(channels.load_split(dataset, part))
    fn = _batch_fn(spec, full)
    distance_range = jnp.asarray(dataset.distance_range, dtype=jnp.float32)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAY_NAMES}
    for i in range(-(-num_samples // GENERATION_CHUNK)):
        batch = fn(jax.random.fold_in(key, i), bank, distance_range)
        for name in _ARRAY_NAMES:
            value = getattr(batch, name)
            if value is not None:
                chunks[name].append(np.asarray(value))
    return {name: np.concatenate(parts)[:num_samples] for name, parts in chunks.items() if parts}


def make_test_set(cfg: Config, ts: TestSetConfig, *, seed: int, full: bool = True) -> TestSet:
    """Generate a test set: ts.num_samples samples of ts.channel_type at the fixed distance ts.distance (m),
    drawn from the TEST split of the PDPs only (disjoint from training), deterministic in (cfg, ts, seed).

    full=True generates all num_symbol symbols (needed for EVM and export); full=False pilots only (S = 1).
    """
    dataset = _single_type_dataset(cfg, ts.channel_type, (ts.distance, ts.distance))
    name = default_name(ts)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))
    arrays = _generate(dataset, "test", ts.num_samples, key, full)
    return TestSet(name=name, channel_type=ts.channel_type, distance=float(ts.distance),
                   source=data_source(cfg.dataset), arrays=arrays)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def generation_identity(cfg: Config, ts: TestSetConfig, *, seed: int, full: bool = True) -> dict[str, Any]:
    """Everything that determines a generated test set, as plain JSON data (the cache key)."""
    dataset = {k: v for k, v in to_dict(cfg.dataset).items() if k not in _CACHE_IGNORED_DATASET_KEYS}
    pdp_file = None
    if cfg.dataset.pdp_dir is not None:
        path = Path(cfg.dataset.pdp_dir).expanduser() / f"PDP_{ts.channel_type}.mat"
        pdp_file = {"name": path.name, "sha256": _file_sha256(path) if path.is_file() else None}
    return {
        "code_version": TEST_SET_CODE_VERSION,
        "generation_chunk": GENERATION_CHUNK,
        "dataset": dataset,
        "pdp_file": pdp_file,
        "test_set": {"channel_type": ts.channel_type, "distance": float(ts.distance),
                     "num_samples": int(ts.num_samples)},
        "seed": int(seed),
        "full": bool(full),
    }


def load_or_make_test_set(cfg: Config, ts: TestSetConfig, *, seed: int, cache_dir: str | os.PathLike,
                          full: bool = True) -> TestSet:
    """`make_test_set`, cached in cache_dir as <name>_<hash>.npz beside <name>_<hash>.json.

    The JSON holds the exact generating identity (`generation_identity`: the dataset section without keys
    that cannot change the set, the content hash of the PDP file read, the test-set entry, seed, frame kind
    and TEST_SET_CODE_VERSION); its hash names the files. A cached set is reused only when the stored JSON
    equals the current identity; otherwise (or when the files are unreadable) the set is regenerated.
    """
    identity = generation_identity(cfg, ts, seed=seed, full=full)
    text = json.dumps(identity, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    stem = f"{default_name(ts)}_{'full' if full else 'pilots'}_{digest}"
    cache = Path(cache_dir)
    npz_path, json_path = cache / f"{stem}.npz", cache / f"{stem}.json"
    if npz_path.is_file() and json_path.is_file():
        try:
            stored = json.loads(json_path.read_text())
            if stored.get("identity") == json.loads(text):
                with np.load(npz_path, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in data.files}
                return TestSet(name=default_name(ts), channel_type=ts.channel_type, distance=float(ts.distance),
                               source=stored["source"], arrays=arrays, cache_path=str(npz_path),
                               loaded_from_cache=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # an unreadable or foreign cache entry is regenerated below
    test_set = make_test_set(cfg, ts, seed=seed, full=full)
    cache.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so an interrupted run never leaves a half-written set that
    # a later run would trust.
    tmp_npz = cache / f".{stem}.{os.getpid()}.tmp.npz"
    np.savez(tmp_npz, **{k: v for k, v in test_set.arrays.items() if v is not None})
    tmp_json = cache / f".{stem}.{os.getpid()}.tmp.json"
    tmp_json.write_text(json.dumps({"identity": identity, "source": test_set.source,
                                    "name": test_set.name}, indent=1, sort_keys=True))
    os.replace(tmp_npz, npz_path)
    os.replace(tmp_json, json_path)
    test_set.cache_path = str(npz_path)
    return test_set


def load_original_test_set(prefix: str | os.PathLike) -> TestSet:
    """Read a test set in the original's format: `<prefix>_input.npy`, real (B, S, K, 2) (the original:
    (B, 14, 3072, 2), Y with DMRS REs divided by the pilot) and `<prefix>_true.npy`, complex (B, K).

    Only NMSE and the LS / practical-LMMSE baselines can be computed from these: they hold no taps,
    noise variance or transmitted frame (the practical LMMSE then needs the noise variance passed in).
    """
    prefix = str(prefix)
    paths = {"input": Path(f"{prefix}_input.npy"), "true": Path(f"{prefix}_true.npy")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"original test set {prefix!r}: missing {', '.join(missing)}; a test set in the "
                                "original format is the pair <prefix>_input.npy and <prefix>_true.npy")
    try:
        inputs = np.load(paths["input"], allow_pickle=False)
        h = np.load(paths["true"], allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"original test set {prefix!r}: cannot read the .npy files ({e}); they must be "
                         "plain numeric numpy arrays") from None
    if inputs.ndim != 4 or inputs.shape[-1] != 2 or not np.issubdtype(inputs.dtype, np.floating):
        raise ValueError(f"{paths['input']}: expected a real float array (B, S, K, 2) = (samples, symbols, "
                         f"subcarriers, re/im), e.g. (100, 14, 3072, 2); got {inputs.dtype} {inputs.shape}")
    if h.ndim != 2 or not np.iscomplexobj(h):
        raise ValueError(f"{paths['true']}: expected a complex array (B, K) = (samples, subcarriers), "
                         f"e.g. (100, 3072) complex64; got {h.dtype} {h.shape}")
    if h.shape != (inputs.shape[0], inputs.shape[2]):
        raise ValueError(f"original test set {prefix!r}: {paths['true'].name} has shape {h.shape} but "
                         f"{paths['input'].name} {inputs.shape} implies (B, K) = "
                         f"({inputs.shape[0]}, {inputs.shape[2]})")
    return TestSet(name=Path(prefix).name, channel_type=None, distance=None, source=f"file:{prefix}",
                   arrays={"inputs": inputs.astype(np.float32), "h": h.astype(np.complex64)})


def save_original_test_set(test_set: TestSet, prefix: str | os.PathLike) -> tuple[str, str]:
    """Write `<prefix>_input.npy` (float32 (B, S, K, 2)) and `<prefix>_true.npy` (complex64 (B, K)), the
    original's format, and return both paths. Export full frames (S = num_symbol) for the original's
    scripts; taps, noise variance and tx are not part of the format and are not written."""
    input_path, true_path = f"{prefix}_input.npy", f"{prefix}_true.npy"
    Path(input_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(input_path, np.asarray(test_set.arrays["inputs"], dtype=np.float32))
    np.save(true_path, np.asarray(test_set.arrays["h"]).astype(np.complex64))
    return input_path, true_path


# ---------------------------------------------------------------------------------------------
# Scoring

EstimateFn = Callable[[TestBatch], tuple[np.ndarray, Optional[np.ndarray]]]


def _check_against_spec(test_set: TestSet, spec: ofdm.FrameSpec) -> None:
    shape = test_set.arrays["inputs"].shape
    if shape[2] != spec.num_used or shape[1] not in (1, spec.num_symbol):
        raise ValueError(f"test set {test_set.name!r} has inputs {shape} but the frame has K={spec.num_used} used "
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
        "pooled_nmse_db": _db(error_sum / power_sum),
        "evm_db": None,
        "evm_percent": None,
    }
    if per_sample_evm:
        evm = np.concatenate(per_sample_evm)
        result["evm_db"] = _db(float(np.mean(evm)))
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


def evaluate_baseline(name: str, test_set: TestSet, spec: ofdm.FrameSpec, *, correlation: Optional[np.ndarray] = None,
                      noise_var: Optional[float] = None, batch_size: int = 32) -> dict[str, Any]:
    """Score a classical estimator (`BASELINES`) like `evaluate`, equalizing with its own estimate.

    lmmse_practical needs `correlation` (K, K) from `estimate_correlation`; `noise_var` (mW per RE)
    overrides the test set's when that has none. lmmse_genie needs a generated test set (true taps).
    """
    if name == "ls_linear":
        def estimate(batch: TestBatch) -> tuple[np.ndarray, None]:
            return ls_linear(batch.inputs, spec), None
    elif name == "lmmse_genie":
        if not test_set.has_taps:
            raise ValueError(f"lmmse_genie needs the true taps; test set {test_set.name!r} has none")

        def estimate(batch: TestBatch) -> tuple[np.ndarray, None]:
            return lmmse_genie(batch, spec), None
    elif name == "lmmse_practical":
        if correlation is None:
            raise ValueError("lmmse_practical needs correlation=estimate_correlation(training channels)")
        if test_set.arrays["noise_var"] is None and noise_var is None:
            raise ValueError(f"lmmse_practical needs the noise variance; test set {test_set.name!r} has none: "
                             "pass noise_var (mW per RE, e.g. FrameSpec.noise_power_mw)")

        prepared = prepare_practical(correlation, spec)

        def estimate(batch: TestBatch) -> tuple[np.ndarray, None]:
            sigma2 = batch.noise_var if batch.noise_var is not None else noise_var
            return lmmse_practical(batch.inputs, sigma2, prepared, spec), None
    else:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return score(estimate, test_set, spec, batch_size)


def training_correlation(cfg: Config, channel_type: str, *, num_samples: int, seed: int) -> np.ndarray:
    """`estimate_correlation` of num_samples channels of the TRAIN split of channel_type, at distances
    drawn from cfg.dataset.distance_range (the statistics a practical receiver could have learned)."""
    dataset = _single_type_dataset(cfg, channel_type, cfg.dataset.distance_range)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(f"correlation/{channel_type}".encode()))
    return estimate_correlation(_generate(dataset, "train", num_samples, key, full=False)["h"])
