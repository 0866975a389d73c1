"""Compare trained estimators and classical baselines on fixed test sets (the library behind compare.py).

`run_compare` takes prediction functions (`ModelEntry`), builds the test sets from `cfg.compare`, scores
every entry and baseline, aggregates seeds, and writes results.csv, results.json and PNG plots into the
output directory. `cli` (behind compare.py) turns checkpoint specs into entries with `chest_jax.loading`.

One concept, the comparison, in the order it runs (population check, scoring, gains, tables, curves, CLI); the
estimators are in `chest_jax.baselines`, the metrics in `chest_jax.metrics`, the test sets in `chest_jax.testsets`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from chest_jax import baselines as baselines_lib
from chest_jax import config as config_lib
from chest_jax import evaluate, ofdm, plots, testsets
from chest_jax.config import Config, DatasetConfig, TestSetConfig
from chest_jax.errors import UserError, run_cli

CSV_COLUMNS = ("model", "kind", "test_set", "channel_type", "distance_m", "source", "n_samples", "n_seeds",
               "nmse_db", "nmse_db_std", "pooled_nmse_db", "evm_db", "evm_percent", "gain_db", "gain_se_db",
               "population_mismatch")


@dataclass(frozen=True)
class ModelEntry:
    """One trained model to score. Entries sharing a label are seeds (repeated trainings) of one model;
    they are reported as mean, standard deviation and count."""

    label: str
    predict_fn: Callable  # inputs (B, S, K, 2) -> (h_est (B, K, 2), eq (B, S, K, 2))
    path: str = ""
    seed: Optional[int] = None
    # (where, dataset config) of every training run behind the model (itself, its adapter, its base), checked
    # against the compare config's data population (`config.POPULATION_KEYS`); empty: nothing to check.
    trained_on: tuple[tuple[str, DatasetConfig], ...] = ()


class PopulationMismatchError(UserError, ValueError):
    """A model was trained on another profile pool, split or frame than the compare config scores it on."""


def population_mismatches(models: Sequence[ModelEntry], dataset: DatasetConfig) -> dict[str, list[str]]:
    """{label: ["<where>: dataset.<key>: trained X, compare Y", ...]} for the models whose training data differ."""
    found: dict[str, list[str]] = {}
    for entry in models:
        for where, trained in entry.trained_on:
            found.setdefault(entry.label, []).extend(
                f"{where}: {d}" for d in config_lib.population_differences(trained, dataset))
    return {label: diffs for label, diffs in found.items() if diffs}


def _check_populations(models: Sequence[ModelEntry], cfg: Config, log: Callable[[str], Any]) -> dict[str, list[str]]:
    mismatches = population_mismatches(models, cfg.dataset)
    if not mismatches:
        return {}
    listing = "\n".join(f"  {label}: {d}" for label, diffs in mismatches.items() for d in diffs)
    if not cfg.compare.allow_population_mismatch:
        raise PopulationMismatchError(
            "these models were trained on another data population than the compare config scores them on, so "
            "their test profiles may be training profiles or another population:\n" + listing + "\nSet the "
            "compare config's dataset keys to the models' (e.g. pass them as overrides), or, to score across "
            "populations on purpose, pass --allow-population-mismatch (the table then marks those models)")
    log("WARNING: scoring across data populations (--allow-population-mismatch); marked * in the table:\n"
        + listing)
    return mismatches


def source_title(source: str) -> str:
    """A human-readable data source for plot titles."""
    if source.startswith("pdp:"):
        return f"PDP files in {source[4:]}"
    if source.startswith("file:"):
        return f"original-format files {source[5:]}_input.npy / _true.npy"
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
            raise config_lib.ConfigError(f"model label {label!r} lists the same seed twice ({seeds}); give each "
                                         "trained run its own seed or label, otherwise one run would be counted "
                                         "twice")
        if label in baselines_lib.REGISTRY:
            raise config_lib.ConfigError(f"model label {label!r} is the name of a baseline; choose another label")
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


def _applicable(name: str, test_set: testsets.TestSet, correlations: dict[str, Any]) -> bool:
    """Whether baseline `name` has its side information on this test set: the true taps (lmmse_genie) and the
    correlation of its kind (none of the test scenario for an original-format file of unknown scenario)."""
    b = baselines_lib.REGISTRY[name]
    return (test_set.has_taps or not b.needs_taps) and (b.correlation is None or
                                                        correlations.get(b.correlation) is not None)


def _score_all(groups: dict[str, list[ModelEntry]], baselines: Sequence[str], test_set: testsets.TestSet,
               spec: ofdm.FrameSpec, correlations: dict[str, Any], batch_size: int) -> dict[str, dict[str, Any]]:
    """Every model entry and every applicable baseline on one test set; `correlations` maps a baseline's
    correlation kind ("scenario", "pooled") to the matrix it uses on this test set. Sets without a noise
    variance (original-format files) give the practical LMMSEs the frame's, which a receiver knows."""
    rows: dict[str, dict[str, Any]] = {}
    for label, entries in groups.items():
        runs = [_summary(evaluate.evaluate(e.predict_fn, test_set, spec, batch_size), seed=e.seed, path=e.path)
                for e in entries]
        rows[label] = _aggregate(label, "model", runs)
    for name in baselines:
        if not _applicable(name, test_set, correlations):
            continue
        kind = baselines_lib.REGISTRY[name].correlation
        result = evaluate.evaluate_baseline(name, test_set, spec, correlation=correlations.get(kind),
                                            noise_var=spec.noise_power_mw, batch_size=batch_size)
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
        model = r["model"] + (" *" if r.get("population_mismatch") else "")
        lines.append((model, r["test_set"], str(r["n_seeds"]), nmse, _fmt(r["pooled_nmse_db"]),
                      _fmt(r["evm_db"]), _fmt(r["evm_percent"]), gain))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def join(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    table = [join(header), join(["-" * w for w in widths]), *(join(row) for row in lines)]
    if any(r.get("population_mismatch") for r in rows):
        table.append("* trained on another data population than these test sets (--allow-population-mismatch)")
    return "\n".join(table)


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
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
    """{channel_type: {"scenario": R, "pooled": R}} for the practical LMMSEs asked for in cfg.compare.baselines;
    the key None holds the pooled one alone (for test sets of unknown scenario)."""
    cc = cfg.compare
    kinds = {baselines_lib.REGISTRY[b].correlation for b in cc.baselines} - {None}
    pooled = None
    if "pooled" in kinds:
        log(f"estimating the pooled frequency correlation of the training mix ({len(cfg.dataset.channel_type)} "
            f"channel types) from {cc.lmmse_train_samples} training channels")
        pooled = baselines_lib.training_correlation(cfg, None, num_samples=cc.lmmse_train_samples, seed=cc.seed)
    out: dict[Any, dict[str, Any]] = {None: {"pooled": pooled}}
    for ct in channel_types:
        out[ct] = {"pooled": pooled}
        if "scenario" in kinds:
            log(f"estimating the {ct} frequency correlation from {cc.lmmse_train_samples} training channels")
            out[ct]["scenario"] = baselines_lib.training_correlation(cfg, ct, num_samples=cc.lmmse_train_samples,
                                                                     seed=cc.seed)
    return out


def _table_rows(rows: dict[str, dict[str, Any]], name: str, test_set: testsets.TestSet, source: str,
                mismatches: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [{"model": row["label"], "kind": row["kind"], "test_set": name, "channel_type": test_set.channel_type,
             "distance_m": test_set.distance, "source": source, "n_samples": len(test_set),
             "n_seeds": row["n_seeds"], "nmse_db": row["nmse_db"], "nmse_db_std": row["nmse_db_std"],
             "pooled_nmse_db": row["pooled_nmse_db"], "evm_db": row["evm_db"], "evm_percent": row["evm_percent"],
             "gain_db": row.get("gain_db"), "gain_se_db": row.get("gain_se_db"),
             "population_mismatch": "; ".join(mismatches.get(row["label"], []))} for row in rows.values()]


def pilot_snr_db(test_set: testsets.TestSet, spec: ofdm.FrameSpec) -> float:
    """Per-RE pilot SNR of a generated test set in dB: mean over samples and DMRS REs of |H|^2 / noise variance."""
    h_pilots = np.asarray(test_set.arrays["h"])[:, np.asarray(spec.dmrs_index)]
    snr = np.mean(np.abs(h_pilots) ** 2, axis=1) / np.asarray(test_set.arrays["noise_var"], dtype=np.float64)
    return float(10.0 * np.log10(np.mean(snr)))


def _curve(cfg: Config, groups: dict[str, list[ModelEntry]], channel_type: str, spec: ofdm.FrameSpec,
           correlations: dict[str, Any], batch_size: int) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """NMSE at each of cfg.compare.distances for every estimator, {label: {kind, nmse_db: [...], ...}}, and the
    pilot SNR (dB) of each distance's test set."""
    cc = cfg.compare
    series: dict[str, dict[str, Any]] = {}
    snr_db: list[float] = []
    for distance in cc.distances:
        point_set = testsets.load_or_make_test_set(cfg, TestSetConfig(channel_type, float(distance), cc.curve_samples),
                                                   seed=cc.seed, cache_dir=cc.cache_dir, full=False)
        snr_db.append(pilot_snr_db(point_set, spec))
        rows = _score_all(groups, cc.baselines, point_set, spec, correlations, batch_size)
        for label, row in rows.items():
            s = series.setdefault(label, {"kind": row["kind"], "n_seeds": row["n_seeds"], "nmse_db": [],
                                          "nmse_db_std": [], "pooled_nmse_db": [], "per_seed_nmse_db": []})
            s["nmse_db"].append(row["nmse_db"])
            s["nmse_db_std"].append(row["nmse_db_std"])
            s["pooled_nmse_db"].append(row["pooled_nmse_db"])
            s["per_seed_nmse_db"].append([r["nmse_db"] for r in row["runs"]])
    return series, snr_db


def _write_tables(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: "" if row[k] is None else (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k])
                             for k in CSV_COLUMNS})
    return csv_path, json_path


