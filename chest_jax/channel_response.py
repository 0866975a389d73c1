"""A channel's frequency response from its taps (SPEC.md section 1, steps 3-5), as the frame generator and the
genie LMMSE both need it.

Units: tap delays in ns, complex tap amplitudes; the response is on the K used subcarriers, unit energy over the
N-sample grid (orthonormal FFT), before path loss.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if TYPE_CHECKING:  # ofdm imports this module; the spec is only read here
    from chest_jax.ofdm import FrameSpec

_TAPS_PER_PASS = 8
_ON_GRID_SAMPLES = 1e-6  # a tap delay within this many samples of an integer is on the sampling grid


def channel_freq_response(delays_ns: jax.Array, gains: jax.Array, spec: FrameSpec) -> jax.Array:
    """(..., L) taps -> (..., K) complex64 channel on the used subcarriers, before path loss.

    delays_ns (..., L) float tap delays in ns; gains (..., L) complex tap amplitudes a_l (0 for absent taps).
    SPEC steps 3-5: h[n] = sum_l a_l sinc(n - tau_l fs) on n = 0..N-1 (normalised sinc), h / ||h|| (an
    all-zero h stays zero), H = fftshift(FFT(h) / sqrt(N))[first_used : first_used + K].
    """
    batch_shape = jnp.shape(delays_ns)[:-1]
    num_taps = jnp.shape(delays_ns)[-1]
    t_TxL = (jnp.asarray(delays_ns, jnp.float32) * jnp.float32(spec.samples_per_ns)).reshape(-1, num_taps)
    a_TxL = jnp.asarray(gains, jnp.complex64).reshape(t_TxL.shape)
    n_N = jnp.arange(spec.fft_size, dtype=jnp.float32)

    # With t = m + f (m integer), sinc(n - t) = (-1)^n * (-1)^m sin(pi f) / (pi (t - n)): one sine per tap
    # instead of one per (tap, sample), and exact near n = t, where a float32 sinc(n - t) loses digits.
    m_TxL = jnp.round(t_TxL)
    f_TxL = t_TxL - m_TxL
    # A tap this close to the grid is a unit impulse to float32 precision (its other samples are O(f)); it is
    # added as one sample below and kept out of the sum, where t - n would be 0.
    on_grid_TxL = jnp.abs(f_TxL) < _ON_GRID_SAMPLES
    c_TxL = a_TxL * (_parity_sign(m_TxL) * jnp.sin(jnp.float32(np.pi) * f_TxL) / jnp.float32(np.pi))
    c_TxL = jnp.where(on_grid_TxL, 0.0, c_TxL)
    t_TxL = jnp.where(on_grid_TxL, m_TxL + 0.5, t_TxL)

    # The scan adds _TAPS_PER_PASS taps per pass over the (T, N) accumulator: the pass is memory bound, and
    # a (T, L, N) reduction or separate re/im accumulators (XLA recomputes shared work per output) are 2-7x
    # slower on CPU. Padding taps have c = 0 and t off the grid.
    padded_taps = -(-num_taps // _TAPS_PER_PASS) * _TAPS_PER_PASS
    pad = ((0, 0), (0, padded_taps - num_taps))
    t_PxGxT = jnp.pad(t_TxL, pad, constant_values=0.5).T.reshape(-1, _TAPS_PER_PASS, t_TxL.shape[0])
    c_PxGxT = jnp.pad(c_TxL, pad).T.reshape(t_PxGxT.shape)

    def add_taps(acc_TxN, taps):
        t_GxT, c_GxT = taps
        for g in range(_TAPS_PER_PASS):
            acc_TxN = acc_TxN + c_GxT[g][:, None] * (1.0 / (t_GxT[g][:, None] - n_N))
        return acc_TxN, None

    acc_TxN, _ = lax.scan(add_taps, jnp.zeros((t_TxL.shape[0], spec.fft_size), jnp.complex64), (t_PxGxT, c_PxGxT))
    in_frame_TxL = on_grid_TxL & (m_TxL >= 0) & (m_TxL < spec.fft_size)
    peak_index_TxL = jnp.where(in_frame_TxL, m_TxL, spec.fft_size).astype(jnp.int32)
    rows_TxL = jnp.broadcast_to(jnp.arange(t_TxL.shape[0])[:, None], t_TxL.shape)
    # acc holds (-1)^n h, so the peak a_l at n = m enters as (-1)^m a_l.
    peak_TxL = a_TxL * _parity_sign(m_TxL)
    acc_TxN = acc_TxN.at[rows_TxL, peak_index_TxL].add(peak_TxL, mode="drop")
    energy_Tx1 = jnp.sum(jnp.real(acc_TxN * jnp.conj(acc_TxN)), axis=-1, keepdims=True)  # |h| = |acc|
    safe_energy = jnp.where(energy_Tx1 > 0, energy_Tx1, 1.0)
    orthonormal = jnp.float32(1.0 / math.sqrt(spec.fft_size))
    scale_Tx1 = jnp.where(energy_Tx1 > 0, lax.rsqrt(safe_energy), 0.0) * orthonormal
    if spec.fft_size % 2 == 0:
        # h = (-1)^n acc, and multiplying by (-1)^n shifts the spectrum by N/2, which is what fftshift undoes:
        # fftshift(FFT(h)) = FFT(acc).
        spectrum_TxN = jnp.fft.fft(acc_TxN, axis=-1)
    else:
        spectrum_TxN = jnp.fft.fftshift(jnp.fft.fft(acc_TxN * _parity_sign(n_N), axis=-1), axes=-1)
    h_TxK = spectrum_TxN[:, spec.first_used: spec.first_used + spec.num_used] * scale_Tx1
    return h_TxK.reshape(batch_shape + (spec.num_used,))


def _parity_sign(m: jax.Array) -> jax.Array:
    """(-1)^m for integer-valued float arrays."""
    return 1.0 - 2.0 * jnp.mod(m, 2.0)
