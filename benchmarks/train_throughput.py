"""Training and inference speed of Estimator_v4, against the original PyTorch code on the same CPU.

    python benchmarks/train_throughput.py [--json PATH] [--config configs/base.yaml] [--steps N]
                                          [--run-steps M] [--quick] [section.key=value ...]

Measures, for one config (default: the full-size configs/base.yaml, batch 32):
  data generation   the jitted pilots-only batch of one training step (`ofdm.make_batch_fn`, full=False);
  train step alone  forward + backward + optimizer on one fixed, pre-generated batch;
  end-to-end step   `train.make_train_step`, which draws its batch on the device inside the step;
  run_training      `train.run_training` for M steps in a temporary directory: wall time including model
                    setup, compilation, logging, the final validation, checkpoint and model save, and the
                    steady rate between log points after the first (which holds the compilation);
  inference         the jitted eval-mode forward (`loading.make_predict_fn`) on full 14-symbol frames at
                    batch 1 and 32; for a float32 config also with the same parameters computing in bfloat16
                    (what `compare.precision: bfloat16` runs).
Every time is per call after compilation and a warm-up call, blocking on the result; the headline is the
median of at least N calls. `--quick` shrinks the frame and model (benchmarks/_common.py QUICK_OVERRIDES) and
lowers XLA's CPU optimisations for a smoke run of some seconds: its numbers say nothing about the real model.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts the repository on sys.path)
import pytorch_reference  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from chest_jax import channels, distributed, loading, ofdm  # noqa: E402
from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem  # noqa: E402
from chest_jax.metrics import to_real_pair  # noqa: E402
from chest_jax.model import param_count  # noqa: E402
from chest_jax.optim import make_optimizer  # noqa: E402
from chest_jax.losses import nmse_per_sample as nmse_loss_terms  # noqa: E402
from chest_jax.train import TrainState, make_train_step, run_training  # noqa: E402

DEFAULT_CONFIG = _common.REPO / "configs" / "base.yaml"
INFER_BATCH_SIZES = (1, 32)


@dataclass(frozen=True)
class Timing:
    """How long to measure: at least `min_calls` timed calls and, for fast functions, `min_seconds`."""

    min_calls: int = 10
    min_seconds: float = 2.0

    @staticmethod
    def for_run(steps: int | None, quick: bool) -> "Timing":
        if quick:
            return Timing(min_calls=steps or 3, min_seconds=0.2)
        return Timing(min_calls=steps or 10, min_seconds=2.0)


@dataclass
class Setup:
    """What every measurement of one config starts from: the frame, the training PDP bank and a fresh model."""

    cfg: C.Config
    spec: ofdm.FrameSpec
    bank: ofdm.PDPBank
    distance_range: jax.Array
    model: nnx.Module
    graphdef: Any
    trainable: dict  # pure dict; the model's own arrays (copy before donating them)
    frozen: dict
    tx: optax.GradientTransformation

    @property
    def batch_size(self) -> int:
        return self.cfg.dataset.batch_size

    @property
    def num_params(self) -> int:
        return param_count(self.trainable)

    def fresh_trainable(self) -> dict:
        """A copy of the initial parameters that a donating step may consume without touching `model`."""
        return jax.tree.map(jnp.copy, self.trainable)


def prepare(cfg: C.Config) -> Setup:
    d = cfg.dataset
    spec = ofdm.FrameSpec.from_config(d)
    bank = ofdm.make_bank(channels.load_split(d, "train"), d.channel_weights)
    distance_range = jnp.asarray(d.distance_range, jnp.float32)
    model = loading.new_model(cfg, jax.random.key(0))
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    return Setup(cfg, spec, bank, distance_range, model, graphdef, nnx.to_pure_dict(trainable),
                 nnx.to_pure_dict(frozen), make_optimizer(cfg.training))


def _measure(call: Callable[[], Any], samples_per_call: int, timing: Timing) -> dict[str, float]:
    """Compile (first call), warm up (second call), then time; compile_s is the first call minus a median call."""
    first = _common.first_call_seconds(call)
    jax.block_until_ready(call())
    result = _common.summarize(_common.time_calls(call, timing.min_calls, timing.min_seconds), samples_per_call)
    result["first_call_s"] = first
    result["compile_s"] = max(first - result["median_ms"] / 1e3, 0.0)
    return result


# ---------------------------------------------------------------------------------------------
# Measurements


def bench_data(s: Setup, timing: Timing) -> dict[str, float]:
    """The pilots-only batch that one training step draws, generated on its own."""
    batch_fn = ofdm.make_batch_fn(s.spec, s.batch_size, full=False)
    calls = iter(range(1 << 30))
    return _measure(lambda: batch_fn(jax.random.key(next(calls)), s.bank, s.distance_range), s.batch_size, timing)


def make_model_only_step(graphdef, tx: optax.GradientTransformation, loss_weight: float) -> Callable:
    """`step(trainable, opt_state, frozen, inputs_BxSxKx2, h_BxK, dropout_key, step) -> (trainable, opt_state,
    loss)`: the model's forward + backward + optimizer update, as in `train.make_train_step` but on a batch
    given to it (no data generation, no non-finite guard)."""

    def loss_fn(trainable, frozen, inputs, h, key):
        h_est, _ = nnx.merge(graphdef, trainable, frozen)(inputs, deterministic=False, rngs=nnx.Rngs(dropout=key))
        return loss_weight * jnp.mean(nmse_loss_terms(h, h_est.astype(jnp.float32)))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, inputs, h, dropout_key, step):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, inputs, h, jax.random.fold_in(dropout_key, step))
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def bench_train_step(s: Setup, timing: Timing) -> dict[str, float]:
    """Forward + backward + optimizer on one fixed pilots-only batch of the config's batch size."""
    batch = ofdm.make_batch_fn(s.spec, s.batch_size, full=False)(jax.random.key(1), s.bank, s.distance_range)
    step_fn = make_model_only_step(s.graphdef, s.tx, s.cfg.training.ch_loss_weight)
    trainable = s.fresh_trainable()
    state = {"trainable": trainable, "opt_state": s.tx.init(trainable), "step": 0}
    dropout_key = jax.random.key(2)

    def call():
        state["trainable"], state["opt_state"], loss = step_fn(
            state["trainable"], state["opt_state"], s.frozen, batch.inputs, batch.h, dropout_key,
            jnp.int32(state["step"]))
        state["step"] += 1
        return loss, state["trainable"]

    return _measure(call, s.batch_size, timing)


