"""The jitted OFDM frame generator of SPEC.md section 1: random channels, DMRS pilots, noise, LS at the pilots.

Per sample: draw a scenario and one of its power-delay profiles (PDPs), a distance and a random extra delay;
drop taps past the cyclic prefix; Rayleigh tap gains (every tap, the LoS one included: no specular
component, so LoS links are Rayleigh-faded, not Ricean); sinc-interpolated time-domain channel on the sampling
grid, normalised to unit energy and scaled by the free-space path loss; orthonormal FFT, keep the used band;
transmit a grid with a fixed QPSK DMRS sequence on symbol 0 and random QAM elsewhere; add complex Gaussian
noise; divide the DMRS REs by their pilot (least squares). `generate_batch` does this for a whole batch in
one jitted function; `full=False` (pilots only, what training needs) skips the 14-symbol grid.

Randomness: sample i of a batch uses only `jax.random.split(key, batch_size)[i]`, so a data-parallel run that
shards the batch draws the same samples. A sample's parameters (scenario, profile, distance, extra delay, tap
gains) come from one `jax.random.bits` call on its key; the per-RE draws of the grid (QAM symbols and noise)
from `chest_jax.rng.threefry2x32` keyed by two of those words, with the RE's position as the counter (why a
counter-based stream: see `chest_jax.rng`), so the noise on a pilot RE is a function of its position alone and
pilots-only and full frames with the same key agree.

Units: delays in ns, distances in m, powers in mW (linear), frequencies in Hz; `H` is the complex channel
gain per subcarrier including path loss, so |H|^2 / noise_var is the per-RE SNR (linear).

The module is one concept, the frame generator, in the order a sample is drawn: the frame description
(`FrameSpec`), the PDP bank on the device, the per-RE draws and the batch. The channel's frequency response from
its taps is `chest_jax.channel_response`, the counter-based streams `chest_jax.rng`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from chest_jax import rng
from chest_jax.channel_response import channel_freq_response
from chest_jax.config import DatasetConfig, dmrs_problem, mod_order_problem

__all__ = ["Batch", "FrameSpec", "PDPBank", "generate_batch", "make_bank",
           "make_batch_fn", "path_loss_amplitude", "pilot_sequence", "qam_constellation"]

SPEED_OF_LIGHT_M_S = 299_792_458.0
# A uint32 draw gives its top 24 bits (a float32 mantissa's worth) to a uniform variate and its low 8 bits to
# the QAM level of one dimension, so square QAM up to 256 levels per dimension (config.MAX_QAM_ORDER) fits in
# the two draws of an RE.


# ---------------------------------------------------------------------------------------------
# Frame description


@dataclass(frozen=True)
class FrameSpec:
    """Static description of a frame; hashable, so it can be a `jax.jit` static argument.

    fft_size N; num_used K used subcarriers starting at index first_used of the fftshifted spectrum;
    spacing_hz subcarrier spacing (Hz) and sample_rate_hz = N * spacing; num_symbol OFDM symbols;
    cp_ns cyclic prefix (ns; later taps are dropped); max_extra_delay_ns bound of the per-channel random
    delay; dmrs (start, stop, step) over the used subcarriers of symbol 0; mod_order square QAM order of
    the data REs; wavelength_m carrier wavelength; tx_power_mw transmit power; noise_power_mw noise power
    per resource element; is_channel / is_noise switch the channel (flat path loss instead) / the noise off.
    """

    fft_size: int
    num_used: int
    first_used: int
    spacing_hz: float
    sample_rate_hz: float
    num_symbol: int
    cp_ns: float
    max_extra_delay_ns: float
    dmrs: tuple[int, int, int]
    mod_order: int
    wavelength_m: float
    tx_power_mw: float
    noise_power_mw: float
    is_channel: bool = True
    is_noise: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dmrs", tuple(int(v) for v in self.dmrs))
        problems = []
        if not 0 < self.num_used <= self.fft_size:
            problems.append(f"num_used={self.num_used} must be in [1, fft_size={self.fft_size}]")
        if not 0 <= self.first_used <= self.fft_size - self.num_used:
            problems.append(f"first_used={self.first_used} must leave the {self.num_used} used subcarriers inside "
                            f"fft_size={self.fft_size}")
        for name, problem in (("dmrs", dmrs_problem(self.dmrs, self.num_used)),
                              ("mod_order", mod_order_problem(self.mod_order))):
            if problem:
                problems.append(f"{name}={problem}")
        if self.num_symbol < 1:
            problems.append(f"num_symbol={self.num_symbol} must be at least 1")
        for name in ("spacing_hz", "sample_rate_hz", "cp_ns", "wavelength_m", "tx_power_mw"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not self.max_extra_delay_ns >= 0 or not self.noise_power_mw >= 0:
            problems.append("max_extra_delay_ns and noise_power_mw must be >= 0")
        if problems:
            raise ValueError("invalid FrameSpec: " + "; ".join(problems))

    @staticmethod
    def from_config(d: DatasetConfig) -> "FrameSpec":
        """The frame of a `dataset` config section (SPEC.md section 1 gives the units of its keys)."""
        spacing_hz = d.subcarrier_spacing * 1e3
        return FrameSpec(
            fft_size=d.fft_size,
            num_used=d.num_used_subcarriers,
            first_used=(d.num_guard_subcarriers + 1) // 2,
            spacing_hz=spacing_hz,
            sample_rate_hz=d.fft_size * spacing_hz,
            num_symbol=d.num_symbol,
            cp_ns=d.cp_length,
            max_extra_delay_ns=d.max_random_tap_delay_cp_proportion * d.cp_length,
            dmrs=tuple(d.ref_conf_dict.dmrs),
            mod_order=d.mod_order,
            wavelength_m=SPEED_OF_LIGHT_M_S / (d.carrier_freq * 1e9),
            tx_power_mw=10.0 ** (d.transmit_power / 10.0),
            noise_power_mw=10.0 ** (d.noise_spectral_density / 10.0) * spacing_hz,
            is_channel=d.is_channel,
            is_noise=d.is_noise,
        )

    @property
    def dmrs_index(self) -> np.ndarray:
        """(n_pilots,) int indices of the DMRS subcarriers among the num_used used ones (symbol 0)."""
        return np.arange(*self.dmrs)

    @property
    def num_pilots(self) -> int:
        """Number of DMRS REs (pilots) on symbol 0."""
        return len(range(*self.dmrs))

    @property
    def cp_fraction(self) -> float:
        """The cyclic prefix as a fraction of the symbol (the config's `DatasetConfig.cp_fraction`)."""
        return self.cp_ns * self.spacing_hz * 1e-9

    @property
    def samples_per_ns(self) -> float:
        """Sample rate in samples per ns (a delay in ns times this is a delay in samples)."""
        return self.sample_rate_hz * 1e-9


def pilot_sequence(spec: FrameSpec) -> np.ndarray:
    """(n_pilots,) complex64 DMRS symbols: QPSK with re and im each +-1/sqrt(2) (unit power), the same for
    every frame: drawn from `numpy.random.default_rng(0)` (re signs, then im signs; bit 1 -> negative)."""
    bits = np.random.default_rng(0).integers(0, 2, size=(2, spec.num_pilots))
    signs = 1.0 - 2.0 * bits
    return ((signs[0] + 1j * signs[1]) / np.sqrt(2.0)).astype(np.complex64)


def _qam_levels(mod_order: int) -> np.ndarray:
    levels = math.isqrt(mod_order)
    return (np.arange(levels) - (levels - 1) / 2.0) * np.sqrt(6.0 / (mod_order - 1))


def qam_constellation(mod_order: int) -> np.ndarray:
    """(mod_order,) complex64 points of square QAM with unit average power; point i_re * sqrt(M) + i_im has
    levels (i - (sqrt(M) - 1) / 2) * sqrt(6 / (M - 1)) per dimension (64-QAM: (i - 3.5) * sqrt(6/63))."""
    problem = mod_order_problem(mod_order)
    if problem:
        raise ValueError(f"mod_order={problem}")
    lv = _qam_levels(mod_order)
    return (lv[:, None] + 1j * lv[None, :]).reshape(-1).astype(np.complex64)


def path_loss_amplitude(distance_m: jax.Array, spec: FrameSpec) -> jax.Array:
    """Free-space amplitude sqrt(P_tx [mW]) * lambda / (4 pi d) for distances d in m (any shape, float32)."""
    scale = math.sqrt(spec.tx_power_mw) * spec.wavelength_m / (4.0 * math.pi)
    return jnp.float32(scale) / distance_m


# ---------------------------------------------------------------------------------------------
# PDP bank: every channel set on the device, padded to one shape


class PDPBank(NamedTuple):
    """The PDP sets of a dataset as device arrays (a pytree), zero padded over scenarios S, profiles M, taps L.

    delays_ns (S, M, L) float32 ns; powers (S, M, L) float32 linear, rows sum to 1, 0 on padding;
    num_profiles (S,) int32 profiles of each scenario; log_weights (S,) float32 log-probability of drawing
    each scenario (-inf for weight 0).
    """

    delays_ns: jax.Array
    powers: jax.Array
    num_profiles: jax.Array
    log_weights: jax.Array


def make_bank(pdp_sets: Sequence, weights: Optional[Sequence[float]] = None) -> PDPBank:
    """Pack PDP sets (`chest_jax.channels.PDPSet`: delays_ns (M, L), powers (M, L), num_taps (M,)) into a
    `PDPBank`. Scenarios are drawn uniformly unless `weights` (one non-negative number per set) are given."""
    if len(pdp_sets) == 0:
        raise ValueError("make_bank needs at least one PDP set (dataset.channel_type is empty?)")
    names = [getattr(s, "name", f"set {i}") for i, s in enumerate(pdp_sets)]
    for name, s in zip(names, pdp_sets):
        delays, powers, taps = np.asarray(s.delays_ns), np.asarray(s.powers), np.asarray(s.num_taps)
        if delays.ndim != 2 or delays.shape != powers.shape or taps.shape != delays.shape[:1] or delays.shape[0] < 1:
            raise ValueError(f"PDP set {name}: expected delays_ns and powers of one (M, L) shape with M >= 1 and "
                             f"num_taps (M,), got {delays.shape}, {powers.shape}, {taps.shape}")
        if not (np.all(np.isfinite(delays)) and np.all(np.isfinite(powers)) and np.all(powers >= 0)):
            raise ValueError(f"PDP set {name}: delays must be finite and powers finite and >= 0")
    if weights is None:
        weights = np.ones(len(pdp_sets))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(pdp_sets),) or np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"weights {weights.tolist()} must be one non-negative number per PDP set "
                         f"({', '.join(names)}), not all zero")

    num_scenarios = len(pdp_sets)
    max_profiles = max(np.asarray(s.delays_ns).shape[0] for s in pdp_sets)
    max_taps = max(np.asarray(s.delays_ns).shape[1] for s in pdp_sets)
    delays = np.zeros((num_scenarios, max_profiles, max_taps), np.float32)
    powers = np.zeros_like(delays)
    for i, s in enumerate(pdp_sets):
        m, taps = np.asarray(s.delays_ns).shape
        within = np.arange(taps)[None, :] < np.asarray(s.num_taps)[:, None]
        delays[i, :m, :taps] = np.where(within, s.delays_ns, 0.0)
        powers[i, :m, :taps] = np.where(within, s.powers, 0.0)
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights / weights.sum()).astype(np.float32)
    return PDPBank(
        delays_ns=jnp.asarray(delays),
        powers=jnp.asarray(powers),
        num_profiles=jnp.asarray([np.asarray(s.delays_ns).shape[0] for s in pdp_sets], dtype=jnp.int32),
        log_weights=jnp.asarray(log_weights),
    )


