"""run_compare end to end with fake prediction functions (chest_jax/compare.py and its plots)."""
import csv
import json
import os

import matplotlib.image
import numpy as np
import pytest

from chest_jax import baselines, channels, compare, config as C, metrics, ofdm

SMALL = [
    "dataset.fft_size=256", "dataset.num_guard_subcarriers=64", "dataset.ref_conf_dict.dmrs=[0, 192, 6]",
    "dataset.num_profiles=30", "dataset.channel_type=[InF_Los]",
    "ch_estimation.cond.length=192", "ch_estimation.transformer.length=192", "ch_estimation.transformer.n_token=16",
    "compare.test_sets=[{channel_type: InF_Los, distance: 50.0, num_samples: 6},"
    " {channel_type: InF_Los, distance: 200.0, num_samples: 5}]",
    "compare.distances=[20.0, 300.0]", "compare.curve_samples=4", "compare.lmmse_train_samples=32",
]


def ls_predict_fn(spec, noise_scale=0.0, seed=0):
    """LS as a model; with noise_scale > 0 a deliberately worse "model" (LS plus relative noise)."""
    rng = np.random.default_rng(seed)

    def predict(inputs):
        h_est = baselines.ls_linear(inputs, spec)
        power = np.mean(np.abs(h_est) ** 2, axis=1, keepdims=True)
        h_est = h_est + noise_scale * np.sqrt(power / 2) * (rng.normal(size=h_est.shape)
                                                            + 1j * rng.normal(size=h_est.shape))
        return metrics.to_real_pair(h_est), metrics.zf_equalize(inputs, h_est)

    return predict


def test_run_compare_writes_every_output(tmp_path):
    cfg = C.load(None, [*SMALL, f"compare.cache_dir={tmp_path / 'cache'}"])
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    models = [
        compare.ModelEntry("ls_model", ls_predict_fn(spec), path="fake/ls"),
        compare.ModelEntry("noisy", ls_predict_fn(spec, 0.3, seed=0), seed=0),
        compare.ModelEntry("noisy", ls_predict_fn(spec, 0.3, seed=1), seed=1),
    ]
    lines = []
    results = compare.run_compare(cfg, models, tmp_path / "out", log=lines.append)

    out = tmp_path / "out"
    expected_files = ["results.csv", "results.json", "nmse_InF_Los_50m.png", "nmse_InF_Los_200m.png",
                      "nmse_vs_distance_InF_Los.png", "nmse_vs_snr_InF_Los.png"]
    for name in expected_files:
        assert (out / name).is_file(), name
    for name in expected_files[2:]:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200
    assert sorted(results["files"]["plots"]) == sorted(str(out / n) for n in expected_files[2:])

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(compare.CSV_COLUMNS) <= set(rows[0])
    by_key = {(r["model"], r["test_set"]): r for r in rows}
    labels = ["ls_model", "noisy", *C.BASELINES]  # every baseline by default
    assert set(by_key) == {(m, t) for m in labels for t in ("InF_Los_50m", "InF_Los_200m")}

    for test_set in ("InF_Los_50m", "InF_Los_200m"):
        model, noisy = by_key[("ls_model", test_set)], by_key[("noisy", test_set)]
        # LS wrapped as a model scores exactly like the LS baseline
        assert float(model["nmse_db"]) == pytest.approx(float(by_key[("ls_linear", test_set)]["nmse_db"]), abs=1e-3)
        assert float(model["gain_db"]) == 0.0 and model["n_seeds"] == "1"
        # two seeds of one label: mean, spread and count; noise makes it worse than its base
        assert noisy["n_seeds"] == "2" and float(noisy["nmse_db_std"]) > 0
        assert float(noisy["gain_db"]) < 0
        assert float(by_key[("lmmse_genie", test_set)]["gain_db"]) > 0
        assert float(model["evm_percent"]) > 0 and model["source"] == "tr38901-v16"

    data = json.loads((out / "results.json").read_text())
    noisy_runs = data["test_sets"]["InF_Los_50m"]["estimators"]["noisy"]["runs"]
    assert [r["seed"] for r in noisy_runs] == [0, 1] and len(noisy_runs[0]["per_sample_nmse_db"]) == 6
    curve = data["curves"]["InF_Los"]
    assert curve["distances_m"] == [20.0, 300.0]
    # the pilot SNR of each curve point, from its own channels and noise: falls with distance, by the link budget
    assert curve["pilot_snr_db"][0] > curve["pilot_snr_db"][1] + 10
    assert set(curve["series"]) == set(labels)
    ls_curve = curve["series"]["ls_linear"]["nmse_db"]
    assert ls_curve[0] < ls_curve[1]  # LS degrades with distance (lower SNR)
    assert data["base"] == "ls_model"

    table = "\n".join(lines)
    assert "ls_model" in table and "gain dB" in table
    header = next(line for line in lines if line.startswith("model"))
    assert header.index("NMSE dB") > header.index("test set")

    # a second run reuses every cached test set
    lines.clear()
    compare.run_compare(cfg, models[:1], tmp_path / "out2", log=lines.append)
    assert sum("(cached:" in line for line in lines) == 2 and not any("(generated:" in line for line in lines)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # 2 test sets + 2 curve points
    assert os.path.isfile(tmp_path / "out2" / "results.csv")