def bench_end_to_end_step(s: Setup, timing: Timing) -> dict[str, float]:
    """`train.make_train_step` as training runs it: a fresh batch generated on the device inside every step, the
    batch sharded over the devices' data mesh when there are several (as `run_training` does; on a CPU, with
    XLA_FLAGS=--xla_force_host_platform_device_count=N)."""
    mesh = distributed.make_mesh(s.cfg)
    replicated = NamedSharding(mesh, P())
    step_fn = make_train_step(s.graphdef, s.tx, s.spec, s.batch_size, loss=s.cfg.training.loss,
                              loss_weight=s.cfg.training.ch_loss_weight,
                              data_sharding=NamedSharding(mesh, P("data")) if mesh.size > 1 else None)
    trainable = s.fresh_trainable()
    state = {"train": jax.device_put(TrainState(jnp.int32(0), trainable, s.tx.init(trainable), jnp.int32(0),
                                                jnp.int32(-1)), replicated)}
    frozen, bank, distance_range = jax.device_put((s.frozen, s.bank, s.distance_range), replicated)
    data_key, dropout_key = jax.random.key(3), jax.random.key(4)

    def call():
        state["train"], metrics = step_fn(state["train"], frozen, bank, distance_range, data_key, dropout_key)
        return metrics, state["train"]

    with jax.set_mesh(mesh):  # as run_training does
        result = _measure(call, s.batch_size, timing)
    result["devices"] = mesh.size
    skipped = int(state["train"].nonfinite)
    if skipped:
        result["skipped_nonfinite_steps"] = skipped
    return result