def _score_test_set(cfg: Config, name: str, what: TestSetConfig | str, groups: dict[str, list[ModelEntry]],
                    spec: ofdm.FrameSpec, correlations: dict[Any, dict[str, Any]], mismatches: dict[str, list[str]],
                    results: dict[str, Any], out: Path, batch_size: int, log: Callable[[str], Any]) -> str:
    """One test set (a generated one's config, or an original-format file prefix): scored into `results`; returns
    its bar plot's path."""
    cc = cfg.compare
    if isinstance(what, TestSetConfig):
        test_set = testsets.load_or_make_test_set(cfg, what, seed=cc.seed, cache_dir=cc.cache_dir, full=True)
        log(f"test set {name}: {len(test_set)} samples of {what.channel_type} at {what.distance:g} m "
            f"({'cached' if test_set.loaded_from_cache else 'generated'}: {test_set.cache_path})")
        set_source, title = results["source"], f"{what.channel_type} at {what.distance:g} m"
    else:
        test_set = testsets.load_original_test_set(what)
        log(f"test set {name}: {len(test_set)} samples from the original-format files {what}_input.npy / "
            "_true.npy (baselines that need no side information of the test scenario only)")
        set_source, title = test_set.source, f"original-format test set {name}"
    rows = _score_all(groups, cc.baselines, test_set, spec, correlations[test_set.channel_type], batch_size)
    _add_gains(rows, results["base"])
    results["test_sets"][name] = {"channel_type": test_set.channel_type, "distance_m": test_set.distance,
                                  "num_samples": len(test_set), "source": set_source,
                                  "cache_path": test_set.cache_path, "estimators": rows}
    results["rows"] += _table_rows(rows, name, test_set, set_source, mismatches)
    references = {_display_label(b): rows[b]["nmse_db"] for b in ("ls_linear", "lmmse_genie") if b in rows}
    return plots.plot_nmse_bars(
        [{**row, "label": _display_label(label)} for label, row in rows.items()], out / f"nmse_{name}.png",
        f"{title}, {len(test_set)} samples\n{source_title(set_source)}", reference_lines=references)