def test_gain_standard_error_combines_seed_spreads():
    rows = {
        "base": {"kind": "model", "nmse_db": -20.0, "nmse_db_std": 0.3, "n_seeds": 3},
        "lora": {"kind": "model", "nmse_db": -21.0, "nmse_db_std": 0.4, "n_seeds": 4},
        "single": {"kind": "model", "nmse_db": -19.0, "nmse_db_std": None, "n_seeds": 1},
        "ls_linear": {"kind": "baseline", "nmse_db": -15.0, "nmse_db_std": None, "n_seeds": 1},
    }
    compare._add_gains(rows, "base")
    assert rows["lora"]["gain_db"] == pytest.approx(1.0)
    assert rows["lora"]["gain_se_db"] == pytest.approx(np.sqrt(0.3**2 / 3 + 0.4**2 / 4))
    assert rows["single"]["gain_se_db"] is None  # one seed: its spread is unknown
    assert rows["ls_linear"]["gain_db"] == pytest.approx(-5.0)
    assert rows["ls_linear"]["gain_se_db"] == pytest.approx(0.3 / np.sqrt(3))
    assert rows["base"]["gain_db"] == 0.0 and rows["base"]["gain_se_db"] is None


def test_duplicate_seeds_and_baseline_labels_are_rejected(tmp_path):
    cfg = C.load(None, [*SMALL, f"compare.cache_dir={tmp_path / 'cache'}"])
    fn = ls_predict_fn(ofdm.FrameSpec.from_config(cfg.dataset))
    with pytest.raises(ValueError, match="same seed twice"):
        compare.run_compare(cfg, [compare.ModelEntry("m", fn, seed=1), compare.ModelEntry("m", fn, seed=1)], tmp_path)
    with pytest.raises(ValueError, match="name of a baseline"):
        compare.run_compare(cfg, [compare.ModelEntry("ls_linear", fn)], tmp_path)


def test_parse_model_spec_labels():
    assert compare.parse_model_spec("runs/base_s1") == ("base_s1", "runs/base_s1")
    assert compare.parse_model_spec("base=runs/base_s1/") == ("base", "runs/base_s1/")
    assert compare.parse_model_spec("runs/base+runs/lora_inf") == ("lora_inf", "runs/base+runs/lora_inf")
    with pytest.raises(ValueError, match="label=SPEC"):
        compare.parse_model_spec("base=")


