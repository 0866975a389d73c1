"""Fidelity of the frame generator to SPEC.md section 1, checked against direct float64 NumPy evaluations and
the link budget, plus the properties training and data parallelism rely on (determinism, pilots vs full)."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from chest_jax import channel_response, ofdm, rng
from chest_jax.config import DatasetConfig, RefConfDict


@dataclasses.dataclass(frozen=True)
class StandInPDPSet:
    """The fields of chest_jax.channels.PDPSet that make_bank reads."""

    name: str
    delays_ns: np.ndarray
    powers: np.ndarray
    num_taps: np.ndarray


def pdp_set(name: str, profiles: list[list[tuple[float, float]]]) -> StandInPDPSet:
    width = max(len(p) for p in profiles)
    delays = np.zeros((len(profiles), width))
    powers = np.zeros((len(profiles), width))
    for i, taps in enumerate(profiles):
        d, p = np.array(taps, dtype=np.float64).T
        delays[i, : len(taps)], powers[i, : len(taps)] = d, p / p.sum()
    return StandInPDPSet(name, delays, powers, np.array([len(p) for p in profiles]))


MULTI = pdp_set("multi", [[(0, 1.0), (12.5, 0.5), (40.2, 0.2), (95.7, 0.1), (230.0, 0.05)],
                          [(0, 1.0), (7.3, 0.8), (21.9, 0.3)],
                          [(0, 1.0), (55.0, 0.6), (130.4, 0.3), (301.1, 0.1)],
                          [(0, 1.0), (3.1, 0.9)],
                          [(0, 1.0), (18.0, 0.4), (36.0, 0.2), (72.0, 0.1)],
                          [(0, 1.0)]])
SINGLE = pdp_set("single", [[(0, 1.0)]])
LATE = pdp_set("late", [[(0, 0.5), (200.0, 0.3), (700.0, 0.2)], [(0, 0.4), (500.0, 0.6)]])
SETS = (MULTI, SINGLE, LATE)  # one padded shape (3, 6, 5) for every bank below, so weights do not recompile

SMALL = ofdm.FrameSpec.from_config(DatasetConfig(fft_size=256, num_guard_subcarriers=64, num_symbol=4,
                                                 ref_conf_dict=RefConfDict((1, 190, 6))))
DEFAULT = ofdm.FrameSpec.from_config(DatasetConfig())
FAR = jnp.asarray([10.0, 500.0])


@functools.lru_cache(maxsize=None)
def batch_fn(spec: ofdm.FrameSpec, batch_size: int, full: bool):
    return ofdm.make_batch_fn(spec, batch_size, full)


def generate(spec, batch_size, full=False, seed=0, weights=None, distance_range=FAR):
    bank = ofdm.make_bank(SETS, weights)
    return batch_fn(spec, batch_size, full)(jax.random.key(seed), bank, jnp.asarray(distance_range, jnp.float32))


def reference_channel(delays_ns: np.ndarray, gains: np.ndarray, spec: ofdm.FrameSpec) -> np.ndarray:
    """SPEC steps 3-5 written out in float64, one tap at a time."""
    n = np.arange(spec.fft_size)
    h = np.zeros(spec.fft_size, np.complex128)
    for tau, a in zip(delays_ns, gains):
        h += a * np.sinc(n - tau * 1e-9 * spec.sample_rate_hz)
    energy = np.sum(np.abs(h) ** 2)
    if energy > 0:
        h /= np.sqrt(energy)
    spectrum = np.fft.fftshift(np.fft.fft(h) / np.sqrt(spec.fft_size))
    return spectrum[spec.first_used: spec.first_used + spec.num_used]


def to_complex(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[..., 0] + 1j * x[..., 1]


# ---------------------------------------------------------------------------------------------
# Frame description, pilots, constellation, PRNG


def test_frame_spec_of_the_default_config():
    s = DEFAULT
    assert (s.fft_size, s.num_used, s.first_used, s.num_symbol) == (4096, 3072, 512, 14)
    assert s.sample_rate_hz == pytest.approx(491.52e6)
    assert s.noise_power_mw == pytest.approx(10 ** (-174 / 10) * 120e3)
    assert s.wavelength_m == pytest.approx(299792458 / 28e9)
    assert s.tx_power_mw == pytest.approx(1000.0)
    assert s.max_extra_delay_ns == pytest.approx(0.2 * 590)
    np.testing.assert_array_equal(s.dmrs_index, np.arange(0, 3072, 6))
    assert s.num_pilots == 512
    assert hash(s) == hash(ofdm.FrameSpec.from_config(DatasetConfig()))
    odd_guard = ofdm.FrameSpec.from_config(DatasetConfig(num_guard_subcarriers=1023))
    assert (odd_guard.first_used, odd_guard.num_used) == (512, 3073)


def test_frame_spec_rejects_impossible_frames():
    with pytest.raises(ValueError, match="dmrs"):
        dataclasses.replace(SMALL, dmrs=(0, 500, 6))
    with pytest.raises(ValueError, match="mod_order"):
        dataclasses.replace(SMALL, mod_order=32)
    with pytest.raises(ValueError, match="first_used"):
        dataclasses.replace(SMALL, first_used=100)


def test_pilot_sequence_is_fixed_unit_power_qpsk():
    pilots = ofdm.pilot_sequence(DEFAULT)
    assert pilots.shape == (512,) and pilots.dtype == np.complex64
    np.testing.assert_array_equal(pilots, ofdm.pilot_sequence(DEFAULT))
    np.testing.assert_allclose(np.abs(pilots.real), 1 / np.sqrt(2), rtol=1e-7)
    np.testing.assert_allclose(np.abs(pilots.imag), 1 / np.sqrt(2), rtol=1e-7)
    for part in (pilots.real, pilots.imag):  # both signs occur
        assert 0.4 < np.mean(part > 0) < 0.6


@pytest.mark.parametrize("mod_order", [4, 16, 64, 256])
def test_qam_constellation_has_unit_average_power(mod_order):
    points = ofdm.qam_constellation(mod_order).astype(np.complex128)
    assert len(np.unique(points)) == mod_order
    assert np.mean(np.abs(points) ** 2) == pytest.approx(1.0, rel=1e-6)
    levels = np.unique(points.real)
    np.testing.assert_allclose(np.diff(levels), np.diff(levels)[0], rtol=1e-5)  # evenly spaced, symmetric
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-6)
    if mod_order == 64:
        np.testing.assert_allclose(levels, (np.arange(8) - 3.5) * np.sqrt(6 / 63), rtol=1e-6)


def test_threefry_matches_known_answers_and_jax():
    # Known-answer vectors of Threefry-2x32-20 from the Random123 distribution (key, counter -> out).
    cases = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for key, counter, expected in cases:
        out = jax.jit(rng.threefry2x32)(*(jnp.uint32(v) for v in key + counter))
        assert tuple(int(v) for v in out) == expected
    words = jax.random.bits(jax.random.key(1), (2, 1000), jnp.uint32)
    key = jnp.array([0x2545F491, 0x9E3779B9], jnp.uint32)
    expected = jax.extend.random.threefry_2x32(key, words.reshape(-1))
    out = rng.threefry2x32(key[0], key[1], words[0], words[1])
    np.testing.assert_array_equal(np.concatenate(out), expected)


def test_noise_transform_is_circular_gaussian():
    draws = rng.threefry2x32(jnp.uint32(7), jnp.uint32(11), jnp.arange(200_000, dtype=jnp.uint32), jnp.uint32(0))
    sigma = 3e-7
    w = np.asarray(jax.jit(ofdm._complex_noise, static_argnums=2)(*draws, sigma), np.complex128) / sigma
    assert abs(np.mean(w)) < 0.01
    assert np.mean(np.abs(w) ** 2) == pytest.approx(1.0, abs=0.01)
    assert abs(np.mean(w * w)) < 0.01  # circular: E[W^2] = 0
    for part in (w.real, w.imag):
        assert np.var(part) == pytest.approx(0.5, abs=0.01)
        assert np.mean(part ** 4) / np.var(part) ** 2 == pytest.approx(3.0, abs=0.06)  # Gaussian kurtosis
    cos, sin = (np.asarray(v, np.float64) for v in ofdm._unit_circle(draws[1]))
    np.testing.assert_allclose(cos ** 2 + sin ** 2, 1.0, atol=1e-6)
    counts, _ = np.histogram(np.arctan2(sin, cos), bins=16, range=(-np.pi, np.pi))
    np.testing.assert_allclose(counts / counts.mean(), 1.0, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Channel


@pytest.mark.parametrize("fft_size", [128, 127])  # an odd size takes the general fftshift path
def test_channel_matches_float64_reference(fft_size):
    # fs = 1 GHz makes delays in ns equal to delays in samples: integer delays hit the sampling grid, 3e-7 is
    # within the on-grid tolerance, 1e-3 is not.
    grid_spec = ofdm.FrameSpec(fft_size=fft_size, num_used=96, first_used=16, spacing_hz=1e9 / fft_size,
                               sample_rate_hz=1e9, num_symbol=1, cp_ns=100.0, max_extra_delay_ns=0.0,
                               dmrs=(0, 96, 4), mod_order=4, wavelength_m=0.01, tx_power_mw=1.0, noise_power_mw=0.0)
    rng = np.random.default_rng(0)
    delays = np.stack([rng.uniform(0, 60, 6), np.array([0.0, 3.0, 17.0, 2.5, 40.25, 1e-3]),
                       rng.uniform(0, 5, 6), np.array([0.0, 127.0, 127.5, 130.0, 64.0, 3e-7])]).astype(np.float32)
    gains = (rng.standard_normal((4, 6)) + 1j * rng.standard_normal((4, 6))).astype(np.complex64)
    gains[2, 3:] = 0
    got = np.asarray(jax.jit(channel_response.channel_freq_response, static_argnums=2)(delays, gains, grid_spec))
    for row in range(len(delays)):
        expected = reference_channel(delays[row].astype(np.float64), gains[row].astype(np.complex128), grid_spec)
        np.testing.assert_allclose(got[row], expected, rtol=0, atol=5e-6 * np.abs(expected).max())


def test_channel_of_the_default_frame_matches_float64_reference():
    # Fractional delays in ns (0.49152 samples per ns), up to the cyclic prefix.
    delays = np.array([[0.0, 11.7, 38.2, 95.1, 230.4, 512.9]], np.float32)
    gains = np.array([[1.0, 0.3 - 0.5j, 0.2j, -0.1, 0.05 + 0.05j, 0.02]], np.complex64)
    got = np.asarray(jax.jit(channel_response.channel_freq_response, static_argnums=2)(delays, gains, DEFAULT))[0]
    expected = reference_channel(delays[0].astype(np.float64), gains[0].astype(np.complex128), DEFAULT)
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6 * np.abs(expected).max())


def test_channel_of_no_taps_is_zero_not_nan():
    response = jax.jit(channel_response.channel_freq_response, static_argnums=2)
    got = response(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.complex64), SMALL)
    assert np.all(np.asarray(got) == 0)


def test_generated_single_tap_channel_matches_reference():
    batch = generate(SMALL, 16, weights=[0, 1, 0])
    amplitude = np.asarray(ofdm.path_loss_amplitude(batch.distance, SMALL))
    for i in range(4):
        expected = reference_channel(np.asarray(batch.tap_delays_ns[i, :1], np.float64), np.ones(1), SMALL)
        # One Rayleigh tap, normalised: the channel is the reference times a unit phase and the path loss.
        np.testing.assert_allclose(np.abs(batch.h[i]), amplitude[i] * np.abs(expected), rtol=2e-5)


def test_taps_beyond_the_cyclic_prefix_are_dropped():
    batch = generate(SMALL, 64, weights=[0, 0, 1])
    delays, powers = np.asarray(batch.tap_delays_ns, np.float64), np.asarray(batch.tap_powers, np.float64)
    extra = delays[:, 0]
    assert np.all((extra >= 0) & (extra <= SMALL.max_extra_delay_ns))
    kept = delays <= SMALL.cp_ns
    profile0 = np.asarray(batch.profile) == 0
    assert profile0.any() and (~profile0).any()
    np.testing.assert_array_equal(powers[profile0, 2], 0.0)  # the 700 ns tap is always late
    np.testing.assert_allclose(powers[profile0, :2], np.tile([0.625, 0.375], (profile0.sum(), 1)), rtol=1e-6)
    listed = np.zeros((len(LATE.num_taps), powers.shape[1]), bool)
    listed[:, : LATE.powers.shape[1]] = LATE.powers > 0
    np.testing.assert_array_equal(powers > 0, kept & listed[batch.profile])
    np.testing.assert_allclose(powers.sum(axis=1), 1.0, rtol=1e-6)
    late = ~profile0 & ~kept[:, 1]  # profile 1 whose 500 ns tap went past 590 ns: a single tap remains
    amplitude = np.asarray(ofdm.path_loss_amplitude(batch.distance, SMALL))
    for i in np.flatnonzero(late)[:3]:
        expected = reference_channel(delays[i, :1], np.ones(1), SMALL)
        np.testing.assert_allclose(np.abs(batch.h[i]), amplitude[i] * np.abs(expected), rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# Frames


def test_full_frame_least_squares_and_noise():
    clean_spec = dataclasses.replace(SMALL, is_noise=False)
    noisy, clean = generate(SMALL, 48, full=True), generate(clean_spec, 48, full=True)
    sigma2 = SMALL.noise_power_mw
    np.testing.assert_allclose(noisy.noise_var, sigma2, rtol=1e-6)
    np.testing.assert_array_equal(clean.noise_var, 0.0)
    np.testing.assert_array_equal(noisy.tx, clean.tx)
    h = np.asarray(noisy.h, np.complex128)
    np.testing.assert_allclose(h, clean.h, rtol=0, atol=1e-6 * np.abs(h).max())

    dmrs = SMALL.dmrs_index
    tx = np.asarray(noisy.tx, np.complex128)
    np.testing.assert_array_equal(noisy.tx[:, 0, dmrs], np.broadcast_to(ofdm.pilot_sequence(SMALL), (48, len(dmrs))))
    is_data = np.ones(tx.shape[1:], bool)
    is_data[0, dmrs] = False

    # Noise free: LS at a pilot is H, every other RE is H X.
    y_clean = to_complex(clean.inputs)
    scale = np.abs(h).max()
    np.testing.assert_allclose(y_clean[:, 0, dmrs], h[:, dmrs], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(y_clean[:, is_data], (h[:, None, :] * tx)[:, is_data], rtol=0, atol=2e-6 * scale)

    # With noise: W = Y - H X on data REs, and LS = H + W / X at the pilots, W ~ CN(0, noise_var) on both.
    y = to_complex(noisy.inputs)
    w_data = (y - y_clean)[:, is_data]
    np.testing.assert_allclose(w_data, y[:, is_data] - (h[:, None, :] * tx)[:, is_data], rtol=0, atol=2e-6 * scale)
    w_pilot = (y[:, 0, dmrs] - h[:, dmrs]) * tx[:, 0, dmrs]
    for w in (w_data.ravel(), w_pilot.ravel()):
        assert np.mean(np.abs(w) ** 2) / sigma2 == pytest.approx(1.0, abs=0.06)
        assert abs(np.mean(w)) / math.sqrt(sigma2) < 0.05
        assert np.var(w.real) / sigma2 == pytest.approx(0.5, abs=0.04)


def test_symbols_have_unit_average_power():
    batch = generate(SMALL, 48, full=True)
    tx = np.asarray(batch.tx, np.complex128)
    pilots = tx[:, 0, SMALL.dmrs_index]
    np.testing.assert_allclose(np.abs(pilots) ** 2, 1.0, rtol=1e-6)
    data = np.delete(tx.reshape(48, -1), SMALL.dmrs_index, axis=1).ravel()
    assert np.mean(np.abs(data) ** 2) == pytest.approx(1.0, abs=0.02)
    points = ofdm.qam_constellation(64).astype(np.complex128)
    assert np.max(np.min(np.abs(data[:, None] - points[None, :]), axis=1)) < 1e-6
    levels, counts = np.unique(np.round(data.real, 5), return_counts=True)
    assert len(levels) == 8
    np.testing.assert_allclose(counts / counts.mean(), 1.0, atol=0.08)


def test_pilots_mode_equals_full_mode_at_the_pilots():
    pilots, full = generate(SMALL, 48), generate(SMALL, 48, full=True)
    assert pilots.inputs.shape == (48, 1, SMALL.num_used, 2) and pilots.tx is None
    assert full.inputs.shape == (48, SMALL.num_symbol, SMALL.num_used, 2)
    assert full.tx.shape == (48, SMALL.num_symbol, SMALL.num_used)
    off_pilot = np.ones(SMALL.num_used, bool)
    off_pilot[SMALL.dmrs_index] = False
    np.testing.assert_array_equal(np.asarray(pilots.inputs)[:, :, off_pilot], 0.0)
    for name in ("distance", "scenario", "profile", "tap_delays_ns", "tap_powers", "noise_var"):
        np.testing.assert_array_equal(getattr(pilots, name), getattr(full, name), err_msg=name)
    scale = float(np.abs(full.h).max())
    np.testing.assert_allclose(pilots.h, full.h, rtol=0, atol=1e-6 * scale)
    dmrs = SMALL.dmrs_index
    np.testing.assert_allclose(pilots.inputs[:, 0, dmrs], full.inputs[:, 0, dmrs], rtol=0, atol=1e-6 * scale)


def test_same_key_same_batch_and_samples_depend_on_their_index_only():
    first, again, other = generate(SMALL, 8), generate(SMALL, 8), generate(SMALL, 8, seed=1)
    for name, value in first._asdict().items():
        if value is not None:
            np.testing.assert_array_equal(value, getattr(again, name), err_msg=name)
    assert not np.allclose(first.h, other.h)
    assert not np.allclose(first.inputs, other.inputs)
    # A data-parallel shard of the batch draws the same samples as the whole batch.
    half = generate(SMALL, 4)
    np.testing.assert_array_equal(half.tap_delays_ns, first.tap_delays_ns[:4])
    np.testing.assert_allclose(half.inputs, first.inputs[:4], rtol=0, atol=1e-6 * float(np.abs(first.h).max()))


@pytest.mark.parametrize("distance_m, expected_db", [(50.0, 21.7), (300.0, 6.2)])
def test_pilot_snr_matches_the_link_budget(distance_m, expected_db):
    batch = generate(DEFAULT, 32, distance_range=(distance_m, distance_m), weights=[1, 1, 0])
    np.testing.assert_array_equal(batch.distance, distance_m)
    h_pilots = np.asarray(batch.h, np.complex128)[:, DEFAULT.dmrs_index]
    snr_db = 10 * np.log10(np.mean(np.abs(h_pilots) ** 2) / np.mean(batch.noise_var))
    assert snr_db == pytest.approx(expected_db, abs=0.3)
    # Unit channel energy spread over N bins, scaled by the free-space gain.
    budget = DEFAULT.tx_power_mw * (DEFAULT.wavelength_m / (4 * np.pi * distance_m)) ** 2
    budget_db = 10 * np.log10(budget / DEFAULT.fft_size / DEFAULT.noise_power_mw)
    assert snr_db == pytest.approx(budget_db, abs=0.3)


def test_channel_and_noise_switches():
    flat = dataclasses.replace(SMALL, is_channel=False, is_noise=False)
    batch = generate(flat, 16)
    amplitude = np.asarray(ofdm.path_loss_amplitude(batch.distance, SMALL))
    np.testing.assert_allclose(batch.h, np.broadcast_to(amplitude[:, None], batch.h.shape), rtol=1e-7)
    dmrs = SMALL.dmrs_index
    np.testing.assert_allclose(to_complex(batch.inputs[:, 0, dmrs]), batch.h[:, dmrs], rtol=1e-6)
    np.testing.assert_array_equal(batch.noise_var, 0.0)

    noisy_flat = generate(dataclasses.replace(SMALL, is_channel=False), 16)
    np.testing.assert_allclose(noisy_flat.h, batch.h, rtol=1e-7)
    assert not np.allclose(to_complex(noisy_flat.inputs[:, 0, dmrs]), noisy_flat.h[:, dmrs], rtol=1e-3)


def test_distances_and_scenario_weights():
    batch = generate(SMALL, 64, weights=[1, 0, 3], distance_range=(20.0, 40.0))
    distance = np.asarray(batch.distance)
    assert np.all((distance >= 20.0) & (distance <= 40.0)) and np.ptp(distance) > 5.0
    scenario = np.asarray(batch.scenario)
    assert not np.any(scenario == 1)  # weight 0 is never drawn
    assert np.mean(scenario == 2) > 0.55
    assert np.all(np.asarray(batch.profile) < np.array([len(s.num_taps) for s in SETS])[scenario])


def test_make_bank_pads_and_validates():
    bank = ofdm.make_bank(SETS)
    assert bank.delays_ns.shape == bank.powers.shape == (3, 6, 5)
    np.testing.assert_array_equal(bank.num_profiles, [6, 1, 2])
    np.testing.assert_allclose(np.exp(bank.log_weights), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(bank.powers.sum(axis=-1)[0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(bank.powers[1, 1:], 0.0)  # padded profiles of the one-profile set
    with pytest.raises(ValueError, match="one non-negative number per PDP set"):
        ofdm.make_bank(SETS, [1.0, 2.0])
    with pytest.raises(ValueError, match="not all zero"):
        ofdm.make_bank(SETS, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least one PDP set"):
        ofdm.make_bank([])
    with pytest.raises(ValueError, match="0 < low <= high"):
        batch_fn(SMALL, 8, False)(jax.random.key(0), bank, (50.0, 10.0))


TINY = ofdm.FrameSpec.from_config(DatasetConfig(fft_size=64, num_guard_subcarriers=16, num_symbol=2,
                                                ref_conf_dict=RefConfDict((0, 48, 4))))


def test_full_frames_built_in_chunks_are_the_same_samples(monkeypatch):
    bank = ofdm.make_bank(SETS)
    key = jax.random.key(5)
    whole = ofdm.make_batch_fn(TINY, 5, True)(key, bank, FAR)
    # Full frames are built a few samples at a time; a split into chunks of 2 (the last one padded) changes
    # nothing.
    monkeypatch.setattr(ofdm, "_FULL_FRAME_CHUNK_RES", 2 * TINY.num_symbol * TINY.num_used)
    chunked = ofdm.make_batch_fn(TINY, 5, True)(key, bank, FAR)
    np.testing.assert_array_equal(chunked.tx, whole.tx)
    scale = float(np.abs(whole.h).max())
    np.testing.assert_allclose(chunked.inputs, whole.inputs, rtol=0, atol=1e-6 * scale)
    assert np.all(np.isfinite(chunked.inputs))
