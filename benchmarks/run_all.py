"""Every benchmark, for the full-size config and the CPU preset, into one JSON file.

    python benchmarks/run_all.py [--json results/bench.json] [--quick]

For configs/base.yaml ("full", the original's model) and configs/quick/base.yaml ("preset", the CPU model):
data generation (benchmarks/data_throughput.py: full frames and pilots only, batch 32 and 256, against a NumPy
loop), the train step alone, the end-to-end train step, a short `run_training` (20 steps full, 100 preset),
inference latency at batch 1 and 32, in float32 and (the same parameters) in bfloat16
(benchmarks/train_throughput.py says how each is measured), and peak memory. The preset runs first; when two
configs share their dataset section, the data benchmark runs once.

Each measurement runs on its own: one that fails is recorded as {"error": "..."} and the others still run.
Memory is a high-water mark of the whole process (host: getrusage ru_maxrss; device: memory_stats()
peak_bytes_in_use, null on backends without it), recorded after every measurement. `--quick` shrinks frame
and model (benchmarks/_common.py QUICK_OVERRIDES), compiles with XLA's CPU optimisations lowered, and runs
everything briefly: a smoke test, not numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import data_throughput  # noqa: E402
import train_throughput as tt  # noqa: E402

from chest_jax import hostmem  # noqa: E402

# (name, config, overrides, run_training steps, time the PyTorch reference); the presets first, so that the full
# config's memory high-water mark is its own (it is the largest).
# "preset" is the original's model at the preset's sizes: the PyTorch reference beside it has the original's
# structure, and the speed figures stay comparable with earlier runs. "shipped" is the preset as configs/quick
# ships it (pilot queries, a gated correction of lmmse_pdp, whose per-sample Cholesky solve is in the step), what
# `make demo` trains; the original cannot represent it, so it has no PyTorch column. The last column: also time
# the end-to-end step data-parallel over one CPU device per core.
ORIGINAL_MODEL = ("ch_estimation.queries=learned", "ch_estimation.residual=none",
                  "ch_estimation.reference=ls_linear")
CONFIGS = (
    ("preset", "configs/quick/base.yaml", ORIGINAL_MODEL, 100, True, True),
    ("shipped", "configs/quick/base.yaml", (), 100, False, True),
    ("full", "configs/base.yaml", (), 20, True, True),
)
QUICK_RUN_STEPS = 4


def guarded(name: str, measure: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    """`measure()` with its elapsed time and the memory high-water mark after it; an exception becomes
    {"error": ...} (the traceback goes to the log) so the remaining measurements still run."""
    log(f"-- {name}")
    start = time.perf_counter()
    try:
        result = measure()
    except Exception as e:  # noqa: BLE001 - a failed measurement must not lose the others
        log(f"   {name} failed: {type(e).__name__}: {e}")
        log("".join(traceback.format_exception(e)[-3:]).rstrip())
        result = _common.error_record(e)
    result["elapsed_s"] = time.perf_counter() - start
    result["memory_after"] = _common.memory_snapshot()
    return result


def bench_config(config: str, overrides: Sequence[str], run_steps: int, *, quick: bool,
                 data_runs: dict[str, tuple[str, dict]], name: str, peak: dict[str, Any],
                 log: Callable[[str], None], pytorch: bool = True, host_devices: int = 0) -> dict[str, Any]:
    """Every measurement of one config. `data_runs` maps a dataset section (as JSON) to the config name and
    result of the data benchmark already run for it."""
    out: dict[str, Any] = {"config": config, "overrides": list(overrides)}
    try:
        cfg = tt.load_config(config, overrides, quick)
    except Exception as e:  # noqa: BLE001
        log(f"{name}: cannot load {config}: {type(e).__name__}: {e}")
        return {**out, **_common.error_record(e)}
    timing = tt.Timing.for_run(None, quick)
    out.update(batch_size=cfg.dataset.batch_size)

    dataset_key = json.dumps(cfg.to_dict()["dataset"], sort_keys=True)
    if dataset_key in data_runs:
        first_name, first_result = data_runs[dataset_key]
        out["data"] = {"same_as": first_name, **{k: first_result.get(k) for k in ("full_samples_per_s",
                                                                                   "pilots_samples_per_s")}}
    else:
        out["data"] = guarded(f"{name}: data generation", lambda: data_throughput.run(
            quick=quick, overrides=_common.section_overrides(cfg), log=lambda line: log("   " + line)), log)
        data_runs[dataset_key] = (name, out["data"])

    setup = guarded(f"{name}: setup", lambda: {"setup": tt.prepare(cfg)}, log)
    s = setup.pop("setup", None)
    out["setup"] = setup
    if s is not None:
        out["num_params"] = s.num_params
        out["train_step"] = guarded(f"{name}: train step alone", lambda: tt.bench_train_step(s, timing), log)
        out["end_to_end_step"] = guarded(f"{name}: end-to-end step", lambda: tt.bench_end_to_end_step(s, timing), log)
        if host_devices:
            out["end_to_end_step_host_devices"] = guarded(
                f"{name}: end-to-end step on {host_devices} CPU devices (data parallel, a subprocess)",
                lambda: tt.bench_end_to_end_on_host_devices(config, overrides, host_devices, steps=None,
                                                            quick=quick), log)
        for b in tt.INFER_BATCH_SIZES:
            out[f"infer_bs{b}"] = guarded(f"{name}: inference batch {b}", lambda b=b: tt.bench_inference(s, b, timing),
                                          log)
        for b in tt.INFER_BATCH_SIZES:  # the same parameters computing in bfloat16 (compare.precision)
            out[f"infer_bf16_bs{b}"] = guarded(f"{name}: inference batch {b}, bfloat16", lambda b=b: tt.bench_inference(
                s, b, timing, precision="bfloat16"), log)
        out["flops"] = guarded(f"{name}: FLOPs per sample (XLA cost analysis)", lambda: tt.flops_per_sample(s), log)
        skipped = {"skipped": "the original cannot represent this model"}
        out["pytorch"] = (guarded(f"{name}: PyTorch reference (its users' environment, a subprocess)",
                                  lambda: tt.bench_pytorch(s, timing, default_env=True), log) if pytorch else skipped)
        out["pytorch_same_env"] = (guarded(f"{name}: PyTorch reference (this process's environment)",
                                           lambda: tt.bench_pytorch(s, timing), log) if pytorch else skipped)
        del s  # the model and bank of this config are not needed by run_training, which builds its own
    else:
        for key in ("train_step", "end_to_end_step", *(f"infer_bs{b}" for b in tt.INFER_BATCH_SIZES),
                    *(f"infer_bf16_bs{b}" for b in tt.INFER_BATCH_SIZES), "flops", "pytorch", "pytorch_same_env"):
            out[key] = {"error": f"not run: the setup failed ({setup['error']})"}
    out["run_training"] = guarded(f"{name}: run_training {run_steps} steps",
                                  lambda: tt.bench_run_training(cfg, run_steps), log)
    out["memory"] = _common.memory_snapshot()

    train, e2e = out["train_step"], out["end_to_end_step"]
    infer_ms = {b: out[f"infer_bs{b}"].get("median_ms") for b in tt.INFER_BATCH_SIZES}
    infer_bf16_ms = {b: out[f"infer_bf16_bs{b}"].get("median_ms") for b in tt.INFER_BATCH_SIZES}
    parallel = (out.get("end_to_end_step_host_devices") or {}).get("samples_per_s")
    for key, reference in (("speedups", out["pytorch"]), ("speedups_same_env", out["pytorch_same_env"])):
        out[key] = tt.speedups(train.get("samples_per_s"), e2e.get("samples_per_s"), infer_ms, reference,
                               end_to_end_host_devices_samples_per_s=parallel, infer_bf16_ms=infer_bf16_ms)
    out["share_of_peak"] = tt.share_of_peak(out["flops"], train.get("samples_per_s"), infer_ms, peak)
    return out


def run(quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    machine = _common.machine_info()
    log(f"jax {machine['jax_version']} on {machine['device_count']} x {machine['device_kind']} "
        f"({machine['cpu_count']} CPUs, load {machine['load_average_1min']:.2f}){'; QUICK smoke run' if quick else ''}")
    start = time.perf_counter()
    data_runs: dict[str, tuple[str, dict]] = {}
    peak = guarded("matmul peak of this machine", lambda: tt.matmul_peak(quick), log)
    # one CPU device per core, where the benchmark runs on the CPU and there is more than one core
    host_devices = machine["cpu_count"] if machine["cpu_count"] > 1 and jax.default_backend() == "cpu" else 0
    configs = {name: bench_config(path, overrides, QUICK_RUN_STEPS if quick else steps, quick=quick,
                                  data_runs=data_runs, name=name, peak=peak, log=log, pytorch=pytorch,
                                  host_devices=host_devices if parallel else 0)
               for name, path, overrides, steps, pytorch, parallel in CONFIGS}
    report = {
        "quick": quick,
        "quick_overrides": list(_common.QUICK_OVERRIDES) if quick else [],
        "machine": machine,
        "load_average_1min_end": _common.machine_info()["load_average_1min"],
        "total_s": time.perf_counter() - start,
        "matmul_peak": peak,
        "configs": configs,
        "errors": _errors(configs),
        "note": "times are medians after compile and warm-up, blocking on each result. Memory values are process "
                "high-water marks after each measurement, in run order (preset first). Speedups divide by the "
                "PyTorch reference (tests/torch_reference.py at each config's sizes, timed in this run on the "
                "same batches): `pytorch` in a subprocess with the environment the original's users have (no "
                "huge-page malloc), `pytorch_same_env` in this process, with chest-jax's malloc settings "
                "(ratios in `speedups_same_env`). share_of_peak: XLA's FLOP count per sample x samples/s over "
                "the float32 matmul rate of this machine measured in this run.",
    }
    print_table(report, log)
    return report


def _errors(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{"config" or "config.measurement": error message} of everything that failed."""
    errors = {name: result["error"] for name, result in configs.items() if "error" in result}
    errors.update({f"{name}.{key}": value["error"] for name, result in configs.items()
                   for key, value in result.items() if isinstance(value, dict) and "error" in value})
    return errors


