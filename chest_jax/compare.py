"""Compare trained estimators and classical baselines on fixed test sets (the library behind compare.py).

`run_compare` takes prediction functions (`ModelEntry`), builds the test sets from `cfg.compare`, scores
every entry and baseline, aggregates seeds, and writes results.csv, results.json and PNG plots into the
output directory. `cli` (behind compare.py) turns checkpoint specs into entries with `chest_jax.loading`.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from chest_jax import baselines as baselines_lib
from chest_jax import evaluate, ofdm, plots, testsets
from chest_jax.config import Config, TestSetConfig

CSV_COLUMNS = ("model", "kind", "test_set", "channel_type", "distance_m", "source", "n_samples", "n_seeds",
               "nmse_db", "nmse_db_std", "pooled_nmse_db", "evm_db", "evm_percent", "gain_db", "gain_se_db")


@dataclass(frozen=True)
class ModelEntry:
    """One trained model to score. Entries sharing a label are seeds (repeated trainings) of one model;
    they are reported as mean, standard deviation and count."""

    label: str
    predict_fn: Callable  # inputs (B, S, K, 2) -> (h_est (B, K, 2), eq (B, S, K, 2))
    path: str = ""
    seed: Optional[int] = None


def source_title(source: str) -> str:
    """A human-readable data source for plot titles."""
    if source.startswith("pdp:"):
        return f"PDP files in {source[4:]}"
    if source.startswith("tr38901-"):
        return f"TR 38.901 generated PDPs ({source[8:]})"
    return source


def _group_by_label(models: Sequence[ModelEntry]) -> dict[str, list[ModelEntry]]:
    groups: dict[str, list[ModelEntry]] = {}
    for entry in models:
        groups.setdefault(entry.label, []).append(entry)
    for label, entries in groups.items():
        seeds = [e.seed for e in entries if e.seed is not None]
        if len(seeds) != len(set(seeds)):
            raise ValueError(f"model label {label!r} lists the same seed twice ({seeds}); give each trained "
                             "run its own seed or label, otherwise one run would be counted twice")
        if label in baselines_lib.REGISTRY:
            raise ValueError(f"model label {label!r} is the name of a baseline; choose another label")
    return groups


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values)."""
    finite = [v for v in values if v is not None]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def _aggregate(label: str, kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    nmse, nmse_std = _mean_std([r["nmse_db"] for r in runs])
    pooled, pooled_std = _mean_std([r["pooled_nmse_db"] for r in runs])
    evm, evm_std = _mean_std([r["evm_db"] for r in runs])
    evm_pct, _ = _mean_std([r["evm_percent"] for r in runs])
    return {"label": label, "kind": kind, "n_seeds": len(runs), "nmse_db": nmse, "nmse_db_std": nmse_std,
            "pooled_nmse_db": pooled, "pooled_nmse_db_std": pooled_std, "evm_db": evm, "evm_db_std": evm_std,
            "evm_percent": evm_pct, "runs": runs}


def _summary(result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The per-run numbers kept in the report (the per-sample array goes to `per_sample_nmse_db`)."""
    per_sample_db = 10.0 * np.log10(np.maximum(result["per_sample_nmse"], 1e-30))
    return {**extra, "nmse_db": result["nmse_db"], "pooled_nmse_db": result["pooled_nmse_db"],
            "evm_db": result["evm_db"], "evm_percent": result["evm_percent"],
            "per_sample_nmse_db": [round(float(v), 4) for v in per_sample_db]}


def _add_gains(rows: dict[str, dict[str, Any]], base: Optional[str]) -> None:
    """gain_db = base NMSE - this NMSE (dB; positive: better than the base) and its standard error
    sqrt(s_base^2 / n_base + s^2 / n) over seeds (baselines are deterministic: no seed variance)."""
    if base is None or base not in rows:
        return
    ref = rows[base]

    def variance_of_mean(row: dict[str, Any]) -> Optional[float]:
        if row["kind"] == "baseline":
            return 0.0
        return None if row["nmse_db_std"] is None else row["nmse_db_std"] ** 2 / row["n_seeds"]

    for label, row in rows.items():
        row["gain_db"] = None if row["nmse_db"] is None else ref["nmse_db"] - row["nmse_db"]
        parts = [variance_of_mean(ref), variance_of_mean(row)]
        row["gain_se_db"] = None if label == base or None in parts else math.sqrt(sum(parts))


def _score_all(groups: dict[str, list[ModelEntry]], baselines: Sequence[str], test_set: testsets.TestSet,
               spec: Any, correlations: dict[str, Any], batch_size: int) -> dict[str, dict[str, Any]]:
    """Every model entry and baseline on one test set; `correlations` maps a baseline's correlation kind
    ("scenario", "pooled") to the matrix it uses on this test set."""
    rows: dict[str, dict[str, Any]] = {}
    for label, entries in groups.items():
        runs = [_summary(evaluate.evaluate(e.predict_fn, test_set, spec, batch_size), seed=e.seed, path=e.path)
                for e in entries]
        rows[label] = _aggregate(label, "model", runs)
    for name in baselines:
        if name == "lmmse_genie" and not test_set.has_taps:
            continue
        kind = baselines_lib.REGISTRY[name].correlation
        result = evaluate.evaluate_baseline(name, test_set, spec, correlation=correlations.get(kind),
                                            batch_size=batch_size)
        rows[name] = _aggregate(name, "baseline", [_summary(result)])
    return rows


def _display_label(label: str) -> str:
    return baselines_lib.TITLES.get(label, label)


def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of the CSV rows (NMSE mean ± std over seeds, gain ± standard error)."""
    header = ("model", "test set", "n", "NMSE dB", "pooled dB", "EVM dB", "EVM %", "gain dB")
    lines = []
    for r in rows:
        nmse = _fmt(r["nmse_db"]) + (f" ± {_fmt(r['nmse_db_std'])}" if r["nmse_db_std"] is not None else "")
        gain = _fmt(r["gain_db"], signed=True) + (f" ± {_fmt(r['gain_se_db'])}" if r["gain_se_db"] is not None
                                                  else "")
        lines.append((r["model"], r["test_set"], str(r["n_seeds"]), nmse, _fmt(r["pooled_nmse_db"]),
                      _fmt(r["evm_db"]), _fmt(r["evm_percent"]), gain))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def join(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([join(header), join(["-" * w for w in widths]), *(join(row) for row in lines)])


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _unique_names(test_set_cfgs: Sequence[TestSetConfig]) -> list[str]:
    names, seen = [], {}
    for ts in test_set_cfgs:
        name = testsets.default_name(ts)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def _correlations(cfg: Config, channel_types: Sequence[str], log: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """{channel_type: {"scenario": R, "pooled": R}} for the practical LMMSEs asked for in cfg.compare.baselines."""
    cc = cfg.compare
    kinds = {baselines_lib.REGISTRY[b].correlation for b in cc.baselines} - {None}
    pooled = None
    if "pooled" in kinds:
        log(f"estimating the pooled frequency correlation of the training mix ({len(cfg.dataset.channel_type)} "
            f"channel types) from {cc.lmmse_train_samples} training channels")
        pooled = baselines_lib.training_correlation(cfg, None, num_samples=cc.lmmse_train_samples, seed=cc.seed)
    out: dict[str, dict[str, Any]] = {}
    for ct in channel_types:
        out[ct] = {"pooled": pooled}
        if "scenario" in kinds:
            log(f"estimating the {ct} frequency correlation from {cc.lmmse_train_samples} training channels")
            out[ct]["scenario"] = baselines_lib.training_correlation(cfg, ct, num_samples=cc.lmmse_train_samples,
                                                                     seed=cc.seed)
    return out


def _table_rows(rows: dict[str, dict[str, Any]], name: str, ts_cfg: TestSetConfig, source: str,
                num_samples: int) -> list[dict[str, Any]]:
    return [{"model": row["label"], "kind": row["kind"], "test_set": name, "channel_type": ts_cfg.channel_type,
             "distance_m": ts_cfg.distance, "source": source, "n_samples": num_samples,
             "n_seeds": row["n_seeds"], "nmse_db": row["nmse_db"], "nmse_db_std": row["nmse_db_std"],
             "pooled_nmse_db": row["pooled_nmse_db"], "evm_db": row["evm_db"], "evm_percent": row["evm_percent"],
             "gain_db": row.get("gain_db"), "gain_se_db": row.get("gain_se_db")} for row in rows.values()]


def _curve(cfg: Config, groups: dict[str, list[ModelEntry]], channel_type: str, spec: ofdm.FrameSpec,
           correlations: dict[str, Any], batch_size: int) -> dict[str, dict[str, Any]]:
    """NMSE at each of cfg.compare.distances for every estimator: {label: {kind, nmse_db: [...], ...}}."""
    cc = cfg.compare
    series: dict[str, dict[str, Any]] = {}
    for distance in cc.distances:
        point_set = testsets.load_or_make_test_set(cfg, TestSetConfig(channel_type, float(distance), cc.curve_samples),
                                                   seed=cc.seed, cache_dir=cc.cache_dir, full=False)
        rows = _score_all(groups, cc.baselines, point_set, spec, correlations, batch_size)
        for label, row in rows.items():
            s = series.setdefault(label, {"kind": row["kind"], "n_seeds": row["n_seeds"], "nmse_db": [],
                                          "nmse_db_std": [], "pooled_nmse_db": [], "per_seed_nmse_db": []})
            s["nmse_db"].append(row["nmse_db"])
            s["nmse_db_std"].append(row["nmse_db_std"])
            s["pooled_nmse_db"].append(row["pooled_nmse_db"])
            s["per_seed_nmse_db"].append([r["nmse_db"] for r in row["runs"]])
    return series


def _write_tables(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: "" if row[k] is None else (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k])
                             for k in CSV_COLUMNS})
    return csv_path, json_path


def run_compare(cfg: Config, models: Sequence[ModelEntry], out_dir: str | Path, *,
                log: Callable[[str], Any] = print, batch_size: int = 32) -> dict[str, Any]:
    """Score every model entry and every baseline of cfg.compare.baselines on the test sets of
    cfg.compare, plus NMSE-vs-distance curves, and write results.csv, results.json, nmse_<test_set>.png and
    nmse_vs_distance_<channel_type>.png into out_dir. The first label is the base of the gains.

    Returns the results dict written to results.json, with `files` listing every written path.
    """
    cc = cfg.compare
    groups = _group_by_label(models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    source = testsets.data_source(cfg.dataset)
    base = next(iter(groups), None)
    channel_types = list(dict.fromkeys(ts.channel_type for ts in cc.test_sets))
    correlations = _correlations(cfg, channel_types, log)

    results: dict[str, Any] = {"source": source, "base": base, "seed": cc.seed, "config": cfg.to_dict(),
                               "test_sets": {}, "curves": {}, "rows": [], "files": {}}
    plot_paths: list[str] = []
    for ts_cfg, name in zip(cc.test_sets, _unique_names(cc.test_sets)):
        test_set = testsets.load_or_make_test_set(cfg, ts_cfg, seed=cc.seed, cache_dir=cc.cache_dir, full=True)
        log(f"test set {name}: {len(test_set)} samples of {ts_cfg.channel_type} at {ts_cfg.distance:g} m "
            f"({'cached' if test_set.loaded_from_cache else 'generated'}: {test_set.cache_path})")
        rows = _score_all(groups, cc.baselines, test_set, spec, correlations[ts_cfg.channel_type], batch_size)
        _add_gains(rows, base)
        results["test_sets"][name] = {"channel_type": ts_cfg.channel_type, "distance_m": ts_cfg.distance,
                                      "num_samples": len(test_set), "source": test_set.source,
                                      "cache_path": test_set.cache_path, "estimators": rows}
        results["rows"] += _table_rows(rows, name, ts_cfg, source, len(test_set))
        references = {_display_label(b): rows[b]["nmse_db"] for b in ("ls_linear", "lmmse_genie") if b in rows}
        plot_paths.append(plots.plot_nmse_bars(
            [{**row, "label": _display_label(label)} for label, row in rows.items()], out / f"nmse_{name}.png",
            f"{ts_cfg.channel_type} at {ts_cfg.distance:g} m, {len(test_set)} samples\n{source_title(source)}",
            reference_lines=references))

    for ct in channel_types:
        log(f"NMSE vs distance for {ct}: {len(cc.distances)} distances x {cc.curve_samples} samples")
        series = _curve(cfg, groups, ct, spec, correlations[ct], batch_size)
        results["curves"][ct] = {"distances_m": list(cc.distances), "samples_per_point": cc.curve_samples,
                                 "series": series}
        plot_paths.append(plots.plot_nmse_vs_distance(
            cc.distances, {_display_label(k): v for k, v in series.items()}, out / f"nmse_vs_distance_{ct}.png",
            f"NMSE vs distance, {ct}, {cc.curve_samples} samples per point\n{source_title(source)}"))

    csv_path, json_path = _write_tables(results, out)
    results["files"] = {"csv": str(csv_path), "json": str(json_path), "plots": plot_paths}
    results = _json_ready(results)
    json_path.write_text(json.dumps(results, indent=1, allow_nan=False))
    log(format_table(results["rows"]))
    if base is not None:
        log(f"gain dB: NMSE improvement over {base!r} (positive = better), ± its standard error over seeds")
    log(f"wrote {csv_path}, {json_path} and {len(plot_paths)} plots in {out}")
    return results


def parse_model_spec(text: str) -> tuple[str, str]:
    """`label=SPEC` or `SPEC` -> (label, SPEC); the default label is the run's (or the adapter's) folder name."""
    label, sep, spec = text.partition("=")
    if not sep or "/" in label or "+" in label:
        label, spec = "", text
    if not spec:
        raise ValueError(f"model {text!r}: expected SPEC or label=SPEC, with SPEC a run directory, a checkpoint "
                         "or BASE+ADAPTER")
    return label or Path(spec.split("+")[-1].rstrip("/")).name, spec


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python compare.py [--config FILE] [--models SPEC ...] [--out DIR] [section.key=value ...]`."""
    import argparse

    from chest_jax import config as config_lib, loading

    parser = argparse.ArgumentParser(
        prog="compare.py", description="Score trained estimators and the classical baselines on fixed test sets.")
    parser.add_argument("--config", help="YAML config (its compare section lists models and test sets)")
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        help="run directories, checkpoints or BASE+ADAPTER, each optionally label=SPEC; entries "
                             "sharing a label are seeds of one model (default: compare.models)")
    parser.add_argument("--out", help="output directory (default: compare.out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    from chest_jax.channels import PDPError
    from chest_jax.checkpoint import CheckpointError
    try:
        return _run_cli(args, config_lib, loading)
    except (config_lib.ConfigError, CheckpointError, PDPError, ValueError, OSError) as e:
        import sys
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_cli(args, config_lib, loading) -> int:
    cfg = config_lib.load(args.config, args.overrides)
    specs = args.models if args.models is not None else list(cfg.compare.models)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    models = []
    for text in specs:
        label, model_spec = parse_model_spec(text)
        model, model_cfg, _ = loading.load_model(model_spec, output_dir=cfg.training.output_dir)
        if model_cfg.ch_estimation.cond.length != spec.num_used:
            raise ValueError(f"model {model_spec!r} expects {model_cfg.ch_estimation.cond.length} used subcarriers "
                             f"but the compare config's frame has {spec.num_used}; use the dataset settings the "
                             "model was trained with (fft_size, num_guard_subcarriers)")
        models.append(ModelEntry(label, loading.make_predict_fn(model), path=model_spec))
    run_compare(cfg, models, args.out or cfg.compare.out_dir)
    return 0
