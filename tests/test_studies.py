"""The study scripts end to end on a tiny model: benchmarks/scaling.py drives benchmarks/quality.py (train per
budget and seed, reuse finished runs, score beside the baselines, write JSON and plots)."""
import json
import math
import sys

import pytest

from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "benchmarks"))

import _study  # noqa: E402
import quality  # noqa: E402
import scaling  # noqa: E402

COMPARE = ["compare.test_sets=[{channel_type: InF_Los, distance: 50.0, num_samples: 4},"
           " {channel_type: RMa_Los, distance: 300.0, num_samples: 4}]",
           "compare.distances=[50.0]", "compare.curve_samples=2", "compare.lmmse_train_samples=16",
           "compare.baselines=[ls_linear, lmmse_pooled, lmmse_practical]"]


def test_scaling_curve_trains_each_budget_once_and_scores_it_beside_the_baselines(tmp_path, capsys):
    overrides = [*TINY, "training.num_iter=2", "training.evaluation_step=2", "training.model_save_step=2",
                 "training.validation_distances=[50.0]", "training.validation_distance_samples=4",
                 f"compare.cache_dir={tmp_path / 'cache'}", *COMPARE]
    argv = [*overrides, "--variant", "pilots_gated_db", "--multiples", "1", "2", "--seeds", "0", "--seeds-for", "2=1",
            "--runs", str(tmp_path / "runs" / "quality"), "--out", str(tmp_path / "out")]
    assert scaling.main(argv) == 0
    result = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert result["multiples"] == [1, 2] and result["training_samples"] == [2 * 8, 4 * 8]
    assert result["seeds"] == [[0], [1]]  # --seeds-for gave the 2x budget its own seed
    assert len(result["validation_score_db"]) == 2 and all(math.isfinite(v) for v in result["validation_score_db"])
    assert set(result["test_sets"]) == {"InF_Los_50m", "RMa_Los_300m"}
    for ts in result["test_sets"].values():
        assert len(ts["nmse_db"]) == 2 and all(math.isfinite(v) for v in ts["nmse_db"])
        assert set(ts["baselines"]) == {"ls_linear", "lmmse_pooled", "lmmse_practical"}
    summary = json.loads((tmp_path / "runs" / "quality_x2" / "pilots_gated_db_s1" / "summary.json").read_text())
    assert summary["steps"] == 4  # the 2x run trained twice the base's steps
    assert all((tmp_path / "out" / f"scaling_{ts}.png").stat().st_size > 0 for ts in result["test_sets"])
    # A second call reuses both finished runs instead of training them again.
    capsys.readouterr()
    assert scaling.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reusing the finished run") == 2 and "training base" not in out
    # Where a run lives is not part of its recipe: a moved run directory is reused; another recipe is refused.
    moved = tmp_path / "runs" / "moved"
    (tmp_path / "runs" / "quality").rename(moved)
    recipe = [*overrides, "training.num_iter=2"]
    assert quality._train("pilots_gated_db", 0, str(REPO / "configs/quick/base.yaml"), recipe, moved, print)[0] == \
        moved / "pilots_gated_db_s0"
    assert "reusing the finished run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another config"):
        quality._train("pilots_gated_db", 0, str(REPO / "configs/quick/base.yaml"), [*recipe, "training.lr=0.5"], moved, print)
    # A run killed before its first checkpoint (only its config.yaml written) is started again, not refused.
    killed = tmp_path / "runs" / "killed" / "pilots_gated_db_s0"
    killed.mkdir(parents=True)
    started = (moved / "pilots_gated_db_s0" / "config.yaml").read_text()
    (killed / "config.yaml").write_text(started.replace(str(tmp_path / "runs" / "quality"), str(killed.parent)))
    capsys.readouterr()
    assert quality._train("pilots_gated_db", 0, str(REPO / "configs/quick/base.yaml"), recipe, killed.parent,
                          print)[0] == killed
    assert "starting from step 0" in capsys.readouterr().out and (killed / "final").is_dir()


def test_overrides_after_a_list_option_are_not_taken_for_its_values():
    """`--seeds 0 1 compare.curve_samples=50` once failed with "invalid int value" (argparse's nargs='+')."""
    args = _study.parse_with_overrides(
        quality.build_parser(), ["--seeds", "0", "1", "compare.curve_samples=50", "--seeds-for", "nmse_db=0",
                                 "dataset.channel_type=[InF_Los, RMa_Los]"])
    assert args.seeds == [0, 1] and args.seeds_for == ["nmse_db=0"]
    assert args.overrides == ["compare.curve_samples=50", "dataset.channel_type=[InF_Los, RMa_Los]"]