def print_table(report: dict[str, Any], log: Callable[[str], None] = print) -> None:
    f = _common.fmt
    names = list(report["configs"])
    get = lambda name, *path: _dig(report["configs"][name], path)  # noqa: E731
    rows = [
        ("data full frames, samples/s", ("data", "full_samples_per_s"), ".0f"),
        ("data pilots only, samples/s", ("data", "pilots_samples_per_s"), ".0f"),
        ("train step alone, samples/s", ("train_step", "samples_per_s"), ".1f"),
        ("end-to-end step, samples/s", ("end_to_end_step", "samples_per_s"), ".1f"),
        ("end-to-end, 1 CPU dev/core, s/s", ("end_to_end_step_host_devices", "samples_per_s"), ".1f"),
        ("run_training steady, samples/s", ("run_training", "samples_per_s_steady"), ".1f"),
        ("run_training wall, samples/s", ("run_training", "samples_per_s_wall"), ".1f"),
        ("inference bs1, ms", ("infer_bs1", "median_ms"), ".2f"),
        ("inference bs32, ms", ("infer_bs32", "median_ms"), ".2f"),
        ("inference bs1 bfloat16, ms", ("infer_bf16_bs1", "median_ms"), ".2f"),
        ("inference bs32 bfloat16, ms", ("infer_bf16_bs32", "median_ms"), ".2f"),
        ("compile end-to-end step, s", ("end_to_end_step", "compile_s"), ".1f"),
        ("host peak RSS, MiB", ("memory", "host_peak_rss_mb"), ".0f"),
        ("device peak, MiB", ("memory", "device_peak_bytes"), None),
        ("pytorch train step, samples/s", ("pytorch", "train", "samples_per_s"), ".1f"),
        ("pytorch inference bs1, ms", ("pytorch", "infer_bs1", "median_ms"), ".2f"),
        ("pytorch inference bs32, ms", ("pytorch", "infer_bs32", "median_ms"), ".2f"),
        ("train speedup vs pytorch", ("speedups", "train_speedup_vs_pytorch"), ".2f"),
        ("end-to-end speedup vs pytorch", ("speedups", "end_to_end_speedup_vs_pytorch"), ".2f"),
        ("e2e 1 dev/core speedup vs pytorch", ("speedups", "end_to_end_host_devices_speedup_vs_pytorch"), ".2f"),
        ("infer bs1 speedup vs pytorch", ("speedups", "infer_bs1_speedup_vs_pytorch"), ".2f"),
        ("infer bs32 speedup vs pytorch", ("speedups", "infer_bs32_speedup_vs_pytorch"), ".2f"),
        ("bf16 infer bs1 speedup vs pytorch", ("speedups", "infer_bf16_bs1_speedup_vs_pytorch"), ".2f"),
        ("bf16 infer bs32 speedup vs pytorch", ("speedups", "infer_bf16_bs32_speedup_vs_pytorch"), ".2f"),
        ("pytorch same env, train samples/s", ("pytorch_same_env", "train", "samples_per_s"), ".1f"),
        ("pytorch same env, inf bs1 ms", ("pytorch_same_env", "infer_bs1", "median_ms"), ".2f"),
        ("pytorch same env, inf bs32 ms", ("pytorch_same_env", "infer_bs32", "median_ms"), ".2f"),
        ("train speedup, same env", ("speedups_same_env", "train_speedup_vs_pytorch"), ".2f"),
        ("e2e 1 dev/core speedup, same env", ("speedups_same_env", "end_to_end_host_devices_speedup_vs_pytorch"),
         ".2f"),
        ("infer bs1 speedup, same env", ("speedups_same_env", "infer_bs1_speedup_vs_pytorch"), ".2f"),
        ("infer bs32 speedup, same env", ("speedups_same_env", "infer_bs32_speedup_vs_pytorch"), ".2f"),
        ("bf16 infer bs1 speedup, same env", ("speedups_same_env", "infer_bf16_bs1_speedup_vs_pytorch"), ".2f"),
        ("bf16 infer bs32 speedup, same env", ("speedups_same_env", "infer_bf16_bs32_speedup_vs_pytorch"), ".2f"),
        ("train step, share of f32 peak", ("share_of_peak", "train"), ".2f"),
        ("inference bs32, share of peak", ("share_of_peak", "infer_bs32"), ".2f"),
    ]
    log("")
    log(f"{'':<32}" + "".join(f"{n:>12}" for n in names))
    for label, path, spec in rows:
        cells = []
        for n in names:
            value = get(n, *path)
            if spec is None and value is not None:  # bytes -> MiB
                value = value / 2 ** 20
            cells.append(f(value, spec or ".0f"))
        log(f"{label:<32}" + "".join(f"{c:>12}" for c in cells))
    peak = report.get("matmul_peak") or {}
    if peak.get("float32_gflops"):
        log(f"matmul peak: float32 {peak['float32_gflops']:.0f} GFLOP/s, bfloat16 "
            f"{f(peak.get('bfloat16_gflops'), '.0f')} GFLOP/s ({peak.get('n')}x{peak.get('n')} under jit)")
    for where, message in report["errors"].items():
        log(f"FAILED {where}: {message}")
    log(f"total {report['total_s']:.0f} s")


def _dig(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("results/bench.json"),
                        help="where to write the report (default results/bench.json)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny frame and model, brief timings: a smoke test in well under a minute")
    args = parser.parse_args(argv)
    if args.quick:
        _common.compile_fast_for_smoke_runs()
    report = run(quick=args.quick)
    _common.write_json(args.json, report)
    print(f"wrote {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
