"""Transfer study: does LoRA on a new environment help, by how much, at what cost, beside its controls?

    python benchmarks/transfer.py [--direction outdoor_to_indoor] [--seeds 0 1 2 3 4] [--arms ARM ...] [--base-steps N]
                                  [--runs runs/transfer] [--out results/transfer] [section.key=value ...]

Per seed: a source-domain base (the CPU preset on the source channel types) and an all-types base (the
original's setting, target included); then every arm, each a run of the CPU presets with one thing changed:

  source_base         the source base, no adaptation (the reference of every gain)
  all_types_base      a base trained on all ten types, target included, no adaptation
  lora_same_range     LoRA on the target over the base's own distance range (environment, not SNR, changes)
  lora_target_range   LoRA on the target over the target's distance range (what the presets do)
  full_finetune       every parameter of the source base fine-tuned on the target data, same steps
  scratch             a fresh model trained on the target data alone, same steps
  lora_r<r>           lora_same_range at rank r (1, 2, 8, 16; the preset's r = 4 is lora_same_range)
  lora_attention      lora_same_range on the attention projections only (mha_*_proj, out_proj)
  lora_ffn            lora_same_range on the feed-forward layers only
  lora_steps<n>       lora_same_range with n steps of target data (how little data does LoRA need?)

Every finished run is reused (an interrupted study resumes where it stopped). compare.run_compare then scores all
arms, seeds grouped, on the target test set (InF_Los or UMa_Nlos at 50 m) with its NMSE-vs-distance curve and on
the source test set (what adapting costs there); the first arm is the base of the gains. The classical estimators
stand beside them, lmmse_pooled with the correlation of the SOURCE types (the unadapted receiver) and
lmmse_practical with the target scenario's (the adapted one). Written into --out: compare's results and plots,
transfer.json (per arm: trainable parameters, target and source NMSE mean +- std, the gain over the source base
paired by seed (each arm starts from its seed's base) +- its standard error, compare's unpaired gain beside it,
wall time), nmse_vs_trainable_<test set>.png (NMSE against trainable parameters, the Pareto view) and
gains_<test set>.png (each arm's paired gain with its standard error as the error bar).
Overrides apply to every run (e.g. `training.num_iter=100` for a short smoke run of the whole pipeline).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts the repository on sys.path)
import _study  # noqa: E402

from chest_jax import compare, plots  # noqa: E402
from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem  # noqa: E402

OUTDOOR = ("UMa_Los", "UMa_Nlos", "UMi_Los", "UMi_Nlos", "RMa_Los", "RMa_Nlos")
INDOOR = ("InF_Los", "InF_Nlos", "InH_Los", "InH_Nlos")
# direction: (source types, source distance range, target types, target distance range, target test set,
# source test set)
DIRECTIONS: dict[str, tuple] = {
    "outdoor_to_indoor": (OUTDOOR, (10.0, 500.0), ("InF_Los", "InF_Nlos"), (10.0, 150.0),
                          ("InF_Los", 50.0), ("RMa_Los", 300.0)),
    # UMa, not RMa, as the outdoor target: its NLoS delays reach far beyond any indoor profile's, so there is
    # something for transfer to learn. An LMMSE with the indoor types' correlation scores 11 dB worse on UMa_Nlos
    # at 50 m than one with UMa_Nlos's own, against 1-2 dB on RMa and nothing the other way (outdoor -> InF)
    # (README, "Does transfer help?").
    "indoor_to_outdoor": (INDOOR, (10.0, 500.0), ("UMa_Los", "UMa_Nlos"), (10.0, 500.0),
                          ("UMa_Nlos", 50.0), ("InF_Los", 50.0)),
}
# The bar for a transfer that helps: at least this gain on the target, beyond 2 standard errors.
TARGET_GAIN_DB = 2.0
ARMS = ("source_base", "all_types_base", "lora_same_range", "lora_target_range", "full_finetune", "scratch",
        "lora_r1", "lora_r2", "lora_r8", "lora_r16", "lora_attention", "lora_ffn", "lora_steps38",
        "lora_steps75", "lora_steps150")  # the steps arms: 1/8, 1/4 and 1/2 of the LoRA preset's 300


def _types(types: Sequence[str]) -> str:
    return "dataset.channel_type=[" + ", ".join(types) + "]"


def _range(r: Sequence[float]) -> str:
    return f"dataset.distance_range=[{r[0]}, {r[1]}]"


def arm_plan(arm: str, direction: str, seed: int, base_dirs: dict[str, Path]) -> tuple[str, str, list[str]]:
    """(kind, preset config, overrides) of one arm's run for `seed`, given the two bases' run directories."""
    src_types, src_range, tgt_types, tgt_range, _, _ = DIRECTIONS[direction]
    lora = ["configs/quick/lora_inf.yaml", [_types(tgt_types), _range(src_range),
                                            f"training.pretrained_model_name={base_dirs['source']}"]]
    if arm == "lora_same_range":
        return "lora", *lora
    if arm == "lora_target_range":
        return "lora", lora[0], [*lora[1], _range(tgt_range)]
    if arm.startswith("lora_r"):
        r = int(arm[len("lora_r"):])
        return "lora", lora[0], [*lora[1], f"ch_estimation.peft.r={r}", f"ch_estimation.peft.lora_alpha={2 * r}"]
    if arm in ("lora_attention", "lora_ffn"):
        modules = C.LORA_TARGET_GROUPS[arm[len("lora_"):]]
        return "lora", lora[0], [*lora[1], "ch_estimation.peft.target_modules=[" + ", ".join(modules) + "]"]
    if arm.startswith("lora_steps"):
        n = int(arm[len("lora_steps"):])
        return "lora", lora[0], [*lora[1], f"training.num_iter={n}", f"training.num_warmup_steps={max(1, n // 12)}",
                                 f"training.evaluation_step={n}"]
    # the controls use the LoRA preset's data and steps (read from it, so the two cannot drift apart), all
    # parameters trained
    t = C.load(_common.REPO / lora[0]).training
    lora_training = [f"training.num_iter={t.num_iter}", f"training.num_warmup_steps={t.num_warmup_steps}",
                     f"training.evaluation_step={t.evaluation_step}", f"training.lr={t.lr}"]
    if arm == "full_finetune":
        return "base", "configs/quick/base.yaml", [_types(tgt_types), _range(src_range), *lora_training,
                                                    f"training.pretrained_model_name={base_dirs['source']}"]
    if arm == "scratch":
        return "base", "configs/quick/base.yaml", [_types(tgt_types), _range(src_range), *lora_training]
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


def _config(preset: str, overrides: Sequence[str], name: str, seed: int, runs_dir: Path,
            extra: Sequence[str]) -> C.Config:
    return C.load(_common.REPO / preset, [*overrides, *[o for o in extra if not o.startswith("compare.")],
                                          f"dataset.rnd_seed={seed}", f"training.output_dir={runs_dir}",
                                          f"training.saved_model_name={name}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--direction", default="outdoor_to_indoor", choices=sorted(DIRECTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--base-steps", type=int, default=None,
                        help="training steps of the two bases only (default: the base preset's); the arms keep "
                             "the LoRA preset's (a training.num_iter override would reach every run)")
    parser.add_argument("--runs", default="runs/transfer")
    parser.add_argument("--out", default="results/transfer")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = _study.parse_with_overrides(parser, argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    src_types, src_range, tgt_types, _, tgt_set, src_set = DIRECTIONS[args.direction]
    runs_dir = Path(args.runs) / args.direction
    base_steps = [] if args.base_steps is None else [f"training.num_iter={args.base_steps}"]
    start = time.perf_counter()
    arms = ["source_base", *[a for a in args.arms if a != "source_base"]]  # the reference of the gains first
    runs: dict[str, list[tuple[int, Path, float | None]]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        source_dir, source_wall = _study.train_or_reuse(_config(
            "configs/quick/base.yaml", [_types(src_types), _range(src_range)], f"source_base_s{seed}", seed,
            runs_dir, [*args.overrides, *base_steps]), "base", log)
        base_dirs = {"source": source_dir}
        runs["source_base"].append((seed, source_dir, source_wall))
        if "all_types_base" in arms:
            all_dir, wall = _study.train_or_reuse(_config("configs/quick/base.yaml", [], f"all_types_base_s{seed}",
                                                          seed, runs_dir, [*args.overrides, *base_steps]), "base", log)
            runs["all_types_base"].append((seed, all_dir, wall))
        for arm in arms:
            if arm in ("source_base", "all_types_base"):
                continue
            kind, preset, overrides = arm_plan(arm, args.direction, seed, base_dirs)
            run_dir, wall = _study.train_or_reuse(_config(preset, overrides, f"{arm}_s{seed}", seed, runs_dir,
                                                          args.overrides), kind, log)
            runs[arm].append((seed, run_dir, wall))

    # The compare config's training mix is the SOURCE domain, so its lmmse_pooled is the classical analogue of the
    # unadapted base (a correlation learned on the source types only) and lmmse_practical, with the target
    # scenario's own correlation, that of an adapted one: their difference is how much the environment is worth
    # to an LMMSE.
    cfg = C.load(_common.REPO / "configs/quick/compare.yaml", [
        *[o for o in args.overrides if not o.startswith("training.")], _types(src_types),
        f"compare.test_sets=[{{channel_type: {tgt_set[0]}, distance: {tgt_set[1]}, num_samples: 100}}, "
        f"{{channel_type: {src_set[0]}, distance: {src_set[1]}, num_samples: 100}}]"])
    entries = [compare.load_entry(arm, str(run_dir), seed=seed)
               for arm, seeded in runs.items() for seed, run_dir, _ in seeded]
    results = compare.run_compare(cfg, entries, args.out, log=log)
    report = summarise(results, runs, tgt_set, src_set)
    report.update(direction=args.direction, seeds=args.seeds, overrides=args.overrides,
                  study_wall_s=time.perf_counter() - start)
    out = Path(args.out)
    for name in report["test_sets"]:
        points = [{"label": arm, "trainable_params": a["trainable_params"], **a["test_sets"][name]}
                  for arm, a in report["arms"].items() if name in a["test_sets"]]
        report.setdefault("plots", []).append(plots.plot_nmse_vs_trainable(
            points, out / f"nmse_vs_trainable_{name}.png",
            f"{name}: NMSE against trainable parameters (mean ± std over seeds {args.seeds})"))
        gains = [{"label": p["label"], "gain_db": p.get("paired_gain_db"), "gain_se_db": p.get("paired_gain_se_db"),
                  "trainable_params": p["trainable_params"]} for p in points if p["label"] != "source_base"]
        report["plots"].append(plots.plot_gains(
            gains, out / f"gains_{name}.png",
            f"{name} ({report['test_sets'][name]}): gain over the unadapted source base, paired by seed "
            f"(seeds {args.seeds})", threshold_db=TARGET_GAIN_DB if report["test_sets"][name] == "target" else None))
    (out / "transfer.json").write_text(json.dumps(compare.json_ready(report), indent=1, allow_nan=False))
    log(markdown_table(report))
    log(f"wrote {out / 'transfer.json'}")
    return 0


def summarise(results: dict[str, Any], runs: dict[str, list], tgt_set, src_set) -> dict[str, Any]:
    names = {f"{ct}_{d:g}m": role for role, (ct, d) in (("target", tgt_set), ("source", src_set))}
    report: dict[str, Any] = {"test_sets": names, "arms": {}}
    for arm, seeded in runs.items():
        summaries = [_study.summary_of(run_dir) for _, run_dir, _ in seeded]
        report["arms"][arm] = {
            "runs": [str(run_dir) for _, run_dir, _ in seeded],
            # source_base / all_types_base are not adapted: no parameter is trained for the target
            "trainable_params": (0 if arm in ("source_base", "all_types_base")
                                 else summaries[0]["trainable_params"] if summaries else None),
            "total_params": summaries[0]["total_params"] if summaries else None,
            "wall_s": _study.mean_std([w for _, _, w in seeded]),
            "test_sets": {}}
    for row in results["rows"]:
        if row["kind"] == "model" and row["model"] in report["arms"]:
            report["arms"][row["model"]]["test_sets"][row["test_set"]] = {
                "nmse_db": row["nmse_db"], "nmse_db_std": row["nmse_db_std"], "n_seeds": row["n_seeds"],
                "gain_db": row["gain_db"], "gain_se_db": row["gain_se_db"]}
    # Paired gain: arm and source base share the seed (the arm starts from that seed's base), so the per-seed
    # difference removes the base's own seed spread; its standard error is the one to judge a gain by.
    for name, ts in results["test_sets"].items():
        ref = {r["seed"]: r["nmse_db"] for r in ts["estimators"]["source_base"]["runs"]}
        for arm, a in report["arms"].items():
            if arm not in ts["estimators"] or name not in a["test_sets"]:
                continue
            diffs = [ref[r["seed"]] - r["nmse_db"] for r in ts["estimators"][arm]["runs"] if r["seed"] in ref]
            paired = _study.mean_std(diffs)
            a["test_sets"][name].update(paired_gain_db=paired["mean"], paired_gain_se_db=paired["se"])
    report["baselines"] = {row["model"]: {**report.get("baselines", {}).get(row["model"], {}),
                                          row["test_set"]: row["nmse_db"]}
                           for row in results["rows"] if row["kind"] == "baseline"}
    return report


def markdown_table(report: dict[str, Any]) -> str:
    names = list(report["test_sets"])
    header = "| arm | trainable | " + " | ".join(f"{n} ({report['test_sets'][n]}) NMSE dB | paired gain dB"
                                                for n in names)
    lines = [header + " |", "|" + " --- |" * (2 + 2 * len(names))]
    for arm, a in report["arms"].items():
        cells = []
        for n in names:
            t = a["test_sets"].get(n, {})
            nmse = "" if t.get("nmse_db") is None else f"{t['nmse_db']:.2f}" + (
                f" ± {t['nmse_db_std']:.2f}" if t.get("nmse_db_std") is not None else "")
            gain = "" if t.get("paired_gain_db") is None else f"{t['paired_gain_db']:+.2f}" + (
                f" ± {t['paired_gain_se_db']:.2f}" if t.get("paired_gain_se_db") is not None else "")
            cells += [nmse, gain]
        lines.append(f"| {arm} | {a['trainable_params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
