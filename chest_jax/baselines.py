"""The classical channel estimators a wireless researcher puts beside a DNN, one place for all of them.

Each maps the received frame (symbol 0's DMRS REs already divided by the pilot) to a channel estimate, complex
(B, K) on the K used subcarriers:

  ls_linear        LS at the pilots, linear interpolation over subcarriers (edge pilots held).
  lmmse_robust     LMMSE of the robust design: a power-delay profile uniform over the cyclic prefix, the noise
                   and the channel power estimated from the pilots (`chest_jax.references`); knows only the frame.
  lmmse_adaptive   the same with the power-delay profile chosen per sample by maximum likelihood among uniform and
                   exponential shapes (`chest_jax.references`); knows only the frame.
  lmmse_pdp        the same with the power-delay profile estimated per sample from the pilots' periodogram in
                   delay boxes over the CP (`chest_jax.references`); knows only the frame.
  dft_ls           DFT-based LS: the pilots' LS estimates to the delay domain, the taps within the cyclic prefix
                   kept, back to every subcarrier (a noise reduction by the share of delay bins dropped).
  lmmse_genie      frequency-domain LMMSE with the sample's true PDP, path loss and noise power: a bound no
                   receiver reaches (it knows the channel statistics of this very link).
  lmmse_practical  LMMSE with the frequency correlation estimated from TRAINING channels of the test scenario
                   and the channel power measured at the pilots: a receiver that knows the environment (like an
                   adapted model).
  lmmse_pooled     the same with the correlation pooled over the whole training mix (`dataset.channel_type`): a
                   receiver that knows no more than the base model.

Side information: ls_linear, the three pilot-only LMMSEs and dft_ls need none (they run on the original's test
files too); the two practical LMMSEs need a correlation (`training_correlation`) and the noise variance (known to
a receiver: the test set's, or the frame's `FrameSpec.noise_power_mw`); lmmse_genie needs the true taps of a
generated set.
Units: complex amplitudes in sqrt(mW), noise variances in mW per RE, delays in ns.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from chest_jax import config as config_lib
from chest_jax import channel_response, ofdm, references, testsets
from chest_jax.config import Config
from chest_jax.metrics import to_complex


def pilot_observations(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """LS channel estimates at the DMRS subcarriers: symbol 0 of the input (already Y / pilot), complex (B, P)."""
    inputs = np.asarray(inputs_BxSxKx2)
    if inputs.ndim != 4 or inputs.shape[2] != spec.num_used or inputs.shape[3] != 2:
        raise ValueError(f"inputs must be (B, S, K={spec.num_used}, 2) real; got {inputs.shape}")
    return to_complex(inputs[:, 0, np.asarray(spec.dmrs_index), :])


def ls_linear(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """LS at the DMRS pilots, linearly interpolated over the subcarriers (edge pilots held, see
    `chest_jax.references`): complex (B, K)."""
    return references.interpolate(pilot_observations(inputs_BxSxKx2, spec), spec.dmrs, spec.num_used)


def lmmse_robust(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """The robust LMMSE of `chest_jax.references` (uniform PDP over the CP, statistics from the pilots):
    complex (B, K)."""
    return references.robust_lmmse(pilot_observations(inputs_BxSxKx2, spec), spec.dmrs, spec.num_used,
                                   spec.cp_fraction)


def lmmse_pdp(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """The LMMSE with a per-sample power-delay profile estimated from the pilots (`chest_jax.references`):
    complex (B, K)."""
    return references.pdp_lmmse(pilot_observations(inputs_BxSxKx2, spec), spec.dmrs, spec.num_used,
                                spec.cp_fraction)


def lmmse_adaptive(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """The adaptive LMMSE of `chest_jax.references` (per-sample maximum-likelihood choice of the power-delay
    profile's shape, statistics from the pilots): complex (B, K)."""
    return references.adaptive_lmmse(pilot_observations(inputs_BxSxKx2, spec), spec.dmrs, spec.num_used,
                                     spec.cp_fraction)


@functools.lru_cache(maxsize=8)
def _dft_interpolator(spec: ofdm.FrameSpec) -> np.ndarray:
    """(n_kept, K) complex128: delay bin n of the pilot-domain IDFT -> subcarrier k, for the bins within the CP.

    With P pilots every `step` subcarriers from `start`, pilot-domain bin n holds delay n * N / (step * P) samples
    of fs; a tap at delay tau has pilot response exp(-2j pi p step tau / N), so the IDFT puts it at bin
    P step tau / N, and bin n returns to subcarrier k as exp(-2j pi n (k - start) / (step P)).
    """
    start, _, step = spec.dmrs
    num_pilots = spec.num_pilots
    bin_samples = spec.fft_size / (step * num_pilots)
    cp_samples = spec.cp_ns * spec.samples_per_ns
    num_kept = min(num_pilots, int(math.floor(cp_samples / bin_samples)) + 1)
    n = np.arange(num_kept)[:, None]
    k = np.arange(spec.num_used)[None, :]
    return np.exp(-2j * np.pi * n * (k - start) / (step * num_pilots))


def dft_ls(inputs_BxSxKx2: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """DFT-based LS: IDFT of the pilot LS estimates, the delay bins within the cyclic prefix kept, evaluated at
    every used subcarrier: complex (B, K).

    Exact for noiseless pilots of a channel whose taps lie on the pilot-domain delay grid (N / (step P) samples)
    within the CP; off-grid taps leak into dropped bins and the used band's edges are treated as periodic, which
    sets this estimator's error floor at high SNR.
    """
    y_BxP = pilot_observations(inputs_BxSxKx2, spec)
    interpolator = _dft_interpolator(spec)
    g_BxN = np.fft.ifft(y_BxP, axis=1)[:, : interpolator.shape[0]]
    return g_BxN @ interpolator


_jitted_freq_response = jax.jit(channel_response.channel_freq_response, static_argnums=2)


def tap_responses(tap_delays_ns: Any, spec: ofdm.FrameSpec) -> np.ndarray:
    """Unit-energy frequency response of each single tap on the used band: complex128 (..., L, K).

    Built by the generator's own `channel_response.channel_freq_response` (sampled sinc, unit energy, orthonormal
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


def training_correlation(cfg: Config, channel_type: Optional[str], *, num_samples: int, seed: int) -> np.ndarray:
    """`estimate_correlation` of num_samples channels of the TRAIN split, at distances drawn from
    cfg.dataset.distance_range: of `channel_type` alone (what `lmmse_practical` knows), or with channel_type=None
    of the whole training mix cfg.dataset.channel_type with its weights (what `lmmse_pooled` knows)."""
    if channel_type is None:
        dataset = cfg.dataset
        label = "correlation/pooled/" + ",".join(dataset.channel_type)
    else:
        dataset = testsets.single_type_dataset(cfg, channel_type, cfg.dataset.distance_range)
        label = f"correlation/{channel_type}"
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(label.encode()))
    return estimate_correlation(testsets.generate_samples(dataset, "train", num_samples, key, full=False)["h"])


# ---------------------------------------------------------------------------------------------
# The registry compare.py and evaluate.py use


@dataclass(frozen=True)
class Baseline:
    """A classical estimator and what it needs besides the pilots."""

    name: str
    title: str
    estimate: Callable[..., np.ndarray]  # (batch, spec, prepared correlation or None, noise_var) -> (B, K)
    correlation: Optional[str] = None  # "scenario" (lmmse_practical) or "pooled" (lmmse_pooled)
    needs_taps: bool = False
    needs_noise_var: bool = False


def _practical(batch: Any, spec: ofdm.FrameSpec, prepared: PracticalLMMSE, noise_var: Any) -> np.ndarray:
    return lmmse_practical(batch.inputs, noise_var, prepared, spec)


REGISTRY: dict[str, Baseline] = {b.name: b for b in (
    Baseline("ls_linear", "LS + linear interp.", lambda batch, spec, _r, _s: ls_linear(batch.inputs, spec)),
    Baseline("lmmse_robust", "LMMSE (robust, uniform PDP)",
             lambda batch, spec, _r, _s: lmmse_robust(batch.inputs, spec)),
    Baseline("lmmse_adaptive", "LMMSE (adaptive PDP)",
             lambda batch, spec, _r, _s: lmmse_adaptive(batch.inputs, spec)),
    Baseline("lmmse_pdp", "LMMSE (PDP from the pilots)",
             lambda batch, spec, _r, _s: lmmse_pdp(batch.inputs, spec)),
    Baseline("dft_ls", "DFT-based LS", lambda batch, spec, _r, _s: dft_ls(batch.inputs, spec)),
    Baseline("lmmse_genie", "LMMSE (true PDP)", lambda batch, spec, _r, _s: lmmse_genie(batch, spec),
             needs_taps=True),
    Baseline("lmmse_practical", "LMMSE (scenario corr.)", _practical, correlation="scenario",
             needs_noise_var=True),
    Baseline("lmmse_pooled", "LMMSE (pooled corr.)", _practical, correlation="pooled", needs_noise_var=True),
)}
assert tuple(REGISTRY) == config_lib.BASELINES, "config.BASELINES and baselines.REGISTRY must name the same set"
TITLES = {name: b.title for name, b in REGISTRY.items()}


def estimator(name: str, spec: ofdm.FrameSpec, *, correlation: Any = None, noise_var: Optional[float] = None,
              has_taps: bool = True, has_noise_var: bool = True, where: str = "this test set"
              ) -> Callable[[Any], np.ndarray]:
    """`batch -> h_est (B, K)` of baseline `name`, with its side information checked up front.

    `correlation` is the (K, K) matrix the baseline needs (scenario or pooled, `Baseline.correlation`) or its
    `prepare_practical` form; `noise_var` (mW per RE) stands in where the batches carry none.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(REGISTRY)}")
    b = REGISTRY[name]
    if b.needs_taps and not has_taps:
        raise ValueError(f"{name} needs the true taps; {where} has none (an imported original test set): use "
                         "ls_linear, dft_ls or a practical LMMSE")
    if b.correlation and correlation is None:
        raise ValueError(f"{name} needs correlation=training_correlation(...) ({b.correlation} correlation)")
    if b.needs_noise_var and not has_noise_var and noise_var is None:
        raise ValueError(f"{name} needs the noise variance; {where} has none: pass noise_var (mW per RE, e.g. "
                         "FrameSpec.noise_power_mw)")
    prepared = None
    if b.correlation:
        prepared = correlation if isinstance(correlation, PracticalLMMSE) else prepare_practical(correlation, spec)

    def estimate(batch: Any) -> np.ndarray:
        sigma2 = batch.noise_var if getattr(batch, "noise_var", None) is not None else noise_var
        return b.estimate(batch, spec, prepared, sigma2)

    return estimate
