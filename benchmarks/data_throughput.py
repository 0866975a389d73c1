"""Throughput of the jitted frame generator (chest_jax/ofdm.py) against a per-sample NumPy loop.

    python benchmarks/data_throughput.py [--json PATH] [--quick] [--override dataset.key=value ...]

Measures samples/s of `make_batch_fn` for full frames and for pilots only, at batch 32 and 256, with the
default dataset config (all ten channel types, training split), and, in the same run, a naive NumPy loop
that builds one sample at a time the way the original did (sinc taps, FFT, 14-symbol grid, noise, LS) from
the same PDP sets and frame. Times exclude compilation (reported separately) and block on every batch.
Other processes on the machine slow both sides; the JSON records the load average next to the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem, ofdm  # noqa: E402

BATCH_SIZES = (32, 256)
MODES = ("full", "pilots")


def load_pdp_sets(dataset: C.DatasetConfig) -> tuple[list[Any], str]:
    """The training PDP sets of the config, or exponential stand-ins when chest_jax.channels is missing."""
    try:
        from chest_jax import channels
    except ImportError:
        return _stand_in_sets(dataset), "stand-in exponential PDPs (chest_jax.channels not importable)"
    sets = channels.load_split(dataset, "train")
    return sets, sets[0].source


def _stand_in_sets(dataset: C.DatasetConfig) -> list[Any]:
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    sets = []
    for name in dataset.channel_type:
        num_taps = rng.integers(1, 25, size=200)
        width = int(num_taps.max())
        delays = np.zeros((200, width))
        powers = np.zeros((200, width))
        for i, n in enumerate(num_taps):
            delays[i, :n] = np.sort(np.concatenate([[0.0], rng.exponential(60.0, n - 1)]))
            p = np.exp(-delays[i, :n] / 40.0)
            powers[i, :n] = p / p.sum()
        sets.append(SimpleNamespace(name=name, delays_ns=delays, powers=powers, num_taps=num_taps))
    return sets


# ---------------------------------------------------------------------------------------------
# The baseline: one sample at a time


class NumpyLoop:
    """Per-sample NumPy generation of SPEC section 1, as the original did it: returns inputs (S, K, 2) float32
    with LS at the pilots and the label H (K,) complex64."""

    def __init__(self, spec: ofdm.FrameSpec, pdp_sets: Sequence[Any], weights: Sequence[float] | None,
                 distance_range: tuple[float, float], seed: int = 0):
        self.spec = spec
        self.profiles = [[(np.asarray(s.delays_ns)[i, :n], np.asarray(s.powers)[i, :n])
                          for i, n in enumerate(np.asarray(s.num_taps))] for s in pdp_sets]
        w = np.ones(len(pdp_sets)) if weights is None else np.asarray(weights, np.float64)
        self.scenario_p = w / w.sum()
        self.distance_range = distance_range
        self.rng = np.random.default_rng(seed)
        self.pilots = ofdm.pilot_sequence(spec).astype(np.complex128)
        self.levels = (np.arange(math.isqrt(spec.mod_order)) - (math.isqrt(spec.mod_order) - 1) / 2) * np.sqrt(
            6 / (spec.mod_order - 1))
        self.n = np.arange(spec.fft_size)

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        s, rng = self.spec, self.rng
        scenario = rng.choice(len(self.profiles), p=self.scenario_p)
        delays, powers = self.profiles[scenario][rng.integers(len(self.profiles[scenario]))]
        distance = rng.uniform(*self.distance_range)
        delays = delays + rng.uniform(0, s.max_extra_delay_ns)
        keep = delays <= s.cp_ns
        delays, powers = delays[keep], powers[keep] / powers[keep].sum()
        gains = np.sqrt(powers / 2) * (rng.standard_normal(len(powers)) + 1j * rng.standard_normal(len(powers)))
        h = np.sum(gains[:, None] * np.sinc(self.n[None, :] - delays[:, None] * 1e-9 * s.sample_rate_hz), axis=0)
        h = h / np.sqrt(np.sum(np.abs(h) ** 2))
        h = h * np.sqrt(s.tx_power_mw) * s.wavelength_m / (4 * np.pi * distance)
        H = np.fft.fftshift(np.fft.fft(h) / np.sqrt(s.fft_size))[s.first_used: s.first_used + s.num_used]
        levels = rng.integers(0, len(self.levels), size=(2, s.num_symbol, s.num_used))
        x = self.levels[levels[0]] + 1j * self.levels[levels[1]]
        x[0, s.dmrs_index] = self.pilots
        w = np.sqrt(s.noise_power_mw / 2) * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape))
        y = H[None, :] * x + w
        y[0, s.dmrs_index] = y[0, s.dmrs_index] / self.pilots
        return np.stack([y.real, y.imag], axis=-1).astype(np.float32), H.astype(np.complex64)


def time_numpy_loop(loop: NumpyLoop, seconds: float, block: int = 8) -> list[float]:
    """Per-sample seconds, each the mean over a block of `block` consecutive samples."""
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        for _ in range(block):
            loop.sample()
        times.append((time.perf_counter() - t0) / block)
    return times


# ---------------------------------------------------------------------------------------------
# The jitted generator


def time_batch_fn(fn, bank: ofdm.PDPBank, distance_range: jax.Array, seconds: float, first_step: int) -> list[float]:
    """Seconds per call of a compiled batch function, blocking on each batch, fresh keys each call."""
    times = []
    step = first_step
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(jax.random.key(0), step), bank, distance_range))
        times.append(time.perf_counter() - t0)
        step += 1
    return times


def _summary(seconds_per_call: list[float], samples_per_call: int) -> dict[str, float]:
    median, best = float(np.median(seconds_per_call)), float(np.min(seconds_per_call))
    return {"calls": len(seconds_per_call), "median_ms": 1e3 * median, "best_ms": 1e3 * best,
            "samples_per_s": samples_per_call / median, "samples_per_s_best": samples_per_call / best}


def run(quick: bool = False, overrides: Sequence[str] = (), log=print) -> dict[str, Any]:
    cfg = C.load(None, list(overrides))
    dataset = cfg.dataset
    spec = ofdm.FrameSpec.from_config(dataset)
    pdp_sets, source = load_pdp_sets(dataset)
    bank = ofdm.make_bank(pdp_sets, dataset.channel_weights)
    distance_range = jnp.asarray(dataset.distance_range, jnp.float32)
    log(f"frame: N={spec.fft_size} K={spec.num_used} symbols={spec.num_symbol} pilots={spec.num_pilots}; "
        f"{len(pdp_sets)} channel types, bank {tuple(bank.delays_ns.shape)} (scenarios, profiles, taps); {source}")
    log(f"jax {jax.__version__} on {jax.devices()[0]}; load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs")

    configs = [(mode, size) for mode in MODES for size in BATCH_SIZES]
    fns, compile_s = {}, {}
    for mode, size in configs:
        fns[mode, size] = ofdm.make_batch_fn(spec, size, full=mode == "full")
        start = time.perf_counter()
        jax.block_until_ready(fns[mode, size](jax.random.key(0), bank, distance_range))
        compile_s[mode, size] = time.perf_counter() - start
        jax.block_until_ready(fns[mode, size](jax.random.key(1), bank, distance_range))  # warm-up

    # Rounds alternate between the loop and every batch function, so a burst of load from other processes
    # slows all of them rather than one.
    loop = NumpyLoop(spec, pdp_sets, dataset.channel_weights, tuple(dataset.distance_range))
    loop.sample()
    rounds, seconds = (2, 0.5) if quick else (4, 1.0)
    loop_times: list[float] = []
    jax_times: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        loop_times += time_numpy_loop(loop, seconds)
        for c in configs:
            jax_times[c] += time_batch_fn(fns[c], bank, distance_range, seconds, first_step=2 + 1000 * r)

    numpy_loop = _summary(loop_times, 1)
    loop_rate, loop_best = numpy_loop["samples_per_s"], numpy_loop["samples_per_s_best"]
    results: dict[str, Any] = {mode: {} for mode in MODES}
    for mode, size in configs:
        results[mode][str(size)] = {"batch_size": size, "compile_s": compile_s[mode, size],
                                    **_summary(jax_times[mode, size], size)}
    report: dict[str, Any] = {
        "numpy_loop_samples_per_s": loop_rate,
        "numpy_loop": numpy_loop,
        "modes": results,
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_end": os.getloadavg()[0],
        "quick": quick,
        "pdp_source": source,
        "bank_shape": list(bank.delays_ns.shape),
        "frame": {"fft_size": spec.fft_size, "num_used": spec.num_used, "num_symbol": spec.num_symbol,
                  "num_pilots": spec.num_pilots},
        "note": "samples/s from the median time per call (per 8-sample block for the loop) after compile and "
                "warm-up, measured in alternating rounds; *_best from the fastest call. Speedups are against the "
                "NumPy loop of the same run. Other processes share this machine.",
    }
    for mode in MODES:
        per_batch = {size: r["samples_per_s"] / loop_rate for size, r in results[mode].items()}
        per_batch_best = {size: r["samples_per_s_best"] / loop_best for size, r in results[mode].items()}
        report[f"{mode}_speedup"] = max(per_batch.values())
        report[f"{mode}_speedup_per_batch_size"] = per_batch
        report[f"{mode}_speedup_best"] = max(per_batch_best.values())
        report[f"{mode}_speedup_best_per_batch_size"] = per_batch_best
        report[f"{mode}_samples_per_s"] = max(r["samples_per_s"] for r in results[mode].values())

    log("")
    log(f"{'generator':<14}{'batch':>6}{'compile s':>11}{'median ms':>11}{'samples/s':>11}{'vs loop':>9}"
        f"{'best ms':>10}{'vs loop':>9}")
    log(f"{'numpy loop':<14}{1:>6}{'-':>11}{numpy_loop['median_ms']:>11.2f}{loop_rate:>11.0f}{1:>8.1f}x"
        f"{numpy_loop['best_ms']:>10.2f}{1:>8.1f}x")
    for mode in MODES:
        for size, r in results[mode].items():
            log(f"{'jax ' + mode:<14}{size:>6}{r['compile_s']:>11.2f}{r['median_ms']:>11.2f}"
                f"{r['samples_per_s']:>11.0f}{r['samples_per_s'] / loop_rate:>8.1f}x{r['best_ms']:>10.2f}"
                f"{r['samples_per_s_best'] / loop_best:>8.1f}x")
    log(f"speedup (median, best batch size): full frames {report['full_speedup']:.1f}x, "
        f"pilots only {report['pilots_speedup']:.1f}x")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement instead of 4 s")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. dataset.pdp_dir=../shared/data/pdp (repeatable)")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, overrides=args.override)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