def _score_curves(cfg: Config, ct: str, groups: dict[str, list[ModelEntry]], spec: ofdm.FrameSpec,
                  correlations: dict[str, Any], results: dict[str, Any], out: Path, batch_size: int,
                  log: Callable[[str], Any]) -> list[str]:
    """NMSE vs distance and vs pilot SNR of channel type `ct` into `results`; returns the two plots' paths."""
    cc = cfg.compare
    log(f"NMSE vs distance for {ct}: {len(cc.distances)} distances x {cc.curve_samples} samples")
    series, snr_db = _curve(cfg, groups, ct, spec, correlations, batch_size)
    results["curves"][ct] = {"distances_m": list(cc.distances), "pilot_snr_db": snr_db,
                             "samples_per_point": cc.curve_samples, "series": series}
    labelled = {_display_label(k): v for k, v in series.items()}
    subtitle = f"{ct}, {cc.curve_samples} samples per point\n{source_title(results['source'])}"
    return [plots.plot_nmse_curve(cc.distances, labelled, out / f"nmse_vs_distance_{ct}.png",
                                  f"NMSE vs distance, {subtitle}", xlabel="Tx-Rx distance (m), log scale", log_x=True),
            plots.plot_nmse_curve(snr_db, labelled, out / f"nmse_vs_snr_{ct}.png", f"NMSE vs pilot SNR, {subtitle}",
                                  xlabel="per-RE pilot SNR (dB): mean |H|^2 / noise variance at the DMRS REs",
                                  log_x=False)]