# ---------------------------------------------------------------------------------------------
# Per-RE random stream


def _re_draws(stream_Bx2: jax.Array, re_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 draws per RE; stream_Bx2 (B, 2) uint32 per-sample Threefry key, re_index (B or 1, ...) the
    RE's position symbol * K + subcarrier. Depends on the sample's key and the RE position only."""
    extra = re_index.ndim - 1
    key0 = stream_Bx2[:, 0].reshape((-1,) + (1,) * extra)
    key1 = stream_Bx2[:, 1].reshape((-1,) + (1,) * extra)
    return rng.threefry2x32(key0, key1, re_index, jnp.uint32(0))


def _unit_circle(draw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of a uniform angle from the top 24 bits of a uint32 draw, without a general sin/cos.

    21 bits give an angle in [0, pi/4) (Taylor series, error < 2e-9 there); the 3 top bits pick one of the 8
    symmetries of the square (swap, two sign flips), which map that octant onto the 8 octants of the circle.
    """
    u32 = jnp.uint32
    phi = ((draw >> 8) & u32((1 << 21) - 1)).astype(jnp.float32) * jnp.float32(np.pi / 4 / 2 ** 21)
    p2 = phi * phi
    sin = phi * (1 + p2 * (-1 / 6 + p2 * (1 / 120 + p2 * (-1 / 5040 + p2 * (1 / 362880)))))
    cos = 1 + p2 * (-1 / 2 + p2 * (1 / 24 + p2 * (-1 / 720 + p2 * (1 / 40320 + p2 * (-1 / 3628800)))))
    swap = ((draw >> 29) & u32(1)) == 1
    first, second = jnp.where(swap, sin, cos), jnp.where(swap, cos, sin)
    first = jnp.where(((draw >> 30) & u32(1)) == 1, -first, first)
    second = jnp.where((draw >> 31) == 1, -second, second)
    return first, second


def _complex_noise(draw_re: jax.Array, draw_im: jax.Array, sigma: float) -> jax.Array:
    """CN(0, sigma^2) from the top 24 bits of two uint32 draws: |W|^2 = sigma^2 Exp(1), uniform phase."""
    magnitude = jnp.float32(sigma) * jnp.sqrt(-jnp.log(rng.uniform_open(draw_re)))
    cos, sin = _unit_circle(draw_im)
    return lax.complex(magnitude * cos, magnitude * sin)


def _interleave_re_im(z: jax.Array) -> jax.Array:
    """complex (...,) -> float32 (..., 2) [re, im]; a select over a minor axis of 2 compiles to a faster loop
    than jnp.stack's concatenate on CPU."""
    part = lax.broadcasted_iota(jnp.int32, z.shape + (2,), z.ndim)
    return jnp.where(part == 0, jnp.real(z)[..., None], jnp.imag(z)[..., None])


def _qam_symbols(draw_re: jax.Array, draw_im: jax.Array, mod_order: int) -> jax.Array:
    """Uniform square-QAM symbols from the low bits of two uint32 draws (one level per dimension)."""
    levels = math.isqrt(mod_order)
    mask = jnp.uint32(levels - 1)
    offset = jnp.float32((levels - 1) / 2.0)
    step = jnp.float32(np.sqrt(6.0 / (mod_order - 1)))
    return lax.complex(((draw_re & mask).astype(jnp.float32) - offset) * step,
                       ((draw_im & mask).astype(jnp.float32) - offset) * step)


# ---------------------------------------------------------------------------------------------
# Batches


class Batch(NamedTuple):
    """One generated batch. B samples, K used subcarriers, L taps, S symbols in `inputs`.

    inputs (B, S, K, 2) float32: `ref_comp_rx_signal`, the received grid Y with the DMRS REs divided by
        their pilot, as (re, im). S = num_symbol with full=True; S = 1 in pilots mode, where only the DMRS REs
        of symbol 0 are non-zero.
    h (B, K) complex64: the label `ch_freq`, including path loss.
    tx (B, num_symbol, K) complex64 transmitted grid with full=True, None in pilots mode.
    noise_var (B,) float32 noise power per RE in mW (0 when is_noise is false).
    distance (B,) float32 m.  scenario (B,) int32 index into the bank.  profile (B,) int32 within its set.
    tap_delays_ns (B, L) float32 delays including the random extra delay.
    tap_powers (B, L) float32 linear PDP powers after the CP drop, summing to 1 (0 on dropped/padded taps).
    """

    inputs: jax.Array
    h: jax.Array
    tx: Optional[jax.Array]
    noise_var: jax.Array
    distance: jax.Array
    scenario: jax.Array
    profile: jax.Array
    tap_delays_ns: jax.Array
    tap_powers: jax.Array


class _SampleDraws(NamedTuple):
    scenario: jax.Array
    profile: jax.Array
    distance: jax.Array
    tap_delays_ns: jax.Array
    tap_powers: jax.Array
    gains: jax.Array
    grid_stream: jax.Array  # (2,) uint32: the Threefry key of this sample's per-RE draws


def _draw_sample(key: jax.Array, bank: PDPBank, spec: FrameSpec, distance_range: jax.Array) -> _SampleDraws:
    """The random parameters of one sample (SPEC steps 1-3), from its own key only.

    All of them come from one `jax.random.bits` call (each jax.random call compiles to its own unrolled
    threefry, and separate calls made compiling a batch function ~2 s slower).
    """
    num_scenarios, _, num_taps = bank.delays_ns.shape
    words = jax.random.bits(key, (num_scenarios + 5 + 2 * num_taps,), jnp.uint32)
    scenario_words, (profile_word, distance_word, delay_word), gain_words, grid_stream = jnp.split(
        words, [num_scenarios, num_scenarios + 3, num_scenarios + 3 + 2 * num_taps])
    # Gumbel-max: argmax(log w + Gumbel) draws scenario s with probability w_s (never one of weight 0).
    gumbel = -jnp.log(-jnp.log(rng.uniform_open(scenario_words)))
    scenario = jnp.argmax(bank.log_weights + gumbel).astype(jnp.int32)
    count = bank.num_profiles[scenario]
    # floor(u M) with a 24-bit u: uniform over the M profiles up to a relative bias of M / 2^24.
    profile = jnp.minimum(jnp.floor(rng.uniform(profile_word) * count.astype(jnp.float32)).astype(jnp.int32), count - 1)
    low, high = distance_range[0], distance_range[1]
    distance = low + (high - low) * rng.uniform(distance_word)
    extra_delay = jnp.float32(spec.max_extra_delay_ns) * rng.uniform(delay_word)

    delays = bank.delays_ns[scenario, profile] + extra_delay
    powers = bank.powers[scenario, profile]
    powers = jnp.where(delays <= spec.cp_ns, powers, 0.0)
    total = jnp.sum(powers)
    powers = powers / jnp.where(total > 0, total, 1.0)
    # CN(0, p): the same law as sqrt(p / 2) (g1 + j g2) with g1, g2 ~ N(0, 1).
    gains = jnp.sqrt(powers) * _complex_noise(gain_words[:num_taps], gain_words[num_taps:], 1.0)
    return _SampleDraws(scenario, profile, distance, delays, powers, gains, grid_stream)


def generate_batch(key: jax.Array, bank: PDPBank, spec: FrameSpec, batch_size: int, distance_range: jax.Array, *,
                   full: bool = False) -> Batch:
    """Generate `batch_size` samples (see `Batch`); jit-compatible with spec, batch_size and full static.

    key: a JAX PRNG key; sample i depends on `jax.random.split(key, batch_size)[i]` only. distance_range: (2,)
    [low, high] m, distances drawn uniformly (equal bounds fix the distance). full=False generates only what
    the estimator needs (the DMRS REs of symbol 0); full=True the whole num_symbol x K grid. Both give the same
    h and the same pilot inputs for the same key.
    """
    distance_range = jnp.asarray(distance_range, jnp.float32)
    keys = jax.random.split(key, batch_size)
    draws = jax.vmap(_draw_sample, in_axes=(0, None, None, None))(keys, bank, spec, distance_range)

    amplitude_B = path_loss_amplitude(draws.distance, spec)
    if spec.is_channel:
        h_BxK = channel_freq_response(draws.tap_delays_ns, draws.gains, spec) * amplitude_B[:, None]
    else:
        h_BxK = jnp.broadcast_to(amplitude_B[:, None], (batch_size, spec.num_used)).astype(jnp.complex64)
    noise_power = spec.noise_power_mw if spec.is_noise else 0.0
    sigma = math.sqrt(noise_power)

    if full:
        inputs, tx = _full_frame(h_BxK, draws.grid_stream, spec, sigma)
    else:
        inputs, tx = _pilot_frame(h_BxK, draws.grid_stream, spec, sigma), None
    return Batch(
        inputs=inputs,
        h=h_BxK,
        tx=tx,
        noise_var=jnp.full((batch_size,), noise_power, jnp.float32),
        distance=draws.distance,
        scenario=draws.scenario,
        profile=draws.profile,
        tap_delays_ns=draws.tap_delays_ns,
        tap_powers=draws.tap_powers,
    )


def _pilot_frame(h_BxK: jax.Array, stream_Bx2: jax.Array, spec: FrameSpec, sigma: float) -> jax.Array:
    """(B, 1, K, 2) LS observations at the DMRS REs of symbol 0, zeros elsewhere."""
    start, stop, step = spec.dmrs
    pilot_P = pilot_sequence(spec)
    y_BxP = h_BxK[:, start:stop:step] * jnp.asarray(pilot_P)
    if sigma > 0:
        re_index = jnp.asarray(spec.dmrs_index, jnp.uint32)[None, :]  # symbol 0: position = subcarrier
        y_BxP = y_BxP + _complex_noise(*_re_draws(stream_Bx2, re_index), sigma)
    ls_BxPx2 = _interleave_re_im(y_BxP * jnp.asarray(_reciprocal(pilot_P)))
    last = start + (spec.num_pilots - 1) * step
    # Interior padding places the pilots at start, start + step, ... without a scatter.
    padding = ((0, 0, 0), (start, spec.num_used - 1 - last, step - 1), (0, 0, 0))
    return lax.pad(ls_BxPx2, jnp.float32(0), padding)[:, None]


def _reciprocal(pilot: np.ndarray) -> np.ndarray:
    """1 / pilot in float64, rounded to complex64: LS divides by the pilot as a multiply."""
    return (1.0 / pilot.astype(np.complex128)).astype(np.complex64)


# Samples per pass of the full-frame generator, in REs: ~11 MB per complex64 grid. On CPU one pass over a
# (256, 14, 3072) batch was 10-30% slower per sample than passes of this size (memory bound).
_FULL_FRAME_CHUNK_RES = 32 * 14 * 3072


def _full_frame(h_BxK: jax.Array, stream_Bx2: jax.Array, spec: FrameSpec, sigma: float
                ) -> tuple[jax.Array, jax.Array]:
    """(B, S, K, 2) received grid with LS at the DMRS REs, and (B, S, K) complex64 transmitted grid.

    Built in chunks of samples (`lax.map`); every sample's values are independent of the chunking. A batch
    sharded over devices is reshaped here, so full frames are best generated unsharded (as evaluation does).
    """
    batch_size = h_BxK.shape[0]
    chunk = max(1, min(batch_size, _FULL_FRAME_CHUNK_RES // (spec.num_symbol * spec.num_used)))
    num_chunks = -(-batch_size // chunk)
    chunk = -(-batch_size // num_chunks)
    padded = num_chunks * chunk
    if padded != batch_size:
        h_BxK = jnp.pad(h_BxK, ((0, padded - batch_size), (0, 0)))
        stream_Bx2 = jnp.pad(stream_Bx2, ((0, padded - batch_size), (0, 0)))
    inputs, tx = lax.map(lambda args: _full_frame_chunk(*args, spec, sigma),
                         (h_BxK.reshape(num_chunks, chunk, -1), stream_Bx2.reshape(num_chunks, chunk, 2)))
    inputs = inputs.reshape((padded,) + inputs.shape[2:])[:batch_size]
    tx = tx.reshape((padded,) + tx.shape[2:])[:batch_size]
    return inputs, tx


def _full_frame_chunk(h_CxK: jax.Array, stream_Cx2: jax.Array, spec: FrameSpec, sigma: float
                      ) -> tuple[jax.Array, jax.Array]:
    shape = (1, spec.num_symbol, spec.num_used)
    symbol = lax.broadcasted_iota(jnp.uint32, shape, 1)
    subcarrier = lax.broadcasted_iota(jnp.uint32, shape, 2)
    draw_re, draw_im = _re_draws(stream_Cx2, symbol * jnp.uint32(spec.num_used) + subcarrier)

    start, stop, step = spec.dmrs
    pilot_K = np.zeros(spec.num_used, np.complex64)
    pilot_K[start:stop:step] = pilot_sequence(spec)
    ls_factor_K = np.ones(spec.num_used, np.complex64)
    ls_factor_K[start:stop:step] = _reciprocal(pilot_K[start:stop:step])
    on_pilot_K = np.zeros(spec.num_used, bool)
    on_pilot_K[start:stop:step] = True
    is_pilot = (symbol == 0) & jnp.asarray(on_pilot_K)
    x = jnp.where(is_pilot, jnp.asarray(pilot_K), _qam_symbols(draw_re, draw_im, spec.mod_order))

    y = h_CxK[:, None, :] * x
    if sigma > 0:
        y = y + _complex_noise(draw_re, draw_im, sigma)
    y = jnp.where(is_pilot, y * jnp.asarray(ls_factor_K), y)
    return _interleave_re_im(y), x


def make_batch_fn(spec: FrameSpec, batch_size: int, full: bool = False
                  ) -> Callable[[jax.Array, PDPBank, jax.Array], Batch]:
    """`generate_batch` for a fixed frame, batch size and mode, jitted: fn(key, bank, distance_range) -> Batch.
    A new bank or distance range does not recompile (only a bank of a new padded shape does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    jitted = jax.jit(lambda key, bank, distance_range: generate_batch(key, bank, spec, batch_size, distance_range,
                                                                      full=full))

    def batch_fn(key: jax.Array, bank: PDPBank, distance_range: jax.Array) -> Batch:
        if not isinstance(distance_range, jax.Array):  # host data: checking it costs no device sync
            bounds = np.asarray(distance_range, dtype=np.float64)
            if bounds.shape != (2,) or not 0 < bounds[0] <= bounds[1]:
                raise ValueError(f"distance_range {bounds.tolist()} must be [low, high] in m with 0 < low <= high")
        return jitted(key, bank, distance_range)

    return batch_fn
