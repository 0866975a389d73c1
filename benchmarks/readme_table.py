"""The README's benchmark table from `run_all.py` JSON reports, each cell "run 1 / run 2 / ...".

    python benchmarks/readme_table.py results/bench.json results/speed/bench_run2.json

Rates in samples/s unless marked; in brackets the ratio against the PyTorch reference as its users run it, then
against the reference in the benchmark's own environment (`speedups`, `speedups_same_env` of each config).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

# (row label, path into a config's report, number format, speedup key or None, scale)
ROWS = (
    ("train step alone, batch 32", ("train_step", "samples_per_s"), ".1f", "train", 1),
    ("train step with on-device data generation", ("end_to_end_step", "samples_per_s"), ".1f", "end_to_end", 1),
    ("the same, data-parallel over the 2 cores (2 CPU devices)", ("end_to_end_step_host_devices", "samples_per_s"),
     ".1f", "end_to_end_host_devices", 1),
    ("`run_training`, steady (logging, no eval)", ("run_training", "samples_per_s_steady"), ".1f", None, 1),
    ("inference, batch 1 (14-symbol frame), ms", ("infer_bs1", "median_ms"), ".2f", "infer_bs1", 1),
    ("inference, batch 1, bfloat16 (`compare.precision`), ms", ("infer_bf16_bs1", "median_ms"), ".2f",
     "infer_bf16_bs1", 1),
    ("inference, batch 32, ms", ("infer_bs32", "median_ms"), ".1f", "infer_bs32", 1),
    ("inference, batch 32, bfloat16, ms", ("infer_bf16_bs32", "median_ms"), ".1f", "infer_bf16_bs32", 1),
    ("XLA GFLOP per sample, train", ("flops", "train_per_sample"), ".2f", None, 1e-9),
    ("XLA GFLOP per sample, inference", ("flops", "infer_per_sample"), ".2f", None, 1e-9),
    ("share of the f32 matmul rate, train step", ("share_of_peak", "train"), ".2f", None, 1),
    ("share of the f32 matmul rate, inference bs32", ("share_of_peak", "infer_bs32"), ".2f", None, 1),
    ("compile of the end-to-end step, s", ("end_to_end_step", "compile_s"), ".1f", None, 1),
    ("host peak RSS, GiB", ("memory", "host_peak_rss_mb"), ".1f", None, 1 / 1024),
)
CONFIGS = (("preset", "CPU preset (original model)"), ("shipped", "shipped preset"), ("full", "full config"))
# the PyTorch reference's own figures, per config it runs for: (label, measurement, field, format)
REFERENCE = (("train", "train", "samples_per_s", ".1f"), ("inference bs1 ms", "infer_bs1", "median_ms", ".2f"),
             ("bs32 ms", "infer_bs32", "median_ms", ".1f"))


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _cell(runs: Sequence[dict], config: str, path: Sequence[str], fmt: str, speedup: str | None,
          scale: float) -> str:
    parts = []
    for report in runs:
        c = report["configs"].get(config, {})
        value = _get(c, *path)
        text = "-" if value is None else format(value * scale, fmt)
        ratios = [_get(c, which, f"{speedup}_speedup_vs_pytorch") for which in ("speedups", "speedups_same_env")]
        if speedup and value is not None and all(r is not None for r in ratios):
            text += f" ({ratios[0]:.2f}x; {ratios[1]:.2f}x)"
        parts.append(text)
    return " / ".join(parts)


def _reference(runs: Sequence[dict]) -> list[str]:
    """One line per config with a reference: its train rate and inference times, users' env; same env."""
    lines = []
    for config, _ in CONFIGS:
        if _get(runs[0]["configs"].get(config, {}), "pytorch", "train") is None:
            continue
        envs = []
        for env in ("pytorch", "pytorch_same_env"):
            envs.append(", ".join(
                f"{label} " + " / ".join(format(_get(r["configs"][config], env, key, field), fmt) for r in runs)
                for label, key, field, fmt in REFERENCE))
        lines.append(f"{config}: {envs[0]} (same env: {envs[1]})")
    return lines


def table(runs: Sequence[dict]) -> str:
    header = "| " + " / ".join(f"run {i + 1}" for i in range(len(runs))) + " | " + " | ".join(
        name for _, name in CONFIGS) + " |"
    lines = [header, "|---" * (len(CONFIGS) + 1) + "|"]
    for label, path, fmt, speedup, scale in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(runs, c, path, fmt, speedup, scale) for c, _ in CONFIGS)
                     + " |")
    lines.append("")
    lines += [f"PyTorch reference, {line}" for line in _reference(runs)]
    peaks = " / ".join(format(_get(r, "matmul_peak", "float32_gflops") or float("nan"), ".0f") for r in runs)
    lines.append(f"float32 matmul rate of the machine: {peaks} GFLOP/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="run_all.py JSON files, in column order")
    args = parser.parse_args(argv)
    print(table([json.loads(p.read_text()) for p in args.reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
