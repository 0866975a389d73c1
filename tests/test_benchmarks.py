"""The speed benchmarks' PyTorch reference: timed in its users' default environment (a subprocess without the
huge-page malloc that chest-jax's scripts run with) as well as in the benchmark's own process."""
import os
import sys

import numpy as np
import pytest

from chest_jax import config as C
from chest_jax import hostmem, ofdm
from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "benchmarks"))

import pytorch_reference  # noqa: E402


def test_reference_in_a_subprocess_runs_in_the_environment_given():
    pytest.importorskip("torch")
    cfg = C.load(None, TINY)
    spec = ofdm.FrameSpec.from_config(cfg.dataset)
    k, b = spec.num_used, cfg.dataset.batch_size
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((b, 1, k, 2)).astype(np.float32)
    h = rng.standard_normal((b, k, 2)).astype(np.float32)
    full = {1: rng.standard_normal((1, spec.num_symbol, k, 2)).astype(np.float32)}
    env = hostmem.without_huge_pages({**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    result = pytorch_reference.measure_in_subprocess(cfg, inputs, h, full, env=env, min_calls=1, min_seconds=0.0)
    assert "error" not in result, result
    assert result["glibc_tunables"] == env.get("GLIBC_TUNABLES")  # what the child process saw: no hugetlb
    assert "hugetlb" not in (result["glibc_tunables"] or "")
    assert result["train"]["samples_per_s"] > 0 and result["infer_bs1"]["median_ms"] > 0


def test_reference_subprocess_failure_is_reported_not_raised():
    pytest.importorskip("torch")
    cfg = C.load(None, TINY)
    bad = np.zeros((1, 1, 3, 2), np.float32)  # 3 subcarriers where the model takes 384: the child process fails
    result = pytorch_reference.measure_in_subprocess(cfg, bad, bad[:, 0], {}, env=dict(os.environ), min_calls=1,
                                                     min_seconds=0.0)
    assert set(result) == {"error"} and "the reference's process failed (exit 1)" in result["error"]


def test_readme_table_puts_each_run_and_its_ratios_in_one_cell():
    import readme_table

    def report(train, ratio, bf16_ms):
        full = {"train_step": {"samples_per_s": train}, "infer_bf16_bs1": {"median_ms": bf16_ms},
                "speedups": {"train_speedup_vs_pytorch": ratio, "infer_bf16_bs1_speedup_vs_pytorch": 2.0},
                "speedups_same_env": {"train_speedup_vs_pytorch": ratio / 2, "infer_bf16_bs1_speedup_vs_pytorch": 1.5},
                "pytorch": {"train": {"samples_per_s": 5.0}, "infer_bs1": {"median_ms": 16.0},
                            "infer_bs32": {"median_ms": 500.0}},
                "pytorch_same_env": {"train": {"samples_per_s": 6.0}, "infer_bs1": {"median_ms": 14.0},
                                     "infer_bs32": {"median_ms": 450.0}}}
        return {"configs": {"full": full}, "matmul_peak": {"float32_gflops": 180.0}}

    text = readme_table.table([report(20.0, 4.0, 7.0), report(18.0, 3.6, None)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["train step alone, batch 32"].endswith("| - / - | - / - | 20.0 (4.00x; 2.00x) / 18.0 (3.60x; 1.80x) |")
    # a run without the figure shows "-", its ratios left out
    assert "| 7.00 (2.00x; 1.50x) / - |" in rows["inference, batch 1, bfloat16 (`compare.precision`), ms"]
    assert "PyTorch reference, full: train 5.0 / 5.0, inference bs1 ms 16.00 / 16.00" in text
    assert "180 / 180 GFLOP/s" in text