def bench_end_to_end_on_host_devices(config: str | Path, overrides: Sequence[str], devices: int, *, steps: int | None,
                                     quick: bool, timeout_s: float = 1800.0) -> dict[str, Any]:
    """`bench_end_to_end_step` in a fresh process with `devices` CPU devices (XLA_FLAGS=
    --xla_force_host_platform_device_count), so the step trains data-parallel over the cores; the device count
    is fixed when JAX starts, hence the subprocess. {"error": ...} when it fails."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    with tempfile.TemporaryDirectory(prefix="host_devices_") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--config", str(config), "--end-to-end-only",
                "--json", str(out), *(["--steps", str(steps)] if steps else []), *(["--quick"] if quick else []),
                *overrides]
        report = _common.run_for_json(argv, env, out, f"the {devices}-device process", timeout_s)
    result = report.get("end_to_end_step", report)
    result["xla_flags"] = env["XLA_FLAGS"]
    return result


def inference_model(s: Setup, precision: str | None = None):
    """s.model, or the same parameters computing in `precision` (what `compare.precision` does to a checkpoint)."""
    cfg = loading.with_precision(s.cfg, precision)
    if cfg is s.cfg:
        return s.model
    model = loading.new_model(cfg, jax.random.key(0))
    loading.set_params(model, loading.model_params(s.model))
    return model


def bench_inference(s: Setup, batch_size: int, timing: Timing, precision: str | None = None) -> dict[str, float]:
    """The jitted eval-mode forward on full num_symbol-symbol frames (B, 14, K, 2) of `batch_size` samples;
    precision: compute in it instead of the config's training.precision."""
    inputs = ofdm.make_batch_fn(s.spec, batch_size, full=True)(jax.random.key(5), s.bank, s.distance_range).inputs
    predict = loading.make_predict_fn(inference_model(s, precision))
    result = _measure(lambda: predict(inputs), batch_size, timing)
    result["batch_size"] = batch_size
    result["input_shape"] = list(inputs.shape)
    result["precision"] = precision or s.cfg.training.precision
    return result


