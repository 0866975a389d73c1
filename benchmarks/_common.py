"""Helpers shared by the benchmark scripts: timing, machine description, memory, config plumbing."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem  # noqa: E402


# A frame and model small enough to smoke-test every benchmark in seconds on a CPU: fft 512 (384 used
# subcarriers, 64 pilots), one layer with d_model 16, two channel types of 40 profiles each.
QUICK_OVERRIDES = (
    "dataset.fft_size=512", "dataset.num_guard_subcarriers=128", "dataset.ref_conf_dict.dmrs=[0, 384, 6]",
    "dataset.batch_size=8", "dataset.num_profiles=40", "dataset.channel_type=[InF_Los, RMa_Los]",
    "ch_estimation.cond.length=384", "ch_estimation.transformer.length=384", "ch_estimation.transformer.n_token=32",
    "ch_estimation.transformer.d_model=16", "ch_estimation.transformer.n_head=2",
    "ch_estimation.transformer.dim_feedforward=32", "ch_estimation.transformer.num_layers=1",
    "training.validation_size=16",
)


def compile_fast_for_smoke_runs() -> None:
    """Lower XLA's CPU optimisation so a --quick smoke run spends less of its time compiling (its numbers mean
    nothing anyway). Takes effect only if called before JAX creates its backend (the first device query)."""
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip()


def time_calls(call: Callable[[], Any], min_calls: int, min_seconds: float = 0.0) -> list[float]:
    """Seconds of each call of `call` (its result blocked on), repeated until at least `min_calls` calls and
    `min_seconds` seconds have passed. Warm up (compile) before calling this."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return times


def summarize(seconds_per_call: Sequence[float], samples_per_call: int) -> dict[str, float]:
    """Median and best of per-call times (ms) and the samples/s they give; the median is the headline."""
    median, best = float(np.median(seconds_per_call)), float(np.min(seconds_per_call))
    return {"calls": len(seconds_per_call), "median_ms": 1e3 * median, "best_ms": 1e3 * best,
            "samples_per_s": samples_per_call / median, "samples_per_s_best": samples_per_call / best}


def first_call_seconds(call: Callable[[], Any]) -> float:
    """Wall time of one blocking call: for a fresh jitted function, tracing + compilation + one execution."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t0


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (a high-water mark: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started, or None where the backend (e.g. CPU)
    keeps no such statistics."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics may raise instead of returning None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def memory_snapshot() -> dict[str, float | int | None]:
    return {"host_peak_rss_mb": host_peak_rss_mb(), "device_peak_bytes": device_peak_bytes()}


def machine_info() -> dict[str, Any]:
    import flax

    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "backend": jax.default_backend(),
        "device": str(device),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        # huge-page malloc on or off (chest_jax/hostmem.py): it moves every CPU figure, so it is recorded
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "thp_mode": hostmem.thp_mode(),
    }


def section_overrides(cfg: C.Config, sections: Sequence[str] = ("dataset", "ch_estimation")) -> list[str]:
    """`section.key=value` overrides that rebuild `sections` of `cfg` from the defaults, for functions that
    take overrides rather than a config (e.g. data_throughput.run)."""
    data = cfg.to_dict()
    # JSON is valid YAML flow syntax, so every value parses back to what it was.
    return [f"{section}.{key}={json.dumps(value)}" for section in sections for key, value in data[section].items()]


def error_record(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def run_for_json(argv: Sequence[str], env: dict[str, str], result_file: Path, what: str,
                 timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run `argv` (a benchmark script) in a fresh process with `env` and return the JSON it writes to
    `result_file`; {"error": ...} naming `what` and the last lines of its output when it fails. For what must be
    measured in another environment than this process's (malloc tunables, XLA_FLAGS read when JAX starts)."""
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return json.loads(result_file.read_text())


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or '-' for a missing/failed measurement."""
    return "-" if value is None else format(value, spec)
