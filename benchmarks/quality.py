"""Quality study: named training recipes x seeds at one budget, scored beside every classical estimator.

    python benchmarks/quality.py [--variants original nmse_db residual_db] [--seeds 0 1 2]
                                 [--base configs/quick/base.yaml] [--out results/quality] [section.key=value ...]

Each (variant, seed) trains a base with `run_training` (runs/quality/<variant>_s<seed>; a finished run is
reused, so an interrupted study picks up where it stopped), then `compare.run_compare` scores all of them,
seeds grouped per variant, on the InF_Los 50 m and RMa_Los 300 m test sets and the NMSE-vs-distance and
NMSE-vs-SNR curves of both, beside LS + linear, DFT-based LS and the three LMMSEs. Overrides (e.g.
`training.num_iter=600`) apply to every variant, so the budget is one knob.

Written into --out: compare's results.json / results.csv / PNGs and quality.json: per variant the test curves
(mean and std over seeds at each distance), the validation record of each seed (val_nmse_db_<d>m: fixed
distances of VALIDATION profiles, the numbers a recipe is chosen by) and the wall time of each run. The
summary names the variant with the best mean validation NMSE over the fixed distances; the test numbers
are reported, never used to choose.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (puts the repository on sys.path)
import _study  # noqa: E402
import numpy as np  # noqa: E402

from chest_jax import compare  # noqa: E402
from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem  # noqa: E402

# Recipes as config overrides on top of --base, each naming every key it is about (so a change of the preset's
# defaults does not change what a variant means). "original" trains as the original did.
VARIANTS: dict[str, tuple[str, ...]] = {
    "original": ("training.loss=nmse", "ch_estimation.residual=none", "ch_estimation.reference=ls_linear",
                 "ch_estimation.queries=learned"),
    "nmse_db": ("training.loss=nmse_db", "ch_estimation.residual=none", "ch_estimation.reference=ls_linear",
                "ch_estimation.queries=learned"),
    "residual": ("ch_estimation.residual=add", "ch_estimation.reference=ls_linear", "training.loss=nmse",
                 "ch_estimation.queries=learned"),
    "residual_db": ("ch_estimation.residual=add", "ch_estimation.reference=ls_linear", "training.loss=nmse_db",
                    "ch_estimation.queries=learned"),
    "pilots_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=none", "ch_estimation.reference=ls_linear",
                  "training.loss=nmse_db"),
    "pilots_residual_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=add",
                           "ch_estimation.reference=ls_linear", "training.loss=nmse_db"),
    "pilots_gated_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=gated",
                        "ch_estimation.reference=ls_linear", "training.loss=nmse_db"),
    "robust_db": ("ch_estimation.queries=learned", "ch_estimation.residual=add",
                  "ch_estimation.reference=lmmse_robust", "training.loss=nmse_db"),
    "pilots_robust_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=add",
                         "ch_estimation.reference=lmmse_robust", "training.loss=nmse_db"),
    "pilots_robust_gated_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=gated",
                               "ch_estimation.reference=lmmse_robust", "training.loss=nmse_db"),
    "adaptive_db": ("ch_estimation.queries=learned", "ch_estimation.residual=add",
                    "ch_estimation.reference=lmmse_adaptive", "training.loss=nmse_db"),
    "pilots_adaptive_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=add",
                           "ch_estimation.reference=lmmse_adaptive", "training.loss=nmse_db"),
    "pilots_adaptive_gated_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=gated",
                                 "ch_estimation.reference=lmmse_adaptive", "training.loss=nmse_db"),
    "pilots_pdp_gated_db": ("ch_estimation.queries=pilots", "ch_estimation.residual=gated",
                            "ch_estimation.reference=lmmse_pdp", "training.loss=nmse_db"),
}


def _train(variant: str, seed: int, base: str, overrides: Sequence[str], runs_dir: Path,
           log) -> tuple[Path, float | None]:
    """The run directory of (variant, seed), training it unless it already finished; and its training seconds."""
    training_overrides = [o for o in overrides if not o.startswith("compare.")]
    cfg = C.load(base, [*VARIANTS[variant], *training_overrides, f"dataset.rnd_seed={seed}",
                        f"training.output_dir={runs_dir}", f"training.saved_model_name={variant}_s{seed}"])
    return _study.train_or_reuse(cfg, "base", log)


def _validation(run_dir: Path) -> dict[str, float]:
    return {k: v for k, v in _study.summary_of(run_dir).items() if k.startswith("val_") and isinstance(v, (int, float))}


def summarise(results: dict[str, Any], runs: dict[str, list[Path]], walls: dict[str, list]) -> dict[str, Any]:
    """Per variant: validation (mean, std over seeds of each val key), test curves, wall times; the choice."""
    out: dict[str, Any] = {"variants": {}, "baselines": {}}
    for variant, dirs in runs.items():
        vals = [_validation(d) for d in dirs]
        keys = sorted({k for v in vals for k in v})
        out["variants"][variant] = {
            "overrides": list(VARIANTS[variant]), "runs": [str(d) for d in dirs], "wall_s": walls[variant],
            "validation": {k: _study.mean_std([v.get(k) for v in vals]) for k in keys},
            "test": {}}
    for ct, curve in results["curves"].items():
        for label, series in curve["series"].items():
            target = (out["variants"][label]["test"] if label in out["variants"]
                      else out["baselines"].setdefault(label, {}))
            target[ct] = {"distances_m": curve["distances_m"], "pilot_snr_db": curve["pilot_snr_db"],
                          "nmse_db": series["nmse_db"], "nmse_db_std": series["nmse_db_std"],
                          "n_seeds": series["n_seeds"]}
    for row in results["rows"]:
        key = "variants" if row["model"] in out["variants"] else "baselines"
        out[key].setdefault(row["model"], {}).setdefault("test_sets", {})[row["test_set"]] = {
            "nmse_db": row["nmse_db"], "nmse_db_std": row["nmse_db_std"], "n_seeds": row["n_seeds"]}

    def fixed_distance_score(v: dict[str, Any]) -> float:
        fixed = [s["mean"] for k, s in v["validation"].items()
                 if k.startswith("val_nmse_db_") and k.endswith("m") and s["mean"] is not None]
        return float(np.mean(fixed)) if fixed else float("inf")

    scores = {name: fixed_distance_score(v) for name, v in out["variants"].items()}
    out["chosen_by_validation"] = min(scores, key=scores.get) if scores else None
    out["validation_score_db"] = scores
    return out


def markdown_table(summary: dict[str, Any], channel_type: str) -> str:
    """NMSE (dB) vs distance on `channel_type`: variants as mean +- std over seeds, then the baselines."""
    entries = {**summary["variants"], **summary["baselines"]}
    first = next(e["test"][channel_type] if "test" in e else e[channel_type] for e in entries.values())
    header = "| estimator | " + " | ".join(f"{d:g} m" for d in first["distances_m"]) + " |"
    lines = [header, "|" + " --- |" * (len(first["distances_m"]) + 1),
             "| pilot SNR (dB) | " + " | ".join(f"{s:.1f}" for s in first["pilot_snr_db"]) + " |"]
    for name, e in entries.items():
        curve = e["test"][channel_type] if "test" in e else e.get(channel_type)
        if curve is None:
            continue
        cells = [f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
                 for m, s in zip(curve["nmse_db"], curve["nmse_db_std"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["original", "nmse_db", "residual_db"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="VARIANT=S,S",
                        help="other seeds for one variant, e.g. residual_db=0 to screen a variant with one seed")
    parser.add_argument("--base", default="configs/quick/base.yaml", help="config every variant starts from")
    parser.add_argument("--compare-config", default="configs/quick/compare.yaml")
    parser.add_argument("--runs", default="runs/quality", help="directory of the study's run directories")
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every variant")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _study.parse_with_overrides(parser, argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    runs_dir, out = Path(args.runs), Path(args.out)
    study_start = time.perf_counter()
    runs: dict[str, list[Path]] = {}
    walls: dict[str, list] = {}
    seeds_of = {v: list(args.seeds) for v in args.variants}
    for item in args.seeds_for:
        variant, _, seeds = item.partition("=")
        if variant not in seeds_of or not seeds:
            parser.error(f"--seeds-for {item!r}: expected VARIANT=S[,S...] with VARIANT among --variants")
        seeds_of[variant] = [int(x) for x in seeds.split(",")]
    for variant in args.variants:
        for seed in seeds_of[variant]:
            run_dir, wall = _train(variant, seed, args.base, args.overrides, runs_dir, log)
            runs.setdefault(variant, []).append(run_dir)
            walls.setdefault(variant, []).append(wall)
    # Score on the training runs' own data population: the overrides reach the compare config too (training.*
    # aside), and run_compare refuses any population difference left.
    cfg = C.load(args.compare_config, [k for k in args.overrides if not k.startswith("training.")])
    entries = [compare.load_entry(variant, str(run_dir), seed=seed)
               for variant, dirs in runs.items() for seed, run_dir in zip(seeds_of[variant], dirs)]
    results = compare.run_compare(cfg, entries, out, log=log)
    summary = summarise(results, runs, walls)
    summary.update(base=args.base, overrides=args.overrides, seeds=seeds_of,
                   study_wall_s=time.perf_counter() - study_start)
    (out / "quality.json").write_text(json.dumps(compare.json_ready(summary), indent=1, allow_nan=False))
    for ct in results["curves"]:
        log(f"\nNMSE (dB) vs distance, {ct} (test profiles; mean ± std over seeds {seeds_of}):")
        log(markdown_table(summary, ct))
    log(f"\nchosen by validation (mean val NMSE over the fixed distances): {summary['chosen_by_validation']} "
        f"({ {k: round(v, 2) for k, v in summary['validation_score_db'].items()} })")
    log(f"wrote {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
