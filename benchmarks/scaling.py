"""Scaling curve: one quality-study recipe trained on 1x, 4x, 16x ... the CPU preset's samples, scored on the
InF_Los 50 m and RMa_Los 300 m test sets beside the classical estimators.

    python benchmarks/scaling.py [--variant pilots_gated_db] [--multiples 1 4 16] [--seeds 0] [--seeds-for 4=0]
                                 [--base configs/quick/base.yaml] [--out results/scaling] [section.key=value ...]

Each multiple m is a quality study (`benchmarks/quality.py`) of the one variant with training.num_iter = m x the
base config's steps (same batch, warm-up and cosine schedule stretched over the longer run); the runs of m = 1
are in --runs (default runs/quality, shared with the quality study), the others in <runs>_x<m>. Finished runs
are reused, so the long multiples can be run one at a time and an interrupted one resumes; `--seeds-for M=S,S`
gives one multiple its own seeds (the long ones with fewer). Written into --out: scaling.json (per multiple:
training samples, seeds, wall time of each run, the validation score a budget would be chosen by (mean over seeds
of the mean validation NMSE over the fixed distances), test-set NMSE mean and std over seeds, the baselines)
and scaling_<test_set>.png (NMSE against training samples on a log axis, baselines as flat lines).
Overrides (anywhere on the line) are passed to every study.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402,F401  (puts the repository on sys.path)
import _study  # noqa: E402
import quality  # noqa: E402

from chest_jax import baselines, compare, plots  # noqa: E402
from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem  # noqa: E402

# The baselines drawn beside the curve: the receiver's practical choices (the pilots alone, the training mix's
# correlation, or the test scenario's); lmmse_pdp is also the preset's reference, so the gap to it is what the
# learned correction adds.
CURVE_BASELINES = ("ls_linear", "lmmse_robust", "lmmse_adaptive", "lmmse_pdp", "lmmse_pooled", "lmmse_practical")


def run_multiple(variant: str, multiple: float, steps: int, seeds: Sequence[int], base: str, overrides: Sequence[str],
                 runs: str, out: Path) -> dict[str, Any]:
    """Run (or reuse) the quality study of `variant` at multiple x the base steps; its quality.json summary."""
    study_out = out / f"x{multiple:g}"
    argv = [*overrides, f"training.num_iter={round(steps * multiple)}", "--variants", variant,
            "--seeds", *[str(s) for s in seeds], "--base", base,
            "--runs", runs if multiple == 1 else f"{runs}_x{multiple:g}", "--out", str(study_out)]
    quality.main(argv)
    return json.loads((study_out / "quality.json").read_text())


def collect(variant: str, multiples: Sequence[float], summaries: Sequence[dict[str, Any]], steps: int,
            batch: int) -> dict[str, Any]:
    """Per test set: the variant's NMSE mean/std at each multiple, and each baseline's (they do not train, so
    they agree across multiples up to the test cache; the first study's value is kept)."""
    first = summaries[0]
    test_sets = sorted(first["variants"][variant]["test_sets"])
    out: dict[str, Any] = {"variant": variant, "multiples": list(multiples),
                           "training_samples": [round(m * steps) * batch for m in multiples],
                           "seeds": [s["seeds"][variant] for s in summaries],
                           "wall_s": [s["variants"][variant]["wall_s"] for s in summaries],
                           "validation_score_db": [s["validation_score_db"][variant] for s in summaries],
                           "test_sets": {}}
    for ts in test_sets:
        rows = [s["variants"][variant]["test_sets"][ts] for s in summaries]
        out["test_sets"][ts] = {
            "nmse_db": [r["nmse_db"] for r in rows], "nmse_db_std": [r["nmse_db_std"] for r in rows],
            "n_seeds": [r["n_seeds"] for r in rows],
            "baselines": {b: first["baselines"][b]["test_sets"][ts]["nmse_db"]
                          for b in CURVE_BASELINES if ts in first["baselines"].get(b, {}).get("test_sets", {})}}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="pilots_gated_db", choices=sorted(quality.VARIANTS))
    parser.add_argument("--multiples", nargs="+", type=float, default=[1, 4, 16],
                        help="training budgets as multiples of the base config's num_iter (0.25 is allowed)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="M=S,S",
                        help="other seeds for one multiple, e.g. 4=0 to run the long budget with one seed")
    parser.add_argument("--base", default="configs/quick/base.yaml")
    parser.add_argument("--runs", default="runs/quality",
                        help="run directory of the 1x study (shared with quality.py); multiple m uses <runs>_x<m>")
    parser.add_argument("--out", default="results/scaling")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every study")
    args = _study.parse_with_overrides(parser, argv)
    base_cfg = C.load(args.base, [o for o in args.overrides if not o.startswith("compare.")])
    steps, batch = base_cfg.training.num_iter, base_cfg.dataset.batch_size
    if any(round(m * steps) < 1 for m in args.multiples):
        parser.error(f"--multiples {args.multiples}: each must give at least one step of the base's {steps}")
    seeds_of = {m: list(args.seeds) for m in args.multiples}
    for item in args.seeds_for:
        m, _, seeds = item.partition("=")
        try:
            multiple, chosen = float(m), [int(x) for x in seeds.split(",")]
        except ValueError:
            multiple = chosen = None
        if multiple not in seeds_of or not chosen:
            parser.error(f"--seeds-for {item!r}: expected M=S[,S...] with M among --multiples {args.multiples}")
        seeds_of[multiple] = chosen
    out = Path(args.out)
    summaries = [run_multiple(args.variant, m, steps, seeds_of[m], args.base, args.overrides, args.runs, out)
                 for m in args.multiples]
    result = collect(args.variant, args.multiples, summaries, steps, batch)
    files = []
    for ts, r in result["test_sets"].items():
        series = {f"{args.variant} (mean ± std over seeds)": {"nmse_db": r["nmse_db"],
                                                              "nmse_db_std": r["nmse_db_std"]}}
        series.update({baselines.TITLES.get(b, b): {"nmse_db": [v] * len(args.multiples), "kind": "baseline"}
                       for b, v in r["baselines"].items()})
        files.append(plots.plot_nmse_curve(result["training_samples"], series, out / f"scaling_{ts}.png",
                                           f"{ts}: NMSE against training samples", xlabel="training samples",
                                           log_x=True))
    result["files"] = files
    (out / "scaling.json").write_text(json.dumps(compare.json_ready(result), indent=1, allow_nan=False))
    print(f"\n{args.variant}: NMSE (dB) against training samples (mean ± std over the seeds of each multiple: "
          f"{ {m: seeds_of[m] for m in args.multiples} })")
    for ts, r in result["test_sets"].items():
        cells = ", ".join(f"{n:,}: {m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
                          for n, m, s in zip(result["training_samples"], r["nmse_db"], r["nmse_db_std"]))
        base = ", ".join(f"{b} {v:.2f}" for b, v in r["baselines"].items())
        print(f"  {ts}: {cells}   ({base})")
    print("  validation score (mean val NMSE over the fixed distances, dB): "
          + ", ".join(f"{n:,}: {v:.2f}" for n, v in zip(result["training_samples"], result["validation_score_db"])))
    print(f"wrote {out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