def bench_pytorch(s: Setup, timing: Timing, *, default_env: bool = False) -> dict[str, Any]:
    """The PyTorch reference (benchmarks/pytorch_reference.py) at this config's sizes, on batches drawn like the
    ones chest-jax is timed on; {"error": ...} without torch. default_env: in a subprocess with the environment
    the original's users have (no huge-page malloc, `hostmem.without_huge_pages`) instead of in this process."""
    batch = ofdm.make_batch_fn(s.spec, s.batch_size, full=False)(jax.random.key(1), s.bank, s.distance_range)
    full = {b: np.asarray(ofdm.make_batch_fn(s.spec, b, full=True)(jax.random.key(5), s.bank, s.distance_range).inputs)
            for b in INFER_BATCH_SIZES}
    args = (s.cfg, np.asarray(batch.inputs), to_real_pair(np.asarray(batch.h)), full)
    kw = dict(min_calls=max(3, timing.min_calls // 2), min_seconds=timing.min_seconds)
    if default_env:
        return pytorch_reference.measure_in_subprocess(*args, env=hostmem.without_huge_pages(os.environ), **kw)
    result = pytorch_reference.measure(*args, **kw)
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    return result


def matmul_peak(quick: bool = False) -> dict[str, Any]:
    """GFLOP/s of an n x n matmul under jit in float32 and bfloat16 (float32 accumulation, as the model's
    `matmul`): the arithmetic ceiling the model's rates are set against, and whether bfloat16 is faster here."""
    n = 512 if quick else 4096
    out: dict[str, Any] = {"n": n}
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
        jax.block_until_ready(matmul(a, a))
        seconds = _common.time_calls(lambda: matmul(a, a), 3 if quick else 5)
        out[f"{jnp.dtype(dtype).name}_gflops"] = 2 * n ** 3 / float(np.median(seconds)) / 1e9
    return out


def _compiled_flops(fn: Callable, *args: Any) -> float | None:
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def flops_per_sample(s: Setup) -> dict[str, Any]:
    """XLA's own FLOP count (compiled cost analysis) of the model-only train step and of the batch-32 forward,
    per sample; what samples/s is turned into FLOP/s with."""
    batch = ofdm.make_batch_fn(s.spec, s.batch_size, full=False)(jax.random.key(1), s.bank, s.distance_range)
    step_fn = make_model_only_step(s.graphdef, s.tx, s.cfg.training.ch_loss_weight)
    trainable = s.fresh_trainable()
    train = _compiled_flops(step_fn, trainable, s.tx.init(trainable), s.frozen, batch.inputs, batch.h,
                            jax.random.key(2), jnp.int32(0))
    inputs = ofdm.make_batch_fn(s.spec, 32, full=True)(jax.random.key(5), s.bank, s.distance_range).inputs
    graphdef, state = nnx.split(s.model)
    infer = _compiled_flops(lambda st, x: nnx.merge(graphdef, st)(x)[0], state, inputs)
    return {"train_per_sample": None if train is None else train / s.batch_size,
            "infer_per_sample": None if infer is None else infer / 32}


def share_of_peak(flops: dict[str, Any], train_samples_per_s: float | None, infer_ms: dict[int, float | None],
                  peak: dict[str, Any]) -> dict[str, float | None]:
    """Achieved FLOP/s of the train step and the batch-32 forward as a fraction of the float32 matmul peak."""
    ceiling = (peak or {}).get("float32_gflops")

    def share(flops_per_sample: float | None, samples_per_s: float | None) -> float | None:
        if not ceiling or flops_per_sample is None or samples_per_s is None:
            return None
        return flops_per_sample * samples_per_s / (ceiling * 1e9)

    bs32 = infer_ms.get(32)
    return {"train": share((flops or {}).get("train_per_sample"), train_samples_per_s),
            "infer_bs32": share((flops or {}).get("infer_per_sample"), None if bs32 is None else 32e3 / bs32)}


def bench_run_training(cfg: C.Config, steps: int) -> dict[str, Any]:
    """`run_training` (base) for `steps` steps in a temporary run directory, one validation and checkpoint at
    the end. samples_per_s_steady: the median throughput of the intervals between log points after the first
    (which holds the compilation); samples_per_s_wall: steps * batch / wall time of the whole call (setup,
    compilation, logging, validation, checkpoint and final save included)."""
    if steps < 2:
        raise ValueError(f"run_training needs at least 2 steps to separate compilation from steady state, got {steps}")
    t = cfg.training
    logging_step = max(1, min(t.logging_step, steps // 5))
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chest_jax_bench_") as tmp:
        run_cfg = C.validate(cfg.replace(training=dataclasses.replace(
            t, num_iter=steps, num_warmup_steps=min(t.num_warmup_steps, steps // 2), logging_step=logging_step,
            evaluation_step=steps, model_save_step=steps, output_dir=tmp, saved_model_name="bench",
            use_wandb=False)), "benchmarks/train_throughput.py run_training")
        start = time.perf_counter()
        result = run_training(run_cfg, kind="base", overwrite=True, log=lines.append, progress=False)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    batch = cfg.dataset.batch_size
    train_records = [r for r in records if "samples_per_s" in r]
    # The first interval holds the compilation; the median also discounts the one-off host work of the first
    # log (eager ops compiled on first use) that lands in the second.
    steady_rates = [r["samples_per_s"] for r in train_records[1:]]
    return {
        "steps": steps,
        "batch_size": batch,
        "logging_step": logging_step,
        "wall_s": wall,
        "samples_per_s_wall": steps * batch / wall,
        "samples_per_s_steady": float(np.median(steady_rates)) if steady_rates else None,
        "samples_per_s_per_log_interval": [r["samples_per_s"] for r in train_records],
        "first_log_interval_s": (train_records[0]["step"] * batch / train_records[0]["samples_per_s"]
                                 if train_records else None),
        "val_nmse_db": result.val_nmse_db,
    }


# ---------------------------------------------------------------------------------------------
# The report


def speedups(train_samples_per_s: float | None, end_to_end_samples_per_s: float | None,
             infer_ms: dict[int, float | None], reference: dict[str, Any], *,
             end_to_end_host_devices_samples_per_s: float | None = None,
             infer_bf16_ms: dict[int, float | None] | None = None) -> dict[str, float | None]:
    """Ratios of our samples/s to the same-run PyTorch reference's (`bench_pytorch`); null where either is
    missing. The end-to-end step data-parallel over CPU devices (`bench_end_to_end_on_host_devices`, null when
    not measured) and inference in bfloat16 (`infer_bf16_ms`) are set against the reference's float32 train
    step and inference too."""
    def theirs(key: str) -> float | None:
        return (reference.get(key) or {}).get("samples_per_s")

    def ratio(ours: float | None, other: float | None) -> float | None:
        return None if ours is None or not other else ours / other

    rate = lambda ms, batch: None if ms is None else batch * 1e3 / ms  # noqa: E731
    return {
        "train_speedup_vs_pytorch": ratio(train_samples_per_s, theirs("train")),
        "end_to_end_speedup_vs_pytorch": ratio(end_to_end_samples_per_s, theirs("train")),
        "end_to_end_host_devices_speedup_vs_pytorch": ratio(end_to_end_host_devices_samples_per_s, theirs("train")),
        "infer_bs1_speedup_vs_pytorch": ratio(rate(infer_ms.get(1), 1), theirs("infer_bs1")),
        "infer_bs32_speedup_vs_pytorch": ratio(rate(infer_ms.get(32), 32), theirs("infer_bs32")),
        **{f"infer_bf16_bs{b}_speedup_vs_pytorch": ratio(rate((infer_bf16_ms or {}).get(b), b), theirs(f"infer_bs{b}"))
           for b in INFER_BATCH_SIZES},
    }


def load_config(config: str | Path, overrides: Sequence[str], quick: bool) -> C.Config:
    path = Path(config)
    if not path.is_file() and (_common.REPO / path).is_file():
        path = _common.REPO / path
    return C.load(path, [*(_common.QUICK_OVERRIDES if quick else ()), *overrides])


def run(config: str | Path = DEFAULT_CONFIG, overrides: Sequence[str] = (), *, steps: int | None = None,
        run_steps: int = 20, quick: bool = False, pytorch: bool = True,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of the module docstring for one config; returns the flat report (see main)."""
    cfg = load_config(config, overrides, quick)
    timing = Timing.for_run(steps, quick)
    s = prepare(cfg)
    log(f"config {config}{' (quick)' if quick else ''}: {s.num_params:,} parameters, batch {s.batch_size}, "
        f"frame K={s.spec.num_used} x {s.spec.num_symbol} symbols; jax {jax.__version__} on {jax.devices()[0]}")

    data = bench_data(s, timing)
    train = bench_train_step(s, timing)
    end_to_end = bench_end_to_end_step(s, timing)
    infer = {b: bench_inference(s, b, timing) for b in INFER_BATCH_SIZES}
    # the same parameters computing in bfloat16 (compare.precision: bfloat16), where the config is float32
    infer_bf16 = ({b: bench_inference(s, b, timing, precision="bfloat16") for b in INFER_BATCH_SIZES}
                  if cfg.training.precision == "float32" else {})
    infer_bf16_ms = {b: r["median_ms"] for b, r in infer_bf16.items()}
    training_run = bench_run_training(cfg, run_steps) if run_steps else None
    skipped = {"error": "not measured (--no-pytorch)"}
    reference = bench_pytorch(s, timing, default_env=True) if pytorch else skipped
    reference_same_env = bench_pytorch(s, timing) if pytorch else skipped
    try:
        flops = flops_per_sample(s)
    except Exception as e:  # noqa: BLE001 - a backend without cost analysis loses only this figure
        flops = _common.error_record(e)

    report: dict[str, Any] = {
        "train_samples_per_s": train["samples_per_s"],
        "end_to_end_samples_per_s": end_to_end["samples_per_s"],
        "run_training_samples_per_s": training_run["samples_per_s_steady"] if training_run else None,
        "infer_bs1_ms": infer[1]["median_ms"],
        "infer_bs32_ms": infer[32]["median_ms"],
        **{f"infer_bf16_bs{b}_ms": infer_bf16_ms.get(b) for b in INFER_BATCH_SIZES},
        "data_ms_per_batch": data["median_ms"],
        "flops": flops,
        # Generating the step's batch on its own, as a fraction of the whole end-to-end step.
        "data_share_of_step": data["median_ms"] / end_to_end["median_ms"],
        "compile_s": end_to_end["compile_s"],
        "compile_s_by_function": {"data": data["compile_s"], "train_step": train["compile_s"],
                                  "end_to_end_step": end_to_end["compile_s"],
                                  **{f"infer_bs{b}": r["compile_s"] for b, r in infer.items()}},
        "reference": reference,
        **speedups(train["samples_per_s"], end_to_end["samples_per_s"], {b: r["median_ms"] for b, r in infer.items()},
                   reference, infer_bf16_ms=infer_bf16_ms),
        "reference_same_env": reference_same_env,
        "speedups_same_env": speedups(train["samples_per_s"], end_to_end["samples_per_s"],
                                      {b: r["median_ms"] for b, r in infer.items()}, reference_same_env,
                                      infer_bf16_ms=infer_bf16_ms),
        "config": str(config),
        "overrides": list(overrides),
        "quick": quick,
        "batch_size": s.batch_size,
        "num_params": s.num_params,
        "details": {"data": data, "train_step": train, "end_to_end_step": end_to_end,
                    "inference": {str(b): r for b, r in infer.items()},
                    "inference_bf16": {str(b): r for b, r in infer_bf16.items()}, "run_training": training_run},
        "memory": _common.memory_snapshot(),
        "machine": _common.machine_info(),
        "note": "times are medians over calls after compile and warm-up, blocking on each result; samples/s = "
                "batch / median time. train = model-only step on a fixed batch; end_to_end = make_train_step "
                "(batch generated inside). Speedups divide by the PyTorch reference (tests/torch_reference.py at "
                "this config's sizes) timed in the same run on the same batches: `reference` in a subprocess with "
                "the environment the original's users have (no huge-page malloc), `reference_same_env` in this "
                "process (the malloc settings chest-jax runs with), its ratios in `speedups_same_env`.",
    }
    report["jax_version"] = report["machine"]["jax_version"]
    report["device_kind"] = report["machine"]["device_kind"]
    report["device_count"] = report["machine"]["device_count"]
    print_table(report, log)
    return report


def _reference_rate(reference: dict[str, Any], key: str) -> float | None:
    return (reference.get(key) or {}).get("samples_per_s")


def print_table(report: dict[str, Any], log: Callable[[str], None] = print) -> None:
    f = _common.fmt
    ref = report["reference"]
    details = report["details"]
    rows = [
        ("train step (model only)", report["train_samples_per_s"], details["train_step"]["median_ms"],
         _reference_rate(ref, "train"), report["train_speedup_vs_pytorch"]),
        ("end-to-end step", report["end_to_end_samples_per_s"], details["end_to_end_step"]["median_ms"],
         _reference_rate(ref, "train"), report["end_to_end_speedup_vs_pytorch"]),
        ("run_training (steady)", report["run_training_samples_per_s"], None, None, None),
        ("inference bs1", 1e3 / report["infer_bs1_ms"], report["infer_bs1_ms"],
         _reference_rate(ref, "infer_bs1"), report["infer_bs1_speedup_vs_pytorch"]),
        ("inference bs32", 32e3 / report["infer_bs32_ms"], report["infer_bs32_ms"],
         _reference_rate(ref, "infer_bs32"), report["infer_bs32_speedup_vs_pytorch"]),
        *((f"inference bs{b}, bfloat16", b * 1e3 / report[f"infer_bf16_bs{b}_ms"], report[f"infer_bf16_bs{b}_ms"],
           _reference_rate(ref, f"infer_bs{b}"), report[f"infer_bf16_bs{b}_speedup_vs_pytorch"])
          for b in INFER_BATCH_SIZES if report.get(f"infer_bf16_bs{b}_ms")),
    ]
    log("")
    log(f"{'measurement':<26}{'samples/s':>11}{'ms/call':>10}{'pytorch/s':>10}{'speedup':>9}")
    for name, rate, ms, theirs, speedup in rows:
        log(f"{name:<26}{f(rate, '.1f'):>11}{f(ms, '.2f'):>10}{f(theirs, '.1f'):>10}"
            f"{f(speedup, '.2f') + ('x' if speedup is not None else ''):>9}")
    log(f"data generation {report['data_ms_per_batch']:.2f} ms per batch of {report['batch_size']} = "
        f"{100 * report['data_share_of_step']:.0f}% of an end-to-end step; compile {report['compile_s']:.1f} s")
    log("pytorch: the reference in its users' default environment (no huge-page malloc)")
    same = {k: v for k, v in (report.get("speedups_same_env") or {}).items() if v is not None}
    if same:
        log("speedups against the reference in this process's environment (same malloc settings): " + ", ".join(
            f"{k.replace('_speedup_vs_pytorch', '')} {f(v, '.2f')}x" for k, v in same.items()))
    for name, r in (("pytorch reference", ref), ("pytorch reference (same environment)",
                                                  report.get("reference_same_env") or {})):
        if "error" in r:
            log(f"{name}: {r['error']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: section.key=value, e.g. dataset.batch_size=64")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this path")
    parser.add_argument("--config", default="configs/base.yaml", help="YAML config (default configs/base.yaml)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="timed calls per measurement, at least (default 10; 3 with --quick)")
    parser.add_argument("--run-steps", type=int, default=None, metavar="M",
                        help="steps of the run_training measurement; 0 skips it (default 20; 4 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny frame and model (smoke test in seconds; the numbers mean nothing)")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the same-run PyTorch reference")
    parser.add_argument("--end-to-end-only", action="store_true",
                        help="measure the end-to-end step alone (what run_all runs on several CPU devices)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    if args.quick:
        _common.compile_fast_for_smoke_runs()
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1 timed call")
    run_steps = args.run_steps if args.run_steps is not None else (4 if args.quick else 20)
    if run_steps == 1 or run_steps < 0:
        parser.error(f"--run-steps {run_steps}: give 0 (skip) or at least 2 steps")
    try:
        if args.end_to_end_only:
            cfg = load_config(args.config, args.overrides, args.quick)
            result = bench_end_to_end_step(prepare(cfg), Timing.for_run(args.steps, args.quick))
            print(f"end-to-end step on {result['devices']} device(s): {result['samples_per_s']:.1f} samples/s")
            report = {"end_to_end_step": result, "machine": _common.machine_info()}
        else:
            report = run(args.config, args.overrides, steps=args.steps, run_steps=run_steps, quick=args.quick,
                         pytorch=not args.no_pytorch)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        _common.write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
