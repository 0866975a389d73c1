"""Channel estimates from the DMRS pilots alone (no side information): one definition each for the baselines
of the same name (`chest_jax.baselines`, numpy) and the references that the residual model variants correct
(`chest_jax.model`, jax.numpy).

  ls_linear       LS at the pilots, linear interpolation over the used subcarriers.
  lmmse_robust    LS at the pilots, then the LMMSE filter of the robust design (Li, Cimini and Sollenberger, IEEE
                  Trans. Commun. 1998): a power-delay profile assumed uniform over the cyclic prefix, the only
                  delay statistic a receiver knows without measuring the channel, with the noise variance and the
                  channel power estimated per sample from the same pilots.
  lmmse_adaptive  the same, with the power-delay profile chosen per sample by maximum likelihood among a small
                  family (uniform, or exponential with one of ADAPTIVE_MEAN_DELAYS): the pilots tell a short
                  channel from a long one, and the filter of a short one averages the noise over more subcarriers.
  lmmse_pdp       the same, with the power-delay profile estimated per sample: the pilots' periodogram, less its
                  noise, in up to PDP_BOXES delay boxes over the CP (one R x R solve per sample).

Subcarriers outside the pilot range (below the first or beyond the last pilot, e.g. the last 5 of 3072 with
dmrs range(0, 3072, 6)) take the nearest edge pilot's value in ls_linear (held, not extrapolated):
extrapolating the edge segment would amplify the noise of two pilots up to 4x at low SNR.

Delays here are fractions of the OFDM symbol (delay in samples / fft_size), so nothing depends on the FFT size:
the cyclic prefix is `cp_fraction` = cp_length_ns * subcarrier_spacing_Hz * 1e-9 of the symbol
(590 ns at 120 kHz: 0.0708).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


# ---------------------------------------------------------------------------------------------------------
# LMMSE from the pilots alone


# Pilot-domain delay bins kept out of the noise estimate on each side of the CP's bins. The pilots are
# Hann-windowed for the estimate: unwindowed, a tap leaks into every bin (the finite pilot band's Dirichlet
# kernel, |amplitude| ~ 1 / (pi * distance in bins)), and at 36 dB SNR the leakage alone reads as 9x the noise;
# the window's sidelobes fall as distance^-3, about 60 dB down 8 bins from a tap. Small pilot layouts (tests)
# that cannot spare 8 bins a side use fewer, down to MIN_GUARD_BINS (the window's main lobe is 2 bins wide).
NOISE_GUARD_BINS = 8
MIN_GUARD_BINS = 2
# The fewest noise-only bins the estimate may rest on: below this the pilot spacing leaves no delay range
# beyond the CP (N / step <= CP), and the LMMSEs here cannot tell noise from channel.
MIN_NOISE_BINS = 8
# The power-delay profiles lmmse_adaptive chooses among: None is uniform over the CP (lmmse_robust's), a number
# an exponential decay from delay 0 with that mean delay, as a fraction of the CP, truncated at the CP. On the
# generated channels' validation profiles the choices spread over all five (long NLoS channels take the uniform
# or 0.3, LoS channels mostly 0.1 to 0.01); more, finer shapes bought less than 0.5 dB in a screen.
ADAPTIVE_MEAN_DELAYS = (None, 0.3, 0.1, 0.03, 0.01)


class LMMSEFilter(NamedTuple):
    """An LMMSE filter prepared for one pilot layout and power-delay profile: R_PP = V diag(eigval) V^H (pilots x
    pilots) and R_KP V (subcarriers x pilots), with R[k, k] = 1; complex128 / float64, read-only."""

    eigval_P: np.ndarray
    eigvec_PxP: np.ndarray
    r_kp_v_KxP: np.ndarray


def pdp_correlation(offsets: np.ndarray, cp_fraction: float, mean_delay: float | None = None) -> np.ndarray:
    """E[H_k conj(H_k+offset)] (complex128, 1 at offset 0) of a unit-power channel whose power-delay profile, over
    delays t in [0, c) of the symbol (c = cp_fraction), is uniform (mean_delay None) or proportional to
    exp(-t / (mean_delay c)): the mean of exp(-2j pi o t) under that profile, in closed form."""
    o = np.asarray(offsets, dtype=np.float64)
    if mean_delay is None:
        x = 2 * np.pi * o * cp_fraction
        safe = np.where(x == 0, 1.0, x)
        return np.where(x == 0, 1.0 + 0j, (1 - np.exp(-1j * safe)) / (1j * safe))
    a = 1.0 / (mean_delay * cp_fraction)  # decay rate per symbol fraction
    rate = a + 2j * np.pi * o
    return a * (1 - np.exp(-rate * cp_fraction)) / (rate * (1 - np.exp(-a * cp_fraction)))


def uniform_pdp_correlation(offsets: np.ndarray, cp_fraction: float) -> np.ndarray:
    """`pdp_correlation` of the profile uniform over the CP (lmmse_robust's)."""
    return pdp_correlation(offsets, cp_fraction)


def _noise_bin_range(dmrs: tuple[int, int, int], cp_fraction: float) -> tuple[int, int]:
    """[first, last) of the pilot-domain delay bins that hold only noise. Bin n of the P-point IDFT of the pilots
    holds delay n / (step P) of the symbol; the CP ends at bin cp_fraction * step * P, and the bins from there to
    the period's end (where negative delays wrap to) hold noise."""
    _, _, step = dmrs
    num_pilots = len(range(*dmrs))
    cp_bins = int(math.ceil(cp_fraction * step * num_pilots))
    guard = min(NOISE_GUARD_BINS, max(MIN_GUARD_BINS, (num_pilots - cp_bins - MIN_NOISE_BINS) // 2))
    return cp_bins + guard, num_pilots - guard


def lmmse_problem(dmrs: tuple[int, int, int], cp_fraction: float) -> str | None:
    """Why the LMMSEs here (which estimate the noise from beyond the CP) cannot run on this pilot layout and CP,
    or None when they can."""
    if not 0 < cp_fraction < 1:
        return (f"the cyclic prefix is {cp_fraction:g} of the symbol (cp_length_ns * subcarrier_spacing_Hz * 1e-9); "
                "it must be in (0, 1)")
    first, last = _noise_bin_range(dmrs, cp_fraction)
    if last - first < MIN_NOISE_BINS:
        return (f"the pilot-only LMMSE estimates the noise from the delay bins beyond the cyclic prefix, but "
                f"{len(range(*dmrs))} pilots every {dmrs[2]} subcarriers leave {max(last - first, 0)} such bins "
                f"(it needs {MIN_NOISE_BINS}): use denser or more pilots (dataset.ref_conf_dict.dmrs), or the "
                "ls_linear reference")
    return None


def _check(dmrs: tuple[int, int, int], cp_fraction: float) -> None:
    problem = lmmse_problem(dmrs, cp_fraction)
    if problem:
        raise ValueError(problem)


@functools.lru_cache(maxsize=16)
def lmmse_filter(dmrs: tuple[int, int, int], num_used: int, cp_fraction: float,
                 mean_delay: float | None = None) -> LMMSEFilter:
    """The LMMSE filter of `pdp_correlation`(cp_fraction, mean_delay) for pilots range(*dmrs) among num_used
    subcarriers (cached: the eigendecomposition of the P x P pilot correlation is done once per layout).

    Raises ValueError with `lmmse_problem`'s reason when the layout leaves no noise-only delay bins.
    """
    _check(dmrs, cp_fraction)
    pilots = np.arange(*dmrs)
    offsets_KxP = np.arange(num_used)[:, None] - pilots[None, :]
    # The correlation depends on the offset only: evaluate it once per distinct offset, then gather.
    lowest = int(offsets_KxP.min())
    r_O = pdp_correlation(np.arange(lowest, int(offsets_KxP.max()) + 1), cp_fraction, mean_delay)
    r_kp_KxP = r_O[offsets_KxP - lowest]
    r_pp_PxP = r_kp_KxP[pilots]
    eigval_P, eigvec_PxP = np.linalg.eigh((r_pp_PxP + r_pp_PxP.conj().T) / 2)
    prepared = LMMSEFilter(np.maximum(eigval_P, 0.0), eigvec_PxP, r_kp_KxP @ eigvec_PxP)
    for a in prepared:
        a.setflags(write=False)
    return prepared


def estimate_noise_variance(pilots_BxP, dmrs: tuple[int, int, int], cp_fraction: float, xp=np):
    """Noise variance per pilot (B,) from the pilots alone: the mean power of the pilot-domain delay bins beyond
    the CP, which hold only noise when every tap lies within the CP (the pilots Hann-windowed first, see
    NOISE_GUARD_BINS). Unbiased for white noise of any variance; numpy or jax.numpy as `xp`."""
    dmrs = tuple(int(v) for v in dmrs)
    _check(dmrs, float(cp_fraction))
    first, last = _noise_bin_range(dmrs, float(cp_fraction))
    num_pilots = len(range(*dmrs))
    window_P = np.hanning(num_pilots + 2)[1:-1]
    window_P = window_P / np.sqrt(np.mean(np.square(window_P)))
    delay_BxP = xp.fft.ifft(pilots_BxP * xp.asarray(window_P, dtype=np.float64 if xp is np else np.float32),
                            axis=1)
    # ifft divides by P, so a noise bin's mean power is sigma^2 / P (the window has unit mean power).
    return num_pilots * xp.mean(xp.square(xp.abs(delay_BxP[:, first:last])), axis=1)


def _relative_noise(pilots_BxP, noise_B, xp):
    """sigma^2 / rho per sample, rho = mean |y|^2 - sigma^2 floored at 30 dB below the received power (as in
    `baselines.lmmse_practical`), and rho itself."""
    rdtype = np.float64 if xp is np else np.float32
    received_B = xp.mean(xp.square(xp.abs(pilots_BxP)), axis=1)
    rho_B = xp.maximum(received_B - noise_B, 1e-3 * received_B)
    return noise_B / xp.maximum(rho_B, np.finfo(rdtype).tiny), rho_B


def _project(pilots_BxP, f: LMMSEFilter, xp):
    """(B, P): V^H y, the pilots in the eigenbasis of the filter's R_PP."""
    return pilots_BxP @ xp.asarray(f.eigvec_PxP.conj(), dtype=np.complex128 if xp is np else np.complex64)


def _filtered(z_BxP, f: LMMSEFilter, relative_noise_B, xp):
    """(B, P): V^H y / (eigval + sigma^2 / rho), the filter's coefficients (R_KP V times them is the estimate)
    from the projected pilots z = V^H y. A noiseless input would invert R_PP's near-zero eigenvalues; the floor
    keeps it stable."""
    s_B = xp.maximum(relative_noise_B, 1e-9 * float(f.eigval_P.mean()))
    return z_BxP / (xp.asarray(f.eigval_P, dtype=np.float64 if xp is np else np.float32)[None, :] + s_B[:, None])


def robust_lmmse(pilots_BxP, dmrs: tuple[int, int, int], num_used: int, cp_fraction: float, xp=np, noise_B=None):
    """Complex pilot LS estimates (B, P) -> (B, K): the robust LMMSE, numpy (complex128) or jax.numpy (complex64).

    H = R_KP (R_PP + (sigma^2 / rho) I)^-1 y, R the uniform `pdp_correlation`, both statistics estimated from y
    alone: sigma^2 by `estimate_noise_variance`, rho the pilots' mean power minus sigma^2, floored at 30 dB
    below the received power as in `baselines.lmmse_practical`.
    The estimate is linear in y for given statistics, and the statistics do not change when y is scaled, so it
    may be computed on normalised pilots. `noise_B` may pass in `estimate_noise_variance`'s result when the
    caller has it already.
    """
    dmrs, cp_fraction = tuple(int(v) for v in dmrs), float(cp_fraction)
    f = lmmse_filter(dmrs, int(num_used), cp_fraction)
    if noise_B is None:
        noise_B = estimate_noise_variance(pilots_BxP, dmrs, cp_fraction, xp)
    relative_noise_B, _ = _relative_noise(pilots_BxP, noise_B, xp)
    cdtype = np.complex128 if xp is np else np.complex64
    return _filtered(_project(pilots_BxP, f, xp), f, relative_noise_B, xp) @ xp.asarray(f.r_kp_v_KxP.T,
                                                                                        dtype=cdtype)


def adaptive_lmmse(pilots_BxP, dmrs: tuple[int, int, int], num_used: int, cp_fraction: float, xp=np,
                   noise_B=None):
    """Complex pilot LS estimates (B, P) -> (B, K): the LMMSE of the power-delay profile among
    ADAPTIVE_MEAN_DELAYS under which the pilots are most likely, chosen per sample; numpy or jax.numpy.

    Under profile j the pilots are y ~ CN(0, rho (R_j + s I)), s = sigma^2 / rho (the statistics of
    `robust_lmmse`), independent in R_j's eigenbasis: log-likelihood -sum_i |V_j^H y|_i^2 / (rho (l_ji + s)) +
    log(rho (l_ji + s)). The chosen filter is applied; the choice itself is not differentiated (it depends on
    the pilots only). `noise_B` as in `robust_lmmse`.
    """
    dmrs, cp_fraction = tuple(int(v) for v in dmrs), float(cp_fraction)
    cdtype, rdtype = (np.complex128, np.float64) if xp is np else (np.complex64, np.float32)
    if noise_B is None:
        noise_B = estimate_noise_variance(pilots_BxP, dmrs, cp_fraction, xp)
    relative_noise_B, rho_B = _relative_noise(pilots_BxP, noise_B, xp)
    filters = [lmmse_filter(dmrs, int(num_used), cp_fraction, m) for m in ADAPTIVE_MEAN_DELAYS]
    coefficients, log_likelihoods = [], []
    for f in filters:
        z_BxP = _project(pilots_BxP, f, xp)
        variance_BxP = rho_B[:, None] * (xp.asarray(f.eigval_P, dtype=rdtype)[None, :] + relative_noise_B[:, None])
        variance_BxP = xp.maximum(variance_BxP, np.finfo(rdtype).tiny)
        log_likelihoods.append(-xp.sum(xp.square(xp.abs(z_BxP)) / variance_BxP + xp.log(variance_BxP), axis=1))
        coefficients.append(_filtered(z_BxP, f, relative_noise_B, xp))
    best_B = xp.argmax(xp.stack(log_likelihoods, axis=1), axis=1)
    estimate = 0
    for j, (f, c_BxP) in enumerate(zip(filters, coefficients)):
        chosen_Bx1 = (best_B == j)[:, None].astype(rdtype)
        estimate = estimate + (c_BxP * chosen_Bx1) @ xp.asarray(f.r_kp_v_KxP.T, dtype=cdtype)
    return estimate



# ---------------------------------------------------------------------------------------------------------
# LMMSE with a power-delay profile estimated per sample (lmmse_pdp)


# The estimated profile's resolution: at most this many equal delay boxes over the CP, and at least
# _MIN_BINS_PER_BOX pilot-domain bins in each (fewer and a box's periodogram is mostly noise). Screened on the
# validation profiles: 32 boxes beat 16 by 0.2-0.9 dB on InF, RMa, UMa NLoS and InH NLoS at 10 / 50 / 300 m.
PDP_BOXES = 32
_MIN_BINS_PER_BOX = 4
# A box whose periodogram is at or below its noise gets this share of the mean box power instead of nothing:
# the floor keeps the filter from excluding a delay range outright on a noisy reading (1e-4 beat 1e-2 by up to
# 3 dB at 50 m in the same screen, and equalled it at 300 m).
_PDP_FLOOR = 1e-4
# Each box's correlation is integrated over this many delays per 1 / K of the symbol (the used band's
# resolution), and its factors are kept down to this fraction of the box's energy: the correlation of the
# default frame is then reproduced to 2e-4 of its peak.
_BOX_POINTS_PER_RESOLUTION = 4
_BOX_ENERGY_KEPT = 1 - 1e-7


class DelayBoxBasis(NamedTuple):
    """Low-rank factors of the correlations of equal delay boxes tiling the CP: the box-m channel correlation (unit
    power, delays uniform within the box) is F[:, box == m] F[:, box == m]^H on all K subcarriers, so a profile
    with power p_m in box m has correlation F diag(p[box]) F^H. Also the pilot rows of F, their Gram matrix
    G = F_P^H F_P, each box's count of pilot-domain bins and the box of each bin (-1: beyond the CP).
    complex128 / int, read-only."""

    f_KxR: np.ndarray
    f_pilots_PxR: np.ndarray
    gram_RxR: np.ndarray
    box_R: np.ndarray
    bins_per_box: np.ndarray
    box_of_bin: np.ndarray


def pdp_boxes(dmrs: tuple[int, int, int], cp_fraction: float) -> int:
    """How many delay boxes lmmse_pdp uses: PDP_BOXES, or fewer where the CP spans few pilot-domain bins."""
    cp_bins = cp_fraction * dmrs[2] * len(range(*dmrs))
    return int(max(1, min(PDP_BOXES, cp_bins // _MIN_BINS_PER_BOX)))


@functools.lru_cache(maxsize=8)
def delay_box_basis(dmrs: tuple[int, int, int], num_used: int, cp_fraction: float) -> DelayBoxBasis:
    """The `DelayBoxBasis` of `pdp_boxes` equal boxes over [0, cp_fraction) of the symbol (cached)."""
    _check(dmrs, cp_fraction)
    num_boxes = pdp_boxes(dmrs, cp_fraction)
    edges = np.linspace(0.0, cp_fraction, num_boxes + 1)
    k = np.arange(num_used)
    factors, box = [], []
    for m in range(num_boxes):
        width = edges[m + 1] - edges[m]
        points = max(8, int(math.ceil(width * num_used * _BOX_POINTS_PER_RESOLUTION)))
        delays = edges[m] + (np.arange(points) + 0.5) / points * width
        u, sv, _ = np.linalg.svd(np.exp(-2j * np.pi * np.outer(k, delays)) / math.sqrt(points), full_matrices=False)
        rank = int(np.searchsorted(np.cumsum(sv ** 2) / np.sum(sv ** 2), _BOX_ENERGY_KEPT) + 1)
        factors.append(u[:, :rank] * sv[:rank])
        box += [m] * rank
    f = np.concatenate(factors, axis=1)
    f_pilots = f[np.arange(*dmrs)]
    # Bin n of the pilots' P-point IDFT holds delay n / (step P); the guard bins at the period's end hold the
    # negative delays a tap near 0 leaks into (counted with box 0); the rest beyond the CP hold noise only.
    num_pilots = f_pilots.shape[0]
    delay = np.arange(num_pilots) / (dmrs[2] * num_pilots)
    box_of_bin = np.where(delay < cp_fraction, np.minimum((delay / cp_fraction * num_boxes).astype(int),
                                                          num_boxes - 1), -1)
    box_of_bin[_noise_bin_range(dmrs, cp_fraction)[1]:] = 0
    bins_per_box = np.bincount(box_of_bin[box_of_bin >= 0], minlength=num_boxes)
    basis = DelayBoxBasis(f, f_pilots, f_pilots.conj().T @ f_pilots, np.asarray(box), bins_per_box, box_of_bin)
    for a in basis:
        a.setflags(write=False)
    return basis


def estimate_pdp(pilots_BxP, dmrs: tuple[int, int, int], cp_fraction: float, basis: DelayBoxBasis, xp=np):
    """(B, boxes) power-delay profile from the pilots alone, summing to 1 per sample: each box's periodogram (the
    Hann-windowed pilot-domain IDFT's power over its bins, in units of a noise-only bin's mean power) less the
    noise it holds (its bin count), floored at _PDP_FLOOR of the mean box power; numpy or jax.numpy."""
    rdtype = np.float64 if xp is np else np.float32
    first, last = _noise_bin_range(dmrs, cp_fraction)
    num_pilots = basis.box_of_bin.size
    window_P = np.hanning(num_pilots + 2)[1:-1]
    window_P = xp.asarray(window_P / np.sqrt(np.mean(window_P ** 2)), dtype=rdtype)
    power_BxP = xp.square(xp.abs(xp.fft.ifft(pilots_BxP * window_P[None, :], axis=1)))
    power_BxP = power_BxP / xp.maximum(xp.mean(power_BxP[:, first:last], axis=1, keepdims=True),
                                       np.finfo(rdtype).tiny)
    num_boxes = basis.bins_per_box.size
    assign_PxM = xp.asarray(basis.box_of_bin[:, None] == np.arange(num_boxes)[None, :], dtype=rdtype)
    periodogram_BxM = power_BxP @ assign_PxM
    pdp_BxM = xp.maximum(periodogram_BxM - xp.asarray(basis.bins_per_box, dtype=rdtype)[None, :], 0.0) \
        + _PDP_FLOOR * xp.sum(periodogram_BxM, axis=1, keepdims=True) / num_boxes
    return pdp_BxM / xp.maximum(xp.sum(pdp_BxM, axis=1, keepdims=True), np.finfo(rdtype).tiny)


def box_lmmse(pilots_BxP, pdp_BxM, basis: DelayBoxBasis, relative_noise_B, xp=np):
    """Complex pilot LS estimates (B, P) -> (B, K): the LMMSE of a channel whose power-delay profile puts
    pdp[b, m] (non-negative, summing to 1) in box m of `basis`, at relative noise sigma^2 / rho; numpy
    (complex128, LU solve) or jax.numpy (complex64, Cholesky: the system is Hermitian positive definite).

    With R = F D F^H, D = diag(pdp[box]), push-through gives H = F D^(1/2) (D^(1/2) G D^(1/2) + s I)^-1
    D^(1/2) F_P^H y, G = F_P^H F_P: one R x R Hermitian solve per sample (R = the basis's factor count, 384 on
    the default frame). Equal powers give the robust LMMSE up to the basis's truncation.
    """
    cdtype = np.complex128 if xp is np else np.complex64
    root_d_BxR = xp.sqrt(xp.maximum(pdp_BxM[:, basis.box_R], 0.0)).astype(cdtype)
    z_BxR = pilots_BxP @ xp.asarray(basis.f_pilots_PxR.conj(), dtype=cdtype)
    noise_B, rhs_BxR = relative_noise_B.astype(cdtype), root_d_BxR * z_BxR
    gram_RxR = xp.asarray(basis.gram_RxR, dtype=cdtype)
    if xp is np:
        c_BxR = np.linalg.solve(_box_system(root_d_BxR, noise_B, gram_RxR, np), rhs_BxR[..., None])[..., 0]
    else:
        import jax

        c_BxR = jax.lax.platform_dependent(root_d_BxR, noise_B, rhs_BxR, gram_RxR, cpu=_box_solve_one_at_a_time,
                                           default=_box_solve_batched)
    return (root_d_BxR * c_BxR) @ xp.asarray(basis.f_KxR.T, dtype=cdtype)


def _box_system(root_d_BxR, relative_noise_B, gram_RxR, xp):
    """The (B, R, R) Hermitian positive definite system of `box_lmmse`: D^(1/2) G D^(1/2) + s I."""
    eye_RxR = xp.eye(gram_RxR.shape[0], dtype=gram_RxR.dtype)
    return root_d_BxR[:, :, None] * gram_RxR[None] * root_d_BxR[:, None, :] \
        + relative_noise_B[:, None, None] * eye_RxR[None]


def _box_solve_batched(root_d_BxR, relative_noise_B, rhs_BxR, gram_RxR):
    """`box_lmmse`'s solve in one batched Cholesky (jax.numpy; what GPUs run)."""
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    system_BxRxR = _box_system(root_d_BxR, relative_noise_B, gram_RxR, jnp)
    return jsl.cho_solve(jsl.cho_factor(system_BxRxR, lower=True), rhs_BxR[:, :, None])[..., 0]


def _box_solve_one_at_a_time(root_d_BxR, relative_noise_B, rhs_BxR, gram_RxR):
    """`box_lmmse`'s solve one sample after another (jax.numpy; what CPUs run), the same arithmetic per sample.

    Why not one batched Cholesky on a CPU: jaxlib hands its batch to the process's shared thread pool and waits, so
    two CPU devices running it at once (data-parallel over the cores) deadlocked; one system at a time never
    waits on the pool and never holds the (B, R, R) systems at once (38 MB at the default frame). Under a mesh with
    a `data` axis (`jax.set_mesh`, as `run_training` sets) the batch is split into the devices' blocks first and
    each loop step solves one sample of every block, so each device loops over its own samples only; without
    that split the partitioner gathered the loop's inputs to every device. The LAPACK underneath is kept to one
    thread (`_single_thread_lapack`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    _single_thread_lapack()
    batch = rhs_BxR.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else int(mesh.shape.get("data", 1))
    shards = shards if batch % shards == 0 else 1

    def blocks(x):  # (B, ...) -> (B / shards, shards, ...): sample i of every device's block per loop step
        x = jnp.swapaxes(x.reshape((shards, batch // shards) + x.shape[1:]), 0, 1)
        return x if shards == 1 else jax.lax.with_sharding_constraint(x, P(None, "data"))

    out = jax.lax.map(lambda a: _box_solve_batched(*a, gram_RxR),
                      (blocks(root_d_BxR), blocks(relative_noise_B), blocks(rhs_BxR)))
    return jnp.swapaxes(out, 0, 1).reshape(rhs_BxR.shape)


@functools.lru_cache(maxsize=1)
def _single_thread_lapack() -> bool:
    """Keep scipy's OpenBLAS, which jaxlib's CPU LAPACK kernels call, to one thread; True if it was found.

    XLA:CPU already runs its kernels on a thread pool of its own, one thread per core; OpenBLAS starting its own
    threads inside a kernel competes with it. Measured on the 2-core machine: 32 Cholesky solves of the default
    frame's 384 x 384 systems one at a time 61 -> 59 ms on one CPU device and, split over two CPU devices,
    120 -> 38 ms; the shipped preset's end-to-end train step on two devices 108 -> 186 samples/s
    (OPENBLAS_NUM_THREADS=1 against unset, one run each). Process-wide for
    that library (numpy's own OpenBLAS is a separate one and keeps its threads); a no-op where it is not found."""
    import ctypes

    import scipy.linalg.cython_lapack  # noqa: F401 - loads the library jaxlib calls

    for path in scipy_openblas_paths():
        lib = ctypes.CDLL(path)  # the instance already loaded: dlopen returns the same handle
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(1)
                return True
    return False


def scipy_openblas_paths() -> list[str]:
    """The OpenBLAS libraries bundled with the installed scipy wheel (`scipy.libs/`), sorted; empty for other builds."""
    import glob
    import os

    import scipy

    libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    return sorted(glob.glob(os.path.join(libs, "lib*openblas*.so*")))


def pdp_lmmse(pilots_BxP, dmrs: tuple[int, int, int], num_used: int, cp_fraction: float, xp=np, noise_B=None):
    """Complex pilot LS estimates (B, P) -> (B, K): the LMMSE with the power-delay profile of `estimate_pdp`
    and the noise statistics of `robust_lmmse` (`noise_B` as there); numpy or jax.numpy."""
    dmrs, cp_fraction = tuple(int(v) for v in dmrs), float(cp_fraction)
    basis = delay_box_basis(dmrs, int(num_used), cp_fraction)
    if xp is np:
        pilots_BxP = np.asarray(pilots_BxP, np.complex128)
    if noise_B is None:
        noise_B = estimate_noise_variance(pilots_BxP, dmrs, cp_fraction, xp)
    relative_noise_B, _ = _relative_noise(pilots_BxP, noise_B, xp)
    return box_lmmse(pilots_BxP, estimate_pdp(pilots_BxP, dmrs, cp_fraction, basis, xp), basis, relative_noise_B,
                     xp)