def test_cli_scores_a_saved_model(tmp_path):
    import jax

    from chest_jax import checkpoint, loading, lora

    model_overrides = ["ch_estimation.transformer.d_model=16", "ch_estimation.transformer.n_head=2",
                       "ch_estimation.transformer.dim_feedforward=32", "ch_estimation.transformer.num_layers=1"]
    overrides = [*SMALL, *model_overrides, f"compare.cache_dir={tmp_path / 'cache'}", "compare.baselines=[ls_linear]",
                 "compare.test_sets=[{channel_type: InF_Los, distance: 50.0, num_samples: 3}]",
                 "compare.distances=[50.0]", "compare.curve_samples=2"]
    cfg = C.load(None, overrides)
    params = loading.model_params(loading.new_model(cfg, jax.random.key(0)))
    checkpoint.save_model(tmp_path / "run" / "final", params, cfg, kind="base", step=0,
                          fingerprint=lora.params_fingerprint(params))
    assert compare.cli(["--models", f"untrained={tmp_path / 'run'}", "--out", str(tmp_path / "out"), *overrides]) == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"untrained", "ls_linear"}
    assert np.isfinite(float(rows["untrained"]["nmse_db"])) and rows["untrained"]["evm_db"] != ""


def _saved_model(tmp_path, overrides, name="run"):
    import jax

    from chest_jax import checkpoint, loading, lora

    cfg = C.load(None, overrides)
    params = loading.model_params(loading.new_model(cfg, jax.random.key(0)))
    checkpoint.save_model(tmp_path / name / "final", params, cfg, kind="base", step=0,
                          fingerprint=lora.params_fingerprint(params))
    return tmp_path / name


TINY_MODEL = ["ch_estimation.transformer.d_model=16", "ch_estimation.transformer.n_head=2",
              "ch_estimation.transformer.dim_feedforward=32", "ch_estimation.transformer.num_layers=1"]
ONE_SET = ["compare.baselines=[ls_linear]", "compare.test_sets=[{channel_type: InF_Los, distance: 50.0, num_samples: 3}]",
           "compare.distances=[50.0]", "compare.curve_samples=2"]


def test_cli_refuses_a_model_of_another_split_unless_asked(tmp_path, capsys):
    """A model trained with another split_seed has training profiles among these test profiles: refuse, name
    the key; with --allow-population-mismatch score it and mark it in the table and the CSV."""
    common = [*SMALL, *TINY_MODEL, f"compare.cache_dir={tmp_path / 'cache'}", *ONE_SET]
    run = _saved_model(tmp_path, [*common, "dataset.split_seed=7"])
    assert compare.cli(["--models", str(run), "--out", str(tmp_path / "out"), *common]) == 2
    err = capsys.readouterr().err
    assert "dataset.split_seed: trained 7, compare 0" in err and "--allow-population-mismatch" in err
    assert not (tmp_path / "out" / "results.csv").exists()
    # distance range, channel types and data seed do not change the population: no complaint
    same = _saved_model(tmp_path, [*common, "dataset.rnd_seed=3", "dataset.distance_range=[10, 60]"], "same")
    assert compare.cli(["--models", str(same), "--out", str(tmp_path / "ok"), *common]) == 0

    assert compare.cli(["--models", str(run), "--out", str(tmp_path / "out"), "--allow-population-mismatch",
                        *common]) == 0
    out = capsys.readouterr().out
    assert "run *" in out and "trained on another data population" in out
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert "dataset.split_seed: trained 7, compare 0" in rows["run"]["population_mismatch"]
    assert rows["ls_linear"]["population_mismatch"] == ""


