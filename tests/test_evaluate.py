"""Metrics, classical estimators, test sets and their cache (chest_jax/evaluate.py), plots of estimates."""
import dataclasses
import json
import os

import jax
import matplotlib.image
import numpy as np
import pytest

from chest_jax import channels, config as C, baselines, evaluate, metrics, testsets, ofdm, plots

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
