"""Figures as PNG files, drawn on `matplotlib.figure.Figure` objects directly.

No pyplot: pyplot keeps global state and its backend choice would leak into a notebook that imports chest-jax,
while a bare Figure renders with the Agg canvas on any machine, with or without a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from chest_jax.metrics import to_complex

_TAB10 = matplotlib.colormaps["tab10"]


def _save(fig: Figure, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def plot_channel_estimates(h_true_BxK: Any, h_est_BxK: Any, path: str | Path, title: str = "") -> str:
    """True vs estimated channel over the used subcarriers: one row per sample, real and imaginary parts.

    Channels are complex (B, K) or real (B, K, 2), in the generator's units (sqrt(mW)); returns the path.
    """
    h_true, h_est = to_complex(h_true_BxK), to_complex(h_est_BxK)
    if h_true.shape != h_est.shape or h_true.ndim != 2:
        raise ValueError(f"true {h_true.shape} and estimated {h_est.shape} channels must both be (B, K)")
    num_samples = h_true.shape[0]
    fig = Figure(figsize=(12, 2.6 * num_samples + 0.6))
    axes = fig.subplots(num_samples, 2, squeeze=False, sharex=True)
    k = np.arange(h_true.shape[1])
    for b in range(num_samples):
        for col, (part, name) in enumerate(((np.real, "Re"), (np.imag, "Im"))):
            ax = axes[b, col]
            ax.plot(k, part(h_true[b]), color="black", lw=1.2, label="true")
            ax.plot(k, part(h_est[b]), color="tab:red", lw=0.9, ls="--", label="estimated")
            ax.set_ylabel(f"{name} H  (sample {b})")
            ax.grid(alpha=0.3)
            if b == 0:
                ax.legend(loc="upper right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("used subcarrier index k")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_nmse_bars(entries: Sequence[Mapping[str, Any]], path: str | Path, title: str,
                   reference_lines: Optional[Mapping[str, float]] = None) -> str:
    """Bar chart of NMSE (dB) per estimator on one test set.

    entries: dicts with `label`, `nmse_db`, optional `nmse_db_std` (spread over seeds, drawn as an error
    bar), `n_seeds` and `kind` ("model" or "baseline"; baselines are hatched grey). reference_lines maps
    a name to an NMSE (dB) drawn as a dashed horizontal line across the chart.
    """
    fig = Figure(figsize=(max(7.0, 1.3 * len(entries) + 4.5), 4.8))
    ax = fig.subplots()
    x = np.arange(len(entries))
    values = [float(e["nmse_db"]) for e in entries]
    stds = [float(e.get("nmse_db_std") or 0.0) for e in entries]
    is_model = [e.get("kind", "model") == "model" for e in entries]
    colors = [_TAB10(i % 10) if m else "0.75" for i, m in enumerate(is_model)]
    bars = ax.bar(x, values, yerr=stds, color=colors, edgecolor="black", capsize=5,
                  hatch=None, error_kw={"elinewidth": 1.2})
    for bar, model in zip(bars, is_model):
        if not model:
            bar.set_hatch("//")
    for xi, value, std, entry in zip(x, values, stds, entries):
        label = f"{value:.2f}" + (f"\n±{std:.2f}" if std else "")
        n = entry.get("n_seeds")
        if n and n > 1:
            label += f"\n(n={n})"
        ax.annotate(label, (xi, value), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    styles = iter(["--", ":", "-.", (0, (5, 2, 1, 2))])
    for name, value in (reference_lines or {}).items():
        ax.axhline(value, color="black", lw=1.0, ls=next(styles, "--"), label=f"{name}: {value:.2f} dB")
    ax.set_xticks(x, [e["label"] for e in entries], rotation=20, ha="right")
    ax.set_ylabel("NMSE (dB), mean of per-sample NMSE; lower is better")
    low = min(v - s for v, s in zip(values, stds))
    ax.set_ylim(min(low * 1.15, low - 3.0), 0.0)
    ax.grid(axis="y", alpha=0.3)
    if reference_lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="reference", title_fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_nmse_curve(x: Sequence[float], series: Mapping[str, Mapping[str, Any]], path: str | Path, title: str,
                    *, xlabel: str, log_x: bool) -> str:
    """NMSE (dB) against x (the Tx-Rx distance in m on a log axis, or the pilot SNR in dB), one curve per
    estimator.

    series maps a label to a dict with `nmse_db` (one value per x), optional `nmse_db_std` (spread over seeds,
    drawn as a band) and `kind` ("model" solid with markers, "baseline" dashed grey tones).
    """
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.subplots()
    xs = np.asarray(x, dtype=float)
    model_index = 0
    baseline_styles = iter([("0.2", "--", "s"), ("0.45", ":", "^"), ("0.6", "-.", "v"), ("0.7", "--", "x"),
                            ("0.35", "-.", "d")])
    for label, s in series.items():
        values = np.asarray(s["nmse_db"], dtype=float)
        if s.get("kind", "model") == "model":
            color, ls, marker = _TAB10(model_index % 10), "-", "o"
            model_index += 1
        else:
            color, ls, marker = next(baseline_styles, ("0.5", "--", "."))
        ax.plot(xs, values, color=color, ls=ls, marker=marker, ms=4, label=label)
        std = s.get("nmse_db_std")
        if std is not None and any(v for v in std if v is not None and not math.isnan(v)):
            std = np.asarray([0.0 if v is None else v for v in std], dtype=float)
            ax.fill_between(xs, values - std, values + std, color=color, alpha=0.2, lw=0)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{d:g}" for d in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("NMSE (dB), mean of per-sample NMSE; lower is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_nmse_vs_trainable(points: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> str:
    """NMSE (dB, mean with the spread over seeds as an error bar) against the number of parameters trained for
    the target, one labelled point per arm (the Pareto view of a transfer study). points: dicts with `label`,
    `trainable_params` (0 for an unadapted model), `nmse_db`, optional `nmse_db_std`."""
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.subplots()
    for i, p in enumerate(points):
        if p.get("nmse_db") is None:
            continue
        std = p.get("nmse_db_std")
        ax.errorbar([p["trainable_params"]], [p["nmse_db"]], yerr=None if std is None else [[std], [std]],
                    fmt="o", color=_TAB10(i % 10), capsize=3, ms=5)
        ax.annotate(p["label"], (p["trainable_params"], p["nmse_db"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    # symlog: the unadapted models (0 trainable parameters) sit at 0 beside the log-spaced adapted ones
    ax.set_xscale("symlog", linthresh=100)
    ax.set_xlabel("parameters trained for the target (symlog scale)")
    ax.set_ylabel("NMSE (dB), mean over seeds; lower is better")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_gains(entries: Sequence[Mapping[str, Any]], path: str | Path, title: str,
               threshold_db: Optional[float] = None) -> str:
    """Horizontal bars of each arm's gain (dB, positive = better than the reference) with its standard error as the
    error bar, so a gain can be told from seed noise at a glance. entries: dicts with `label`, `gain_db`,
    optional `gain_se_db` and `trainable_params` (printed beside the label). threshold_db, when given, is drawn
    as a dashed line (e.g. a study's target gain)."""
    entries = [e for e in entries if e.get("gain_db") is not None]
    fig = Figure(figsize=(8.0, 0.45 * len(entries) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(entries))[::-1]
    gains = [float(e["gain_db"]) for e in entries]
    errors = [float(e.get("gain_se_db") or 0.0) for e in entries]
    colors = ["tab:green" if g - 2 * s > 0 else "tab:red" if g + 2 * s < 0 else "0.6" for g, s in zip(gains, errors)]
    ax.barh(y, gains, xerr=errors, color=colors, edgecolor="black", capsize=4)
    for yi, g, s in zip(y, gains, errors):
        ax.annotate(f"{g:+.2f} ± {s:.2f}", (g, yi), xytext=(4 if g >= 0 else -4, 0), textcoords="offset points",
                    ha="left" if g >= 0 else "right", va="center", fontsize=8)
    labels = [e["label"] + (f" ({e['trainable_params']:,} trained)" if e.get("trainable_params") else "")
              for e in entries]
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0.0, color="black", lw=0.8)
    if threshold_db is not None:
        ax.axvline(threshold_db, color="black", lw=1.0, ls="--", label=f"target {threshold_db:+g} dB")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("gain in dB (positive = better), ± standard error; green / red: more than 2 standard errors")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