def test_a_float32_model_is_scored_in_bfloat16_on_request(tmp_path):
    """compare.precision: bfloat16 restores a float32-trained checkpoint (strictly: the parameters are float32
    either way) into a model whose matmuls take bfloat16 operands; its estimate moves by bfloat16 rounding only."""
    import jax

    from chest_jax import loading
    common = [*SMALL, *TINY_MODEL, f"compare.cache_dir={tmp_path / 'cache'}", *ONE_SET]
    run = _saved_model(tmp_path, common)
    m32, cfg32, _ = loading.load_model(str(run))
    m16, cfg16, _ = loading.load_model(str(run), precision="bfloat16")
    assert (cfg32.training.precision, cfg16.training.precision) == ("float32", "bfloat16")
    assert m16.ch_tf._layers[0].ffnn_linear1.dtype == jax.numpy.bfloat16
    d = cfg32.dataset
    inputs = ofdm.make_batch_fn(ofdm.FrameSpec.from_config(d), 4, full=True)(
        jax.random.key(1), ofdm.make_bank(channels.load_split(d, "train")), jax.numpy.asarray(d.distance_range)).inputs
    h32, h16 = (np.asarray(loading.make_predict_fn(m)(inputs)[0]) for m in (m32, m16))
    relative = np.linalg.norm(h16 - h32) / np.linalg.norm(h32)
    assert 0 < relative < 0.05, relative
    with pytest.raises(C.ConfigError, match="precision"):
        loading.with_precision(cfg32, "float16")

    for precision in ("float32", "bfloat16"):
        assert compare.cli(["--models", str(run), "--out", str(tmp_path / precision), *common,
                            f"compare.precision={precision}"]) == 0
    scores = {}
    for precision in ("float32", "bfloat16"):
        data = json.loads((tmp_path / precision / "results.json").read_text())
        assert data["config"]["compare"]["precision"] == precision
        with open(tmp_path / precision / "results.csv") as f:
            scores[precision] = {r["model"]: float(r["nmse_db"]) for r in csv.DictReader(f)}
    assert scores["float32"]["ls_linear"] == scores["bfloat16"]["ls_linear"]  # baselines do not change
    assert abs(scores["float32"]["run"] - scores["bfloat16"]["run"]) < 0.2


def test_cli_overrides_after_models_are_not_taken_for_models(tmp_path):
    assert compare._split_overrides(["a", "lbl=runs/b", "compare.seed=3"], ["training.lr=1"]) == (
        ["a", "lbl=runs/b"], ["compare.seed=3", "training.lr=1"])
    common = [*SMALL, *TINY_MODEL, f"compare.cache_dir={tmp_path / 'cache'}", *ONE_SET]
    run = _saved_model(tmp_path, common)
    assert compare.cli(["--out", str(tmp_path / "out"), "--models", str(run), *common]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["config"]["compare"]["curve_samples"] == 2 and list(data["test_sets"]) == ["InF_Los_50m"]


def test_cli_scores_original_format_test_files(tmp_path):
    """`--test-set PREFIX`: the original's <prefix>_input.npy / _true.npy scored end to end, with the baselines
    that need no knowledge of the test scenario; LS on the file equals LS on the set it was written from."""
    from chest_jax import testsets

    common = [*SMALL, *TINY_MODEL, f"compare.cache_dir={tmp_path / 'cache'}", "compare.lmmse_train_samples=16"]
    cfg = C.load(None, common)
    generated = testsets.load_or_make_test_set(cfg, C.TestSetConfig("InF_Los", 50.0, 4), seed=5,
                                               cache_dir=str(tmp_path / "cache"), full=True)
    testsets.save_original_test_set(generated, tmp_path / "files" / "inf50")
    run = _saved_model(tmp_path, common)
    assert compare.cli(["--models", f"m={run}", "--test-set", str(tmp_path / "files" / "inf50"),
                        "--out", str(tmp_path / "out"), *common]) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(data["test_sets"]) == ["inf50"] and data["curves"] == {}
    estimators = data["test_sets"]["inf50"]["estimators"]
    # the baselines that need no scenario correlation and no taps
    assert set(estimators) == {"m", "ls_linear", "lmmse_robust", "lmmse_adaptive", "lmmse_pdp", "dft_ls", "lmmse_pooled"}
    assert data["test_sets"]["inf50"]["source"].startswith("file:")
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    direct = metrics.nmse_db(metrics.nmse_per_sample(generated.arrays["h"],
                                                     baselines.ls_linear(generated.arrays["inputs"], spec)))
    assert estimators["ls_linear"]["nmse_db"] == pytest.approx(direct, abs=1e-4)
    assert (tmp_path / "out" / "nmse_inf50.png").is_file()
    assert compare.cli(["--models", str(run), "--test-set", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "out2"), *common]) == 2