def test_transfer_controls_train_like_the_lora_preset_and_subsets_name_their_modules(tmp_path):
    import transfer
    from chest_jax import config as C

    bases = {"source": tmp_path / "src", "all_types": tmp_path / "all"}
    preset = C.load(REPO / "configs/quick/lora_inf.yaml").training
    for arm in ("full_finetune", "scratch"):
        kind, path, overrides = transfer.arm_plan(arm, "outdoor_to_indoor", 0, bases)
        cfg = C.load(REPO / path, overrides)
        assert kind == "base" and cfg.ch_estimation.peft is None
        assert (cfg.training.num_iter, cfg.training.lr) == (preset.num_iter, preset.lr)
        assert cfg.dataset.channel_type == ("InF_Los", "InF_Nlos")
        assert (cfg.training.pretrained_model_name == str(bases["source"])) == (arm == "full_finetune")
    for group in ("attention", "ffn"):
        _, path, overrides = transfer.arm_plan(f"lora_{group}", "outdoor_to_indoor", 0, bases)
        assert C.load(REPO / path, overrides).ch_estimation.peft.target_modules == C.LORA_TARGET_GROUPS[group]
    _, path, overrides = transfer.arm_plan("lora_same_range", "outdoor_to_indoor", 0, bases)
    assert C.load(REPO / path, overrides).dataset.distance_range == (10.0, 500.0)  # the source base's range


def test_transfer_study_scores_each_arm_against_its_own_seeds_base(tmp_path):
    """benchmarks/transfer.py end to end on a tiny model: two seeds, the unadapted base, LoRA and full fine-tuning;
    the paired gain is the mean over seeds of (base - arm) on the same seed, from compare's per-seed rows."""
    import transfer

    # The arms choose their own channel types and distance ranges; TINY's would override them.
    tiny = [o for o in TINY if not o.startswith(("dataset.channel_type=", "dataset.distance_range="))]
    overrides = [*tiny, "training.num_iter=2", "training.evaluation_step=2", "training.model_save_step=2",
                 "training.validation_distances=[50.0]", "training.validation_distance_samples=4",
                 f"compare.cache_dir={tmp_path / 'cache'}", "compare.distances=[50.0]", "compare.curve_samples=2",
                 "compare.lmmse_train_samples=16", "compare.baselines=[ls_linear]"]
    arms = ["source_base", "lora_same_range", "full_finetune"]
    argv = [*overrides, "--seeds", "0", "1", "--arms", *arms, "--base-steps", "3", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    assert transfer.main(argv) == 0
    runs = tmp_path / "runs" / "outdoor_to_indoor"
    # --base-steps reaches the bases only; the overrides reach every run
    assert [_study.summary_of(runs / f"{a}_s0")["steps"] for a in arms] == [3, 2, 2]
    report = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert list(report["arms"]) == arms
    assert report["test_sets"] == {"InF_Los_50m": "target", "RMa_Los_300m": "source"}
    base, lora, full = (report["arms"][a] for a in arms)
    assert base["trainable_params"] == 0 and full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < lora["total_params"]
    assert all(report["arms"][a]["wall_s"]["n"] == 2 for a in arms)  # every run's training time, the bases' too
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in report["test_sets"]:
        per_seed = {a: {r["seed"]: r["nmse_db"] for r in results["test_sets"][name]["estimators"][a]["runs"]}
                    for a in arms}
        assert sorted(per_seed["source_base"]) == [0, 1]
        assert base["test_sets"][name]["paired_gain_db"] == 0.0
        for arm in arms[1:]:
            expected = sum(per_seed["source_base"][s] - per_seed[arm][s] for s in (0, 1)) / 2
            got = report["arms"][arm]["test_sets"][name]
            assert got["paired_gain_db"] == pytest.approx(expected, abs=1e-9)
            assert got["paired_gain_se_db"] is not None and math.isfinite(got["paired_gain_se_db"])
    assert all((tmp_path / "out" / f"nmse_vs_trainable_{n}.png").stat().st_size > 0 for n in report["test_sets"])
    assert all((tmp_path / "out" / f"gains_{n}.png").stat().st_size > 0 for n in report["test_sets"])
