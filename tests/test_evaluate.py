"""Metrics, classical estimators, test sets and their cache (chest_jax/evaluate.py), plots of estimates."""
import dataclasses
import json
import os

import jax
import matplotlib.image
import numpy as np
import pytest

from chest_jax import channels, config as C, baselines, evaluate, metrics, references, testsets, ofdm, plots

# fft 256 with 64 guards: 192 used subcarriers, 32 pilots; few profiles so the PDP pool is quick to make.
SMALL = [
    "dataset.fft_size=256", "dataset.num_guard_subcarriers=64", "dataset.ref_conf_dict.dmrs=[0, 192, 6]",
    "dataset.num_profiles=30", "dataset.channel_type=[InF_Los]",
    "ch_estimation.cond.length=192", "ch_estimation.transformer.length=192", "ch_estimation.transformer.n_token=16",
]


def small_cfg(*extra):
    return C.load(None, [*SMALL, *extra])


def generate(cfg, num_samples, distance, *, full=True, seed=0, part="test"):
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    bank = ofdm.make_bank(channels.load_split(cfg.dataset, part))
    fn = testsets._batch_fn(spec, full)
    out = fn(jax.random.PRNGKey(seed), bank, np.array([distance, distance], np.float32))
    return spec, jax.tree.map(lambda x: np.asarray(x)[:num_samples], out)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_nmse_is_the_mean_of_per_sample_ratios_not_the_pooled_ratio():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 8)) + 1j * rng.normal(size=(2, 8))
    h[1] *= 10.0  # a near (strong) sample
    err = rng.normal(size=(2, 8)) + 1j * rng.normal(size=(2, 8))
    err[0] *= 0.1 * np.linalg.norm(h[0]) / np.linalg.norm(err[0])  # NMSE 0.01
    err[1] *= np.sqrt(0.1) * np.linalg.norm(h[1]) / np.linalg.norm(err[1])  # NMSE 0.1
    est = h + err

    per_sample = metrics.nmse_per_sample(h, est)
    np.testing.assert_allclose(per_sample, [0.01, 0.1], rtol=1e-12)
    assert metrics.nmse_db(per_sample) == pytest.approx(10 * np.log10(0.055))
    pooled = np.sum(np.abs(err) ** 2) / np.sum(np.abs(h) ** 2)
    assert metrics.pooled_nmse_db(h, est) == pytest.approx(10 * np.log10(pooled))
    # the strong, worse sample dominates pooled
    assert metrics.pooled_nmse_db(h, est) > metrics.nmse_db(per_sample) + 1.0
    # (re, im) pairs and complex arrays are the same thing
    np.testing.assert_allclose(metrics.nmse_per_sample(metrics.to_real_pair(h), metrics.to_real_pair(est)), per_sample,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        metrics.nmse_per_sample(h, est[:, :4])


def test_evm_counts_data_res_only_and_accepts_an_estimate():
    cfg = small_cfg()
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    rng = np.random.default_rng(1)
    qam = ofdm.qam_constellation(spec.mod_order)
    tx = rng.choice(qam, size=(3, spec.num_symbol, spec.num_used))
    eq = 1.1 * tx  # error amplitude 10% of the symbol: EVM^2 = 0.01
    eq[:, 0, spec.dmrs_index] = 100.0  # DMRS REs must not count
    batch = testsets.TestBatch(inputs=metrics.to_real_pair(eq), h=np.ones((3, spec.num_used)), tx=tx)
    assert metrics.evm_db(metrics.to_real_pair(eq), batch, spec) == pytest.approx(-20.0, abs=1e-4)
    assert metrics.evm_percent_from_db(-20.0) == pytest.approx(10.0)

    # From a channel estimate: noise-free Y = H X equalized with the true H gives zero error.
    h = (rng.normal(size=(3, spec.num_used)) + 1j * rng.normal(size=(3, spec.num_used))) * 1e-6
    y = h[:, None, :] * tx
    y[:, 0, spec.dmrs_index] = h[:, spec.dmrs_index]  # DMRS REs hold Y / pilot
    batch = testsets.TestBatch(inputs=metrics.to_real_pair(y), h=h, tx=tx)
    assert metrics.evm_db(h, batch, spec) < -100.0
    assert metrics.evm_db(metrics.to_real_pair(h), batch, spec) < -100.0
    with pytest.raises(ValueError, match="transmitted frame"):
        metrics.evm_db(h, dataclasses.replace(batch, tx=None), spec)


# ---------------------------------------------------------------------------------------------
# Estimators


def test_ls_interpolates_linearly_between_pilots_and_holds_the_edge_pilot_beyond():
    cfg = small_cfg()
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    k = np.arange(spec.num_used)
    h = (0.5 + 0.01 * k) * np.exp(1j * 0.02)  # linear in k: interpolation must be exact between pilots
    inputs = np.zeros((1, 1, spec.num_used, 2), np.float32)
    inputs[0, 0, spec.dmrs_index] = metrics.to_real_pair(h[spec.dmrs_index])
    est = baselines.ls_linear(inputs, spec)[0]
    last = spec.dmrs_index[-1]
    np.testing.assert_allclose(est[: last + 1], h[: last + 1], rtol=1e-6)
    np.testing.assert_allclose(est[last + 1:], h[last], rtol=1e-6)


def test_ls_is_exact_on_a_noise_free_flat_channel():
    cfg = small_cfg("dataset.is_channel=false", "dataset.is_noise=false")
    spec, batch = generate(cfg, 4, 100.0)
    est = baselines.ls_linear(batch.inputs, spec)
    np.testing.assert_allclose(est, batch.h, rtol=1e-6)
    assert metrics.evm_db(est, batch, spec) < -100.0
    assert metrics.nmse_db(metrics.nmse_per_sample(batch.h, baselines.lmmse_genie(batch, spec))) < -100.0


def test_noise_free_estimators_are_exact_where_they_should_be():
    cfg = small_cfg("dataset.is_noise=false")
    spec, batch = generate(cfg, 8, 100.0)
    pilots = spec.dmrs_index
    np.testing.assert_allclose(baselines.ls_linear(batch.inputs, spec)[:, pilots], batch.h[:, pilots], rtol=1e-5)
    # The genie knows the taps, so without noise it recovers the channel between the pilots as well.
    genie = baselines.lmmse_genie(batch, spec)
    assert metrics.nmse_db(metrics.nmse_per_sample(batch.h, genie)) < -50.0


def test_lmmse_beats_ls_on_average():
    cfg = small_cfg()
    # 300 m gives ~18 dB SNR per RE in this small frame: noise matters, interpolation matters.
    spec, batch = generate(cfg, 32, 300.0)
    ls_db = metrics.nmse_db(metrics.nmse_per_sample(batch.h, baselines.ls_linear(batch.inputs, spec)))
    genie_db = metrics.nmse_db(metrics.nmse_per_sample(batch.h, baselines.lmmse_genie(batch, spec)))
    correlation = baselines.training_correlation(cfg, "InF_Los", num_samples=64, seed=3)
    practical_db = metrics.nmse_db(metrics.nmse_per_sample(
        batch.h, baselines.lmmse_practical(batch.inputs, batch.noise_var, correlation, spec)))
    print(f"NMSE at 300 m: LS {ls_db:.2f} dB, practical LMMSE {practical_db:.2f} dB, genie LMMSE {genie_db:.2f} dB")
    assert genie_db < ls_db - 3.0
    assert practical_db < ls_db
    assert genie_db < practical_db + 1.0  # true statistics should not lose to estimated ones (loose: 32 samples)


def test_uniform_pdp_correlation_is_the_mean_phase_over_delays_uniform_on_the_cp():
    offsets = np.array([0, 1, 5, 37, -12, 600])
    c = 0.0708
    t = (np.arange(20000) + 0.5) / 20000 * c  # midpoint rule over [0, c)
    expected = np.mean(np.exp(-2j * np.pi * offsets[:, None] * t), axis=1)
    np.testing.assert_allclose(references.uniform_pdp_correlation(offsets, c), expected, atol=1e-6)


def _pilot_set(tiny_cfg, channel_type, distance, num_samples, seed):
    """(spec, arrays, pilot LS estimates (B, P)) of a tiny-frame test set of one type at one distance."""
    cfg = tiny_cfg(f"dataset.channel_type=[{channel_type}]")
    ds = testsets.single_type_dataset(cfg, channel_type, (distance, distance))
    arr = testsets.generate_samples(ds, "test", num_samples, jax.random.PRNGKey(seed), full=False)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    return spec, arr, baselines.pilot_observations(arr["inputs"], spec)


@pytest.mark.parametrize("distance", [10.0, 300.0])
def test_noise_variance_estimate_from_beyond_the_cp_is_unbiased_at_high_and_low_snr(tiny_cfg, distance):
    """The pilot-domain bins beyond the CP hold only noise: their mean power, over a batch, is the true noise
    variance within its sampling error, also at 10 m where the channel is ~30 dB above the noise and its leakage
    (without the window: several times the noise) would dominate."""
    spec, arr, y = _pilot_set(tiny_cfg, "RMa_Los", distance, 64, 0)
    noise = references.estimate_noise_variance(y, spec.dmrs, spec.cp_fraction)
    first, last = references._noise_bin_range(spec.dmrs, spec.cp_fraction)
    # each bin's power is a chi-square with 2 degrees of freedom: relative std 1 / sqrt(bins x samples)
    tolerance = 4.0 / np.sqrt((last - first) * len(y))
    assert abs(np.mean(noise) / np.mean(arr["noise_var"]) - 1) < tolerance
    # unwindowed, the leakage of the strong near channel would read as noise several times over
    raw = len(y[0]) * np.mean(np.abs(np.fft.ifft(y, axis=1)[:, first:last]) ** 2, axis=1)
    if distance == 10.0:
        assert np.mean(raw) > 2 * np.mean(arr["noise_var"])


def test_robust_lmmse_equals_the_direct_solve_and_beats_ls(tiny_cfg):
    spec, arr, y = _pilot_set(tiny_cfg, "InF_Los", 100.0, 32, 1)
    got = baselines.lmmse_robust(arr["inputs"], spec)
    pilots = spec.dmrs_index
    R = references.uniform_pdp_correlation(np.arange(spec.num_used)[:, None] - pilots[None, :], spec.cp_fraction)
    sigma2 = references.estimate_noise_variance(y, spec.dmrs, spec.cp_fraction)
    rho = np.mean(np.abs(y) ** 2, axis=1) - sigma2
    direct = np.stack([R @ np.linalg.solve(R[pilots] + s2 / r * np.eye(len(pilots)), yb)
                       for yb, s2, r in zip(y, sigma2, rho)])
    assert _rel_err(got, direct) < 1e-6
    ls_db = metrics.nmse_db(metrics.nmse_per_sample(arr["h"], baselines.ls_linear(arr["inputs"], spec)))
    robust_db = metrics.nmse_db(metrics.nmse_per_sample(arr["h"], got))
    assert robust_db < ls_db - 1.0, (robust_db, ls_db)


def test_exponential_pdp_correlation_is_the_mean_phase_under_that_profile():
    offsets = np.array([0, 1, 7, -30, 250])
    c, mean = 0.0708, 0.1
    t = (np.arange(40000) + 0.5) / 40000 * c
    w = np.exp(-t / (mean * c))
    expected = (np.exp(-2j * np.pi * offsets[:, None] * t) @ w) / w.sum()
    np.testing.assert_allclose(references.pdp_correlation(offsets, c, mean), expected, atol=1e-6)


def test_adaptive_lmmse_applies_the_most_likely_profile_and_beats_the_robust_one(tiny_cfg):
    """Per sample: the profile j maximising the Gaussian likelihood of the pilots, log N(y; 0, rho (R_j + s I)),
    computed here densely (slogdet and solve), and that profile's LMMSE solved directly."""
    spec, arr, y = _pilot_set(tiny_cfg, "RMa_Los", 150.0, 24, 4)
    got = baselines.lmmse_adaptive(arr["inputs"], spec)
    pilots = spec.dmrs_index
    offsets = np.arange(spec.num_used)[:, None] - pilots[None, :]
    sigma2 = references.estimate_noise_variance(y, spec.dmrs, spec.cp_fraction)
    rho = np.mean(np.abs(y) ** 2, axis=1) - sigma2
    assert np.all(rho > 1e-3 * (rho + sigma2))
    expected, chosen = [], []
    for b in range(len(y)):
        best = None
        for mean_delay in references.ADAPTIVE_MEAN_DELAYS:
            R = references.pdp_correlation(offsets, spec.cp_fraction, mean_delay)
            C_ = rho[b] * (R[pilots] + sigma2[b] / rho[b] * np.eye(len(pilots)))
            loglik = -np.linalg.slogdet(C_)[1] - np.real(y[b].conj() @ np.linalg.solve(C_, y[b]))
            if best is None or loglik > best[0]:
                best = (loglik, mean_delay, R @ np.linalg.solve(R[pilots] + sigma2[b] / rho[b] * np.eye(len(pilots)),
                                                                y[b]))
        chosen.append(best[1])
        expected.append(best[2])
    assert _rel_err(got, np.array(expected)) < 1e-6
    # RMa LoS channels are short: the uniform profile is rarely the likeliest, and the choice pays
    assert sum(c is None for c in chosen) < len(chosen) / 2
    robust_db = metrics.nmse_db(metrics.nmse_per_sample(arr["h"], baselines.lmmse_robust(arr["inputs"], spec)))
    assert metrics.nmse_db(metrics.nmse_per_sample(arr["h"], got)) < robust_db - 0.5


def test_box_lmmse_is_the_lmmse_of_its_box_profile_and_equal_boxes_are_the_robust_one(tiny_cfg):
    spec, arr, y = _pilot_set(tiny_cfg, "InF_Los", 100.0, 6, 2)
    basis = references.delay_box_basis(spec.dmrs, spec.num_used, spec.cp_fraction)
    boxes = basis.bins_per_box.size
    sigma2 = references.estimate_noise_variance(y, spec.dmrs, spec.cp_fraction)
    s = sigma2 / (np.mean(np.abs(y) ** 2, axis=1) - sigma2)
    equal = references.box_lmmse(y, np.full((len(y), boxes), 1.0 / boxes), basis, s)
    assert _rel_err(equal, baselines.lmmse_robust(arr["inputs"], spec)) < 1e-2
    # any profile: the dense LMMSE whose correlation is the profile's mix of uniform boxes, in closed form
    pdp = np.random.default_rng(0).dirichlet(np.ones(boxes), size=len(y))
    edges = np.linspace(0, spec.cp_fraction, boxes + 1)
    pilots = spec.dmrs_index
    offsets = np.arange(spec.num_used)[:, None] - pilots[None, :]

    def box(lo, hi):  # E exp(-2j pi o t), t uniform on [lo, hi)
        x = 2 * np.pi * np.where(offsets == 0, 1, offsets)
        return np.where(offsets == 0, 1, (np.exp(-1j * x * lo) - np.exp(-1j * x * hi)) / (1j * x * (hi - lo)))

    R_boxes = [box(edges[m], edges[m + 1]) for m in range(boxes)]
    direct = []
    for b in range(len(y)):
        R = sum(p * Rm for p, Rm in zip(pdp[b], R_boxes))
        direct.append(R @ np.linalg.solve(R[pilots] + s[b] * np.eye(len(pilots)), y[b]))
    # to the basis's truncation and quadrature (2e-4 of the correlation), which the solve amplifies a little
    assert _rel_err(references.box_lmmse(y, pdp, basis, s), np.array(direct)) < 3e-3


def test_box_lmmse_in_jax_solves_one_sample_at_a_time_on_cpu_as_the_batched_solve_and_numpy_do(tiny_cfg):
    import jax
    import jax.numpy as jnp

    spec, arr, y = _pilot_set(tiny_cfg, "InF_Los", 100.0, 5, 2)
    basis = references.delay_box_basis(spec.dmrs, spec.num_used, spec.cp_fraction)
    pdp = np.random.default_rng(1).dirichlet(np.ones(basis.bins_per_box.size), size=len(y))
    s = np.random.default_rng(2).uniform(1e-3, 1e-1, len(y))
    y64, pdp32, s32 = jnp.asarray(y, jnp.complex64), jnp.asarray(pdp, jnp.float32), jnp.asarray(s, jnp.float32)
    on_cpu = jax.jit(lambda y, p, s: references.box_lmmse(y, p, basis, s, xp=jnp))
    # the CPU branch is what the platform lowering picks: a loop over the samples, one Cholesky each
    assert "stablehlo.while" in on_cpu.lower(y64, pdp32, s32).as_text()
    assert _rel_err(np.asarray(on_cpu(y64, pdp32, s32)), references.box_lmmse(y, pdp, basis, s)) < 1e-5
    # the batched solve (what other platforms run) gives the same numbers
    root_d = jnp.sqrt(pdp32[:, basis.box_R]).astype(jnp.complex64)
    rhs = root_d * (y64 @ jnp.asarray(basis.f_pilots_PxR.conj(), jnp.complex64))
    args = (root_d, s32.astype(jnp.complex64), rhs, jnp.asarray(basis.gram_RxR, jnp.complex64))
    one_at_a_time = np.asarray(jax.jit(references._box_solve_one_at_a_time)(*args))
    batched = np.asarray(jax.jit(references._box_solve_batched)(*args))
    np.testing.assert_allclose(one_at_a_time, batched, rtol=1e-6, atol=1e-6 * np.abs(batched).max())


_TWO_DEVICE_PDP = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from chest_jax import references
dmrs, cp = (0, 384, 6), 0.0708
y = np.random.default_rng(0).standard_normal((8, 64, 2)).astype(np.float32)
y = jnp.asarray(y[..., 0] + 1j * y[..., 1])
f = jax.jit(lambda y: references.pdp_lmmse(y, dmrs, 384, cp, xp=jnp))
one = np.asarray(f(y))
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
with jax.set_mesh(mesh):
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    two, hlo = np.asarray(f(ys)), f.lower(ys).compile().as_text()
print("rel", float(np.max(np.abs(two - one)) / np.max(np.abs(one))))
print("cholesky", ";".join(line.split("=")[1].split("custom-call")[0].strip() for line in hlo.splitlines()
                            if "lapack_cpotrf" in line and "custom-call(" in line))
"""


def test_lmmse_pdp_under_a_two_device_mesh_loops_over_each_devices_samples():
    # Data-parallel over two CPU devices (run_training sets the mesh): each device solves its own samples one at a
    # time (one system per LAPACK call; a batched call of the device's 4 deadlocked there), as on one device.
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICE_PDP], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("rel", "cholesky")))
    assert float(lines["rel"]) < 1e-5
    shapes = lines["cholesky"].split(";")  # the shapes of the LAPACK Cholesky calls in the compiled program
    assert shapes and all(shape.startswith("(c64[1,") for shape in shapes), shapes


def test_jaxlibs_lapack_is_kept_to_one_thread():
    import ctypes

    found = references._single_thread_lapack()
    getter = next((getattr(ctypes.CDLL(p), "scipy_openblas_get_num_threads", None)
                   for p in references.scipy_openblas_paths()), None)
    if getter is None:
        pytest.skip("this scipy build has no scipy_openblas library to inspect")
    assert found and getter() == 1


def test_estimated_pdp_finds_a_single_tap_and_lmmse_pdp_beats_the_adaptive_lmmse(tiny_cfg):
    spec, arr, y = _pilot_set(tiny_cfg, "RMa_Los", 100.0, 24, 3)
    basis = references.delay_box_basis(spec.dmrs, spec.num_used, spec.cp_fraction)
    # one tap at the centre of box 2, 30 dB above the noise: the profile puts nearly all its power there
    boxes = basis.bins_per_box.size
    delay = (2.5 / boxes) * spec.cp_fraction
    rng = np.random.default_rng(1)
    tap = np.exp(-2j * np.pi * spec.dmrs_index * delay)[None, :]
    noisy = tap + 10 ** (-30 / 20) * (rng.normal(size=(4, tap.size)) + 1j * rng.normal(size=(4, tap.size))) / np.sqrt(2)
    pdp = references.estimate_pdp(noisy, spec.dmrs, spec.cp_fraction, basis)
    np.testing.assert_allclose(pdp.sum(axis=1), 1.0)
    assert np.all(pdp[:, 2] > 0.9), pdp
    adaptive_db = metrics.nmse_db(metrics.nmse_per_sample(arr["h"], baselines.lmmse_adaptive(arr["inputs"], spec)))
    pdp_db = metrics.nmse_db(metrics.nmse_per_sample(arr["h"], baselines.lmmse_pdp(arr["inputs"], spec)))
    assert pdp_db < adaptive_db, (pdp_db, adaptive_db)


def test_robust_lmmse_refuses_pilots_that_leave_no_noise_bins():
    # 16 pilots every 6 subcarriers of a 256-FFT with a 40% CP: the pilot period (1/6 symbol) is inside the CP
    with pytest.raises(ValueError, match="leave 0 such bins.*dmrs"):
        references.robust_lmmse(np.ones((1, 16), complex), (0, 96, 6), 96, 0.4)
    with pytest.raises(C.ConfigError, match="ch_estimation.reference.*lmmse_robust.*such bins"):
        small_cfg("ch_estimation.residual=add", "ch_estimation.reference=lmmse_robust", "dataset.cp_length=3000")
    # a reference without a residual variant would do nothing: refused, naming the fix
    with pytest.raises(C.ConfigError, match="ch_estimation.reference.*set ch_estimation.residual"):
        small_cfg("ch_estimation.reference=lmmse_robust")


def test_estimated_correlation_is_hermitian_with_unit_diagonal_mean():
    rng = np.random.default_rng(2)
    h = (rng.normal(size=(50, 12)) + 1j * rng.normal(size=(50, 12))) * rng.uniform(1e-6, 1e-3, size=(50, 1))
    R = baselines.estimate_correlation(h)
    assert R.shape == (12, 12)
    np.testing.assert_allclose(R, R.conj().T, atol=1e-6)
    assert np.trace(R).real == pytest.approx(12.0, rel=1e-5)
    assert np.all(np.linalg.eigvalsh(R.astype(np.complex128)) > -1e-5)


# ---------------------------------------------------------------------------------------------
# Test sets


def test_evaluate_scores_every_sample_including_the_last_partial_batch():
    cfg = small_cfg()
    test_set = testsets.make_test_set(cfg, C.TestSetConfig("InF_Los", 50.0, 10), seed=0, full=True)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    assert len(test_set) == 10 and [len(b.inputs) for b in test_set.batches(4)] == [4, 4, 2]

    seen = []

    def predict_fn(inputs):
        seen.append(len(inputs))
        h_est = baselines.ls_linear(inputs, spec)
        return metrics.to_real_pair(h_est), metrics.zf_equalize(inputs, h_est)

    result = evaluate.evaluate(predict_fn, test_set, spec, batch_size=4)
    # the model always sees full batches (the last one zero-padded, so a jitted model compiles once)
    assert seen == [4, 4, 4] and result["num_samples"] == 10
    h, est = test_set.arrays["h"], baselines.ls_linear(test_set.arrays["inputs"], spec)
    np.testing.assert_allclose(result["per_sample_nmse"], metrics.nmse_per_sample(h, est), rtol=1e-6)
    assert result["nmse_db"] == pytest.approx(metrics.nmse_db(metrics.nmse_per_sample(h, est)), abs=1e-6)
    assert result["pooled_nmse_db"] == pytest.approx(metrics.pooled_nmse_db(h, est), abs=1e-6)
    # the model path (its own eq) and the baseline path (ZF with its estimate) agree for the same estimator
    baseline = evaluate.evaluate_baseline("ls_linear", test_set, spec, batch_size=3)
    assert baseline["nmse_db"] == pytest.approx(result["nmse_db"], abs=1e-6)
    assert baseline["evm_db"] == pytest.approx(result["evm_db"], abs=1e-4)
    assert np.isfinite(result["evm_db"]) and result["evm_percent"] > 0
    assert np.all(test_set.arrays["distance"] == 50.0)


def test_test_set_cache_is_reused_and_invalidated_by_its_config(tmp_path):
    cfg = small_cfg()
    ts = C.TestSetConfig("InF_Los", 50.0, 6)
    first = testsets.load_or_make_test_set(cfg, ts, seed=5, cache_dir=tmp_path, full=False)
    assert not first.loaded_from_cache and os.path.isfile(first.cache_path)
    stored = json.loads(open(first.cache_path[: -len(".npz")] + ".json").read())
    assert stored["identity"]["test_set"]["distance"] == 50.0 and stored["identity"]["seed"] == 5
    mtime = os.stat(first.cache_path).st_mtime_ns

    again = testsets.load_or_make_test_set(cfg, ts, seed=5, cache_dir=tmp_path, full=False)
    assert again.loaded_from_cache and again.cache_path == first.cache_path
    assert os.stat(first.cache_path).st_mtime_ns == mtime
    for name in ("inputs", "h", "noise_var", "tap_delays_ns"):
        np.testing.assert_array_equal(again.arrays[name], first.arrays[name])
    # keys that cannot change the set (training batch size, distance range of training) keep the cache
    other_training = small_cfg("dataset.batch_size=7", "dataset.distance_range=[20, 30]")
    assert testsets.load_or_make_test_set(other_training, ts, seed=5, cache_dir=tmp_path, full=False).loaded_from_cache

    changed = [
        (cfg, C.TestSetConfig("InF_Los", 60.0, 6), 5),
        (small_cfg("dataset.noise_spectral_density=-170.0"), ts, 5),
        (cfg, ts, 6),
    ]
    for changed_cfg, changed_ts, seed in changed:
        fresh = testsets.load_or_make_test_set(changed_cfg, changed_ts, seed=seed, cache_dir=tmp_path, full=False)
        assert not fresh.loaded_from_cache and fresh.cache_path != first.cache_path
        assert not np.array_equal(fresh.arrays["inputs"], first.arrays["inputs"])
    noisier = testsets.load_or_make_test_set(changed[1][0], ts, seed=5, cache_dir=tmp_path, full=False)
    assert noisier.arrays["noise_var"][0] > first.arrays["noise_var"][0]
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_original_test_set_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=(3, 14, 24, 2)).astype(np.float32)
    h = (rng.normal(size=(3, 24)) + 1j * rng.normal(size=(3, 24))).astype(np.complex64)
    original = testsets.TestSet("toy", None, None, "toy", {"inputs": inputs, "h": h})
    paths = testsets.save_original_test_set(original, tmp_path / "toy")
    assert all(os.path.isfile(p) for p in paths)
    loaded = testsets.load_original_test_set(tmp_path / "toy")
    np.testing.assert_array_equal(loaded.arrays["inputs"], inputs)
    np.testing.assert_array_equal(loaded.arrays["h"], h)
    assert loaded.arrays["tx"] is None and not loaded.has_taps and not loaded.has_frames

    with pytest.raises(testsets.TestSetError, match="missing .*nothere_input.npy"):
        testsets.load_original_test_set(tmp_path / "nothere")
    bad_cases = {
        "ndim": (inputs[:, 0], h, r"\(B, S, K, 2\)"),
        "complex_input": (inputs[..., 0] + 1j * inputs[..., 1], h, "real float"),
        "real_true": (inputs, np.abs(h), "complex"),
        "count": (inputs, h[:2], r"implies \(B, K\) = \(3, 24\)"),
        "subcarriers": (inputs, h[:, :20], r"implies \(B, K\)"),
    }
    for name, (bad_inputs, bad_h, message) in bad_cases.items():
        np.save(tmp_path / f"{name}_input.npy", bad_inputs)
        np.save(tmp_path / f"{name}_true.npy", bad_h)
        with pytest.raises(ValueError, match=message):
            testsets.load_original_test_set(tmp_path / name)


def test_genie_needs_taps_and_practical_needs_noise_for_imported_sets():
    cfg = small_cfg()
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    inputs = np.zeros((2, 14, spec.num_used, 2), np.float32)
    h = np.ones((2, spec.num_used), np.complex64)
    imported = testsets.TestSet("imported", None, None, "file:x", {"inputs": inputs, "h": h})
    with pytest.raises(ValueError, match="true taps"):
        evaluate.evaluate_baseline("lmmse_genie", imported, spec)
    with pytest.raises(ValueError, match="noise variance"):
        evaluate.evaluate_baseline("lmmse_practical", imported, spec, correlation=np.eye(spec.num_used))
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate.evaluate_baseline("mmse", imported, spec)
    assert evaluate.evaluate_baseline("ls_linear", imported, spec)["evm_db"] is None


def test_plot_channel_estimates_writes_a_png(tmp_path):
    rng = np.random.default_rng(5)
    h = rng.normal(size=(2, 40)) + 1j * rng.normal(size=(2, 40))
    path = plots.plot_channel_estimates(h, metrics.to_real_pair(h + 0.1), tmp_path / "plots" / "eval.png",
                                        title="step 1")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(ValueError, match="must both be"):
        plots.plot_channel_estimates(h, h[:, :10], tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# The LMMSE baselines against a direct K x K solve of their documented formula


def _rel_err(a, b):
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def test_lmmse_practical_equals_the_direct_solve_of_its_formula():
    cfg = small_cfg()
    # 300 m: ~18 dB SNR per RE in this frame, so the noise term sigma^2 / rho shapes the estimate
    spec, batch = generate(cfg, 6, 300.0, full=False)
    _, train = generate(cfg, 32, 100.0, full=False, seed=1, part="train")
    R = baselines.estimate_correlation(train.h)
    got = baselines.lmmse_practical(batch.inputs, batch.noise_var, R, spec)

    pilots = spec.dmrs_index
    y = metrics.to_complex(np.asarray(batch.inputs)[:, 0, pilots])
    sigma2 = np.asarray(batch.noise_var, np.float64)
    # rho: the channel power measured at the pilots, mean |y_P|^2 - sigma^2 (the docstring's floor is far)
    received = np.mean(np.abs(y) ** 2, axis=1)
    rho = received - sigma2
    assert np.all(rho > 1e-3 * received)
    R = np.asarray(R, np.complex128)

    def direct(noise_scale):
        out = []
        for b in range(len(y)):
            A = R[np.ix_(pilots, pilots)] + noise_scale * sigma2[b] / rho[b] * np.eye(len(pilots))
            out.append(R[:, pilots] @ np.linalg.solve(A, y[b]))
        return np.array(out)

    assert _rel_err(got, direct(1.0)) < 1e-6
    # the comparison sees the noise term: doubling it moves the direct solve far beyond that tolerance
    assert _rel_err(got, direct(2.0)) > 1e-3


def test_lmmse_genie_equals_the_direct_solve_of_its_formula():
    cfg = small_cfg()
    spec, batch = generate(cfg, 4, 300.0, full=False)
    got = baselines.lmmse_genie(batch, spec)

    pilots = spec.dmrs_index
    y = metrics.to_complex(np.asarray(batch.inputs)[:, 0, pilots])
    sigma2 = np.asarray(batch.noise_var, np.float64)
    pl = np.asarray(ofdm.path_loss_amplitude(np.asarray(batch.distance, np.float32), spec), np.float64)
    u = baselines.tap_responses(batch.tap_delays_ns, spec)  # (B, L, K) unit-energy tap responses
    p = np.asarray(batch.tap_powers, np.float64)

    def direct(noise_scale):
        out = []
        for b in range(len(y)):
            # R = pl^2 sum_l p_l u_l u_l^H, K x K
            R = pl[b] ** 2 * np.einsum("l,lk,lj->kj", p[b], u[b], np.conj(u[b]))
            A = R[np.ix_(pilots, pilots)] + noise_scale * sigma2[b] * np.eye(len(pilots))
            out.append(R[:, pilots] @ np.linalg.solve(A, y[b]))
        return np.array(out)

    assert np.all(sigma2 > 0)
    assert _rel_err(got, direct(1.0)) < 1e-6
    assert _rel_err(got, direct(2.0)) > 1e-3


# ---------------------------------------------------------------------------------------------
# DFT-LS: exact on the pilot-domain delay grid within the CP


def test_dft_ls_is_exact_for_on_grid_taps_within_the_cp_and_drops_later_ones():
    spec = ofdm.FrameSpec.from_config(small_cfg().dataset)
    start, _, step = spec.dmrs
    N, P, K = spec.fft_size, spec.num_pilots, spec.num_used
    grid = N / (step * P)  # samples per pilot-domain delay bin: 256 / 192
    cp = spec.cp_ns * spec.samples_per_ns  # 590 ns at 30.72 MHz: 18.1 samples
    # bin 13 is the last whose delay lies within the CP, bin 14 the first beyond it
    assert 13 * grid <= cp < 14 * grid
    k = np.arange(K)

    def response(taps):  # H(k) = sum_l a_l exp(-2j pi k tau_l / N), tau_l = n_l * grid samples
        return sum(a * np.exp(-2j * np.pi * k * n * grid / N) for n, a in taps)

    def dft_ls_of(taps_per_sample):
        h = np.array([response(t) for t in taps_per_sample])
        inputs = np.zeros((len(h), 1, K, 2))  # noiseless LS pilots on symbol 0, float64
        inputs[:, 0, spec.dmrs_index, 0] = h[:, spec.dmrs_index].real  # (to_real_pair would round to float32)
        inputs[:, 0, spec.dmrs_index, 1] = h[:, spec.dmrs_index].imag
        return h, baselines.dft_ls(inputs, spec)

    inside = [[(0, 1.0), (2, 0.5 - 0.3j), (5, -0.2j), (13, 0.1 + 0.1j)], [(1, 0.7j), (9, 0.4)]]
    h, est = dft_ls_of(inside)
    np.testing.assert_allclose(est, h, rtol=0, atol=1e-9)
    # a tap beyond the CP (bin 14) or far beyond it (bin 20) is dropped: the estimate is the in-CP taps alone,
    # off the true channel by exactly the dropped tap's magnitude on every subcarrier
    for late in (14, 20):
        h, est = dft_ls_of([[(0, 1.0), (late, 0.5)]])
        np.testing.assert_allclose(est[0], response([(0, 1.0)]), rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.abs(est[0] - h[0]), 0.5, rtol=1e-9)
    assert start == 0  # the pilots start at subcarrier 0, so H(k) above needs no start offset


# ---------------------------------------------------------------------------------------------
# Splits: test sets, validation and training draw from their own profiles


def test_test_sets_validation_and_training_draw_from_their_own_split(monkeypatch, tiny_cfg):
    from chest_jax import train, validation

    requested = []
    real_load_split = channels.load_split

    def recording_load_split(dataset, part):
        requested.append(part)
        return real_load_split(dataset, part)

    monkeypatch.setattr(channels, "load_split", recording_load_split)

    cfg = small_cfg()
    test_set = testsets.make_test_set(cfg, C.TestSetConfig("InF_Los", 50.0, 4), seed=0, full=False)
    assert requested == ["test"]

    requested.clear()
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    validation.Validation(cfg.replace(training=dataclasses.replace(cfg.training, validation_size=2,
                                                                   validation_distances=())),
                          spec, jax.random.key(0), eval_fn=None)
    assert requested == ["val"]

    requested.clear()
    baselines.training_correlation(cfg, "InF_Los", num_samples=2, seed=0)
    assert requested == ["train"]

    # run_training: its data bank from "train", its validation set from "val"; stopped at the first step (the
    # bank is an argument of the step), so nothing is compiled or trained
    class Stop(Exception):
        pass

    def no_step(*_args, **_kwargs):
        def first_step(*_a):
            raise Stop
        return first_step

    monkeypatch.setattr(train, "make_train_step", no_step)
    requested.clear()
    with pytest.raises(Stop):
        train.run_training(tiny_cfg("training.validation_distances=[]"), kind="base", log=lambda *_: None,
                           progress=False)
    assert requested == ["train", "val"]

    # independent of the recording: every test-set sample's tap delays are those of a TEST profile (shifted by
    # its random extra delay), and of no training or validation profile
    full = channels.load_pdp_set("InF_Los", cfg.dataset)
    parts = channels.split_indices(len(full), cfg.dataset.split, cfg.dataset.split_seed)

    def matches(sample_delays, index):
        n = full.num_taps[index]
        relative = sample_delays - sample_delays[0]
        profile = full.delays_ns[index, :n] - full.delays_ns[index, 0]
        return len(relative) >= n and np.allclose(relative[:n], profile, rtol=0, atol=1e-3) and \
            np.all(relative[n:] == -full.delays_ns[index, 0])

    for delays in np.asarray(test_set.arrays["tap_delays_ns"], np.float64):
        assert sum(matches(delays, i) for i in parts["test"]) == 1
        assert not any(matches(delays, i) for i in (*parts["train"], *parts["val"]))