def run_compare(cfg: Config, models: Sequence[ModelEntry], out_dir: str | Path, *,
                log: Callable[[str], Any] = print, batch_size: int = 32) -> dict[str, Any]:
    """Score every model entry and every baseline of cfg.compare.baselines on the test sets of
    cfg.compare (generated, then original-format files), plus NMSE-vs-distance and NMSE-vs-pilot-SNR curves, and
    write results.csv, results.json, nmse_<test_set>.png, nmse_vs_distance_<channel_type>.png and
    nmse_vs_snr_<channel_type>.png into out_dir. The first label is the base of the gains. Models whose
    `trained_on` data population differs from cfg.dataset are refused (PopulationMismatchError) unless
    cfg.compare.allow_population_mismatch.

    Returns the results dict written to results.json, with `files` listing every written path.
    """
    cc = cfg.compare
    groups = _group_by_label(models)
    mismatches = _check_populations(models, cfg, log)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    source = testsets.data_source(cfg.dataset)
    base = next(iter(groups), None)
    channel_types = list(dict.fromkeys(ts.channel_type for ts in cc.test_sets))
    correlations = _correlations(cfg, channel_types, log)

    results: dict[str, Any] = {"source": source, "base": base, "seed": cc.seed, "config": cfg.to_dict(),
                               "population_mismatch": mismatches, "test_sets": {}, "curves": {}, "rows": [],
                               "files": {}}
    plot_paths: list[str] = []
    sets = [(name, ts_cfg) for ts_cfg, name in zip(cc.test_sets, _unique_names(cc.test_sets))]
    sets += [(Path(prefix).name, prefix) for prefix in cc.original_test_sets]
    for name, what in sets:
        plot_paths.append(_score_test_set(cfg, name, what, groups, spec, correlations, mismatches, results, out,
                                          batch_size, log))
    for ct in channel_types:
        plot_paths += _score_curves(cfg, ct, groups, spec, correlations[ct], results, out, batch_size, log)

    csv_path, json_path = _write_tables(results, out)
    results["files"] = {"csv": str(csv_path), "json": str(json_path), "plots": plot_paths}
    results = json_ready(results)
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
        raise config_lib.ConfigError(f"model {text!r}: expected SPEC or label=SPEC, with SPEC a run directory, a "
                                     "checkpoint or BASE+ADAPTER")
    return label or Path(spec.split("+")[-1].rstrip("/")).name, spec


_SECTIONS = tuple(f"{f.name}." for f in dataclasses.fields(Config))


def _split_overrides(models: Optional[list[str]], overrides: list[str]) -> tuple[Optional[list[str]], list[str]]:
    """`--models a b compare.seed=1` puts the override among the models (nargs="+" takes every word): move each
    `section.key=value` word (section one of the config's) back to the overrides. A model label never starts
    with a config section name followed by a dot."""
    if models is None:
        return None, overrides
    moved = [m for m in models if "=" in m and m.startswith(_SECTIONS)]
    return [m for m in models if m not in moved], [*moved, *overrides]


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """`python compare.py [--config FILE] [--models SPEC ...] [--test-set PREFIX ...] [--out DIR]
    [--allow-population-mismatch] [--debug] [section.key=value ...]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="compare.py", description="Score trained estimators and the classical baselines on fixed test sets.")
    parser.add_argument("--config", help="YAML config (its compare section lists models and test sets)")
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        help="run directories, checkpoints or BASE+ADAPTER, each optionally label=SPEC; entries "
                             "sharing a label are seeds of one model (default: compare.models)")
    parser.add_argument("--test-set", action="append", metavar="PREFIX", dest="test_sets",
                        help="score only the original-format test set <PREFIX>_input.npy / <PREFIX>_true.npy "
                             "(repeatable; the generated test sets and curves are skipped)")
    parser.add_argument("--out", help="output directory (default: compare.out_dir)")
    parser.add_argument("--allow-population-mismatch", action="store_true",
                        help="score models trained on another profile pool, split or frame (marked in the table)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    args.models, args.overrides = _split_overrides(args.models, args.overrides)
    return run_cli(lambda: _run_cli(args), debug=args.debug)


def load_entry(label: str, spec: str, *, seed: Optional[int] = None, output_dir: str = "runs",
               precision: Optional[str] = None) -> ModelEntry:
    """A `ModelEntry` for the checkpoint spec (PATH or BASE+ADAPTER), restored strictly, with the dataset configs
    it was trained on (for the population check); precision: compute in it instead of as trained."""
    from chest_jax import loading  # checkpoints only here: run_compare itself takes prediction functions

    model, _, _ = loading.load_model(spec, output_dir=output_dir, precision=precision)
    return ModelEntry(label, loading.make_predict_fn(model), path=spec, seed=seed,
                      trained_on=tuple(loading.training_datasets(spec, output_dir=output_dir)))


def _run_cli(args) -> int:
    overrides = list(args.overrides)
    if args.test_sets:
        overrides += ["compare.test_sets=[]", "compare.distances=[]",
                      "compare.original_test_sets=" + json.dumps(args.test_sets)]
    if args.allow_population_mismatch:
        overrides.append("compare.allow_population_mismatch=true")
    cfg = config_lib.load(args.config, overrides)
    specs = args.models if args.models is not None else list(cfg.compare.models)
    models = [load_entry(*parse_model_spec(text), output_dir=cfg.training.output_dir,
                         precision=cfg.compare.precision) for text in specs]
    run_compare(cfg, models, args.out or cfg.compare.out_dir)
    return 0
