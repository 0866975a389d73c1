"""The one training loop behind `train_base.py` and `train_lora.py`.

The step is pure and jitted: it draws its batch on the device from `fold_in(data_key, step)`, differentiates only
the trainable tree (every parameter for base training, the LoRA leaves for transfer), and skips an update whose
loss or gradient is not finite. Dropout keys are `fold_in(dropout_key, step)`, so a resumed run needs no saved RNG
state and reproduces the uninterrupted one.

Run directory (`training.output_dir/training.saved_model_name/`):
  config.yaml       the resolved config            metrics.jsonl   one JSON line per log / evaluation
  checkpoints/<s>/  latest + every model_save_step  plots/eval_<step>.png
  final/            the trained model (for LoRA runs: the merged model)
  adapter/          LoRA runs only: the adapter (LoRA leaves, PEFT config, base fingerprint)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from chest_jax import channels, ofdm, plots
from chest_jax import checkpoint as ckpt
from chest_jax import config as config_lib
from chest_jax import loading
from chest_jax.lora import apply_lora, merge_lora, params_fingerprint
from chest_jax.model import param_count
from chest_jax.optim import learning_rate_schedule, make_optimizer

# Purposes of the keys split from rnd_seed: each stream is independent of the others.
_DATA, _INIT, _DROPOUT, _VALIDATION, _LORA = range(5)


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on; the message says what and how."""


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied or skipped so far
    trainable: Any  # pure dict of the trained leaves
    opt_state: Any
    nonfinite: jax.Array  # int32: steps skipped because the loss or a gradient was not finite
    first_nonfinite: jax.Array  # int32: the first such step, -1 if none


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    final_path: Path | None
    val_nmse_db: float | None
    interrupted: bool = False
    adapter_path: Path | None = None


# ---------------------------------------------------------------------------------------------
# Step functions


def nmse_loss_terms(h_true_BxK: jax.Array, h_est_BxKx2: jax.Array) -> jax.Array:
    """Per-sample NMSE sum|H - H_est|^2 / sum|H|^2 (linear), differentiable; `evaluate.nmse_per_sample` is the
    same definition in float64 NumPy for reporting."""
    err = jnp.sum((h_est_BxKx2[..., 0] - h_true_BxK.real) ** 2 + (h_est_BxKx2[..., 1] - h_true_BxK.imag) ** 2, -1)
    return err / jnp.maximum(jnp.sum(jnp.abs(h_true_BxK) ** 2, -1), np.finfo(np.float32).tiny)


def sample_batch(step, data_key, bank, spec, batch_size, distance_range):
    """The training batch of `step` (pilots only); also the seam tests use to inject faults."""
    return ofdm.generate_batch(jax.random.fold_in(data_key, step), bank, spec, batch_size, distance_range, full=False)


def make_train_step(graphdef, tx, spec: ofdm.FrameSpec, batch_size: int, loss_weight: float,
                    data_sharding: NamedSharding | None = None) -> Callable:
    def loss_fn(trainable, frozen, batch, dropout_key):
        model = nnx.merge(graphdef, trainable, frozen)
        h_est, _ = model(batch.inputs, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
        nmse = nmse_loss_terms(batch.h, h_est.astype(jnp.float32))
        return loss_weight * jnp.mean(nmse), nmse

    def train_step(state: TrainState, frozen, bank, distance_range, data_key, dropout_key):
        batch = sample_batch(state.step, data_key, bank, spec, batch_size, distance_range)
        if data_sharding is not None:
            batch = batch._replace(inputs=jax.lax.with_sharding_constraint(batch.inputs, data_sharding),
                                   h=jax.lax.with_sharding_constraint(batch.h, data_sharding))
        (loss, nmse), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, frozen, batch, jax.random.fold_in(dropout_key, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = jax.tree.map(lambda p, u: p + u, state.trainable, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite),
        )
        metrics = {"loss": loss, "nmse": jnp.mean(nmse)}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_fn(graphdef) -> Callable:
    @jax.jit
    def eval_nmse(trainable, frozen, inputs, h):
        h_est, _ = nnx.merge(graphdef, trainable, frozen)(inputs, deterministic=True)
        return nmse_loss_terms(h, h_est.astype(jnp.float32)), h_est

    return eval_nmse


# ---------------------------------------------------------------------------------------------
# Run directory, logging


def prepare_run_dir(cfg: config_lib.Config, *, resume: bool, overwrite: bool, log=print) -> Path:
    run_dir = Path(cfg.training.output_dir) / cfg.training.saved_model_name
    holds_run = run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.yaml", "checkpoints", "final"))
    if resume:
        if not holds_run:
            raise TrainingError(f"--resume: {run_dir} holds no run to resume; start it without --resume")
        stored = config_lib.load(run_dir / "config.yaml")
        if stored != cfg:
            diffs = _config_diffs(stored.to_dict(), cfg.to_dict())
            raise TrainingError(
                f"--resume: the config differs from the one {run_dir} was started with:\n  " + "\n  ".join(diffs)
                + "\nResume with the run's own config (" + str(run_dir / "config.yaml") + "), or start a new run "
                "under another training.saved_model_name.")
        return run_dir
    if holds_run:
        if not overwrite:
            steps = ckpt.TrainCheckpoints(run_dir).all_steps()
            at = f" (checkpoints up to step {steps[-1]})" if steps else ""
            raise TrainingError(
                f"{run_dir} already holds a run{at}. Continue it with --resume, pick another "
                f"training.saved_model_name=..., or pass --overwrite to replace it.")
        log(f"--overwrite: removing the previous run in {run_dir}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")
    return run_dir


def _config_diffs(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diffs(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: run {a!r}, now {b!r}"]


class MetricsLog:
    """metrics.jsonl in the run directory, mirrored to wandb when asked (never blocking without network)."""

    def __init__(self, run_dir: Path, cfg: config_lib.Config, log=print):
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        t = cfg.training
        if t.use_wandb:
            self.wandb_run = _start_wandb(run_dir, cfg, log)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _start_wandb(run_dir: Path, cfg: config_lib.Config, log) -> Any:
    try:
        import wandb
    except ImportError:
        log("warning: use_wandb is set but wandb is not installed; logging to metrics.jsonl only")
        return None
    mode = os.environ.get("WANDB_MODE", cfg.training.wandb_mode)
    if mode == "online" and not _network_reachable():
        log("wandb: no network to api.wandb.ai; logging offline instead. Sync later with "
            f"`wandb sync {run_dir / 'wandb'}/offline-run-*`")
        mode = "offline"
    try:
        run = wandb.init(project=cfg.training.wandb_proj, name=cfg.training.saved_model_name, dir=str(run_dir),
                         config=cfg.to_dict(), mode=mode, settings=wandb.Settings(init_timeout=30))
    except Exception as e:  # noqa: BLE001 - wandb must never fail a run
        log(f"warning: wandb could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")
        return None
    if mode == "offline":
        log(f"wandb: offline run in {run_dir / 'wandb'}; upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    return run


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# Devices


def make_mesh(cfg: config_lib.Config) -> jax.sharding.Mesh:
    devices = jax.devices() if cfg.training.device == "auto" else jax.devices(cfg.training.device)
    n = len(devices)
    if cfg.dataset.batch_size % n:
        raise config_lib.ConfigError(
            f"dataset.batch_size: {cfg.dataset.batch_size} is not divisible by the {n} devices it is sharded over; "
            f"use a multiple of {n}")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def maybe_initialize_distributed(log=print) -> None:
    """Multi-host runs: call jax.distributed.initialize once per process when the environment names a cluster.

    JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) for any launcher; Slurm and Open MPI with more
    than one task are detected by JAX itself.
    """
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1
             or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not multi or jax.distributed.is_initialized():
        return
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices")


# ---------------------------------------------------------------------------------------------
# The loop


def _keys(cfg: config_lib.Config) -> dict[str, jax.Array]:
    root = jax.random.key(cfg.dataset.rnd_seed)
    return {name: jax.random.fold_in(root, i) for name, i in
            (("data", _DATA), ("init", _INIT), ("dropout", _DROPOUT), ("validation", _VALIDATION), ("lora", _LORA))}


def _build_model(cfg: config_lib.Config, kind: str, keys, log) -> tuple[nnx.Module, dict]:
    """The model to train and what identifies its start (for LoRA: the base checkpoint and fingerprint)."""
    if kind == "base":
        return loading.new_model(cfg, keys["init"]), {}
    t = cfg.training
    if not t.pretrained_model_name:
        raise config_lib.ConfigError("training.pretrained_model_name: train_lora.py needs the base run directory "
                                     "or checkpoint to start from (e.g. training.pretrained_model_name=runs/base)")
    source = "train_lora.py"
    if t.model_load_mode == "finetune":
        lora_run = Path(t.pretrained_model_name)
        if not lora_run.is_dir():
            lora_run = Path(t.output_dir) / t.pretrained_model_name
        adapter = lora_run / "adapter"
        if not ckpt.is_checkpoint_dir(adapter):
            raise ckpt.CheckpointError(f"model_load_mode finetune: {lora_run} is not a LoRA run directory "
                                       "(no adapter/ inside); use model_load_mode: pretrained to start from a base")
        base_path = ckpt.read_meta(adapter).get("base_path")
        if not base_path:
            raise ckpt.CheckpointError(f"{adapter}: the adapter does not record its base model")
        model, meta, path = loading.restore_base(base_path, cfg, config_source=source, output_dir=t.output_dir)
        fp = params_fingerprint(loading.model_params(model))
        adapter_meta, adapter_cfg = loading.attach_adapter(model, adapter, base_fingerprint=fp, key=keys["lora"])
        if adapter_cfg.ch_estimation.peft != cfg.ch_estimation.peft:
            raise config_lib.ConfigError(f"ch_estimation.peft differs from the adapter's in {adapter}: "
                                         f"{adapter_cfg.ch_estimation.peft} vs {cfg.ch_estimation.peft}")
        log(f"finetune: base {path} + adapter {adapter}")
        return model, {"base_path": str(path.absolute()), "base_fingerprint": fp}
    model, meta, path = loading.restore_base(t.pretrained_model_name, cfg, config_source=source,
                                             output_dir=t.output_dir)
    fp = params_fingerprint(loading.model_params(model))
    log(f"restored base {path} (step {meta.get('step')}, strict: every leaf matched)")
    wrapped = apply_lora(model, cfg.ch_estimation.peft, rngs=nnx.Rngs(params=keys["lora"]))
    log(f"LoRA r={cfg.ch_estimation.peft.r} alpha={cfg.ch_estimation.peft.lora_alpha} on {len(wrapped)} modules")
    return model, {"base_path": str(path.absolute()), "base_fingerprint": fp}


def run_training(cfg: config_lib.Config, *, kind: str, resume: bool = False, overwrite: bool = False,
                 stop_after: int | None = None, log: Callable[[str], None] = print,
                 progress: bool = True) -> RunResult:
    """Train `kind` ('base' or 'lora') per `cfg`. `stop_after` ends the run early at that step (with a checkpoint),
    as a pre-emption would."""
    assert kind in ("base", "lora")
    if kind == "lora" and cfg.ch_estimation.peft is None:
        raise config_lib.ConfigError("ch_estimation.peft: train_lora.py needs a LoRA section "
                                     "(r, lora_alpha, lora_dropout, target_modules)")
    t, d = cfg.training, cfg.dataset
    maybe_initialize_distributed(log)
    mesh = make_mesh(cfg)
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data")) if mesh.size > 1 else None
    keys = _keys(cfg)

    spec = ofdm.FrameSpec.from_config(d)
    train_sets = channels.load_split(d, "train")
    bank = jax.device_put(ofdm.make_bank(train_sets, d.channel_weights), replicated)
    distance_range = jax.device_put(jnp.asarray(d.distance_range, jnp.float32), replicated)

    model, origin = _build_model(cfg, kind, keys, log)
    trainable_filter = nnx.LoRAParam if kind == "lora" else nnx.Param
    graphdef, trainable_state, frozen_state = nnx.split(model, trainable_filter, ...)
    trainable = nnx.to_pure_dict(trainable_state)
    frozen = nnx.to_pure_dict(frozen_state)
    n_train = param_count(trainable)
    n_total = param_count(loading.model_params(model))
    n_base = n_total - (n_train if kind == "lora" else 0)
    log(f"parameters: trainable {n_train:,} / total {n_total:,} ({100 * n_train / n_total:.2f}%)"
        + (f"; frozen base {n_base:,}" if kind == "lora" else ""))

    tx = make_optimizer(t)
    schedule = learning_rate_schedule(t)
    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite, log=log)
    checkpoints = ckpt.TrainCheckpoints(run_dir, keep_period=t.model_save_step)
    opt_state = tx.init(trainable)
    start = 0
    if resume:
        abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
        full_abstract = loading.abstract_model_params(model)
        restored = checkpoints.restore_latest(full_abstract, abstract(opt_state),
                                              expected_from=f"the config of {run_dir}", warn=log)
        if restored is None:
            log(f"--resume: no readable checkpoint in {run_dir}/checkpoints; starting from step 0")
        else:
            start, params, opt_state, _ = restored
            loading.set_params(model, params)
            _, trainable_state, frozen_state = nnx.split(model, trainable_filter, ...)
            trainable, frozen = nnx.to_pure_dict(trainable_state), nnx.to_pure_dict(frozen_state)
            log(f"resumed {run_dir} at step {start}")

    state = TrainState(jnp.asarray(start, jnp.int32), trainable, opt_state, jnp.asarray(0, jnp.int32),
                       jnp.asarray(-1, jnp.int32))
    state = jax.device_put(state, replicated)
    frozen = jax.device_put(frozen, replicated)
    step_fn = make_train_step(graphdef, tx, spec, d.batch_size, t.ch_loss_weight, data_sharding)
    eval_fn = make_eval_fn(graphdef)
    val_sets = channels.load_split(d, "val")
    val_bank = ofdm.make_bank(val_sets, d.channel_weights)
    val = ofdm.make_batch_fn(spec, t.validation_size)(keys["validation"], val_bank, distance_range)

    def validate() -> tuple[float, Any]:
        nmse_parts, h_est_first = [], None
        for lo in range(0, t.validation_size, d.batch_size):
            chunk_nmse, h_est = eval_fn(state.trainable, frozen, val.inputs[lo:lo + d.batch_size],
                                        val.h[lo:lo + d.batch_size])
            nmse_parts.append(np.asarray(chunk_nmse))
            if h_est_first is None:
                h_est_first = np.asarray(h_est)
        return float(10 * np.log10(np.mean(np.concatenate(nmse_parts)))), h_est_first

    saved: dict[int, Path] = {}

    def save_checkpoint(step: int) -> Path:
        if step not in saved:
            params = config_lib.deep_merge(state.trainable, frozen) if kind == "lora" else state.trainable
            saved[step] = checkpoints.save(step, params, state.opt_state, {"kind": kind, **origin})
        return saved[step]

    metrics_log = MetricsLog(run_dir, cfg, log)
    log(f"run directory: {run_dir}  (devices: {mesh.size} x {jax.devices()[0].platform})")
    end = t.num_iter if stop_after is None else min(t.num_iter, stop_after)
    last_good: Path | None = None
    val_db: float | None = None
    interrupted = False
    bar = _progress(start, t.num_iter, progress, log)
    t_last, step_last = time.perf_counter(), start
    try:
        with _StopRequest() as stop:
            step = start
            while step < end:
                state, metrics = step_fn(state, frozen, bank, distance_range, keys["data"], keys["dropout"])
                step += 1
                if step % t.logging_step == 0 or step == end:
                    m = jax.device_get(metrics)
                    nonfinite, first_bad = int(state.nonfinite), int(state.first_nonfinite)
                    now = time.perf_counter()
                    rate = (step - step_last) * d.batch_size / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    record = {"step": step, "loss": float(m["loss"]), "nmse_db": _db(float(m["nmse"])),
                              "lr": float(schedule(step - 1)), "samples_per_s": rate, "skipped_steps": nonfinite}
                    metrics_log.write(record)
                    bar.update(step - bar.n)
                    bar.set_postfix(nmse_db=f"{record['nmse_db']:.2f}", lr=f"{record['lr']:.2e}",
                                    samples_s=f"{rate:.0f}")
                    if nonfinite and (t.nan_policy == "stop" or nonfinite > t.max_skipped_steps):
                        where = f"the last good checkpoint is {last_good}" if last_good else \
                            "no checkpoint was written before it"
                        why = (f"more than max_skipped_steps={t.max_skipped_steps} non-finite steps"
                               if t.nan_policy == "skip" else "a non-finite loss or gradient")
                        raise TrainingError(
                            f"training diverged: {why} at step {first_bad} (update skipped, parameters unchanged); "
                            f"{where}. Lower training.lr, check training.max_norm, or set training.nan_policy=skip "
                            "to skip such steps.")
                if step % t.evaluation_step == 0 or step % t.model_save_step == 0:
                    if step % t.evaluation_step == 0:
                        val_db, h_est = validate()
                        metrics_log.write({"step": step, "val_nmse_db": val_db})
                        bar.write(f"step {step}: validation NMSE {val_db:.2f} dB")
                        plots.plot_channel_estimates(
                            np.asarray(val.h[:t.evaluation_batch_size]),
                            h_est[:t.evaluation_batch_size, :, 0] + 1j * h_est[:t.evaluation_batch_size, :, 1],
                            run_dir / "plots" / f"eval_{step:07d}.png",
                            title=f"{t.saved_model_name} step {step}: val NMSE {val_db:.2f} dB")
                    last_good = save_checkpoint(step)
                if stop.signum is not None:
                    last_good = save_checkpoint(step)
                    log(f"\nstopped by signal {signal.Signals(stop.signum).name} after step {step}; checkpoint "
                        f"{last_good}. Continue with --resume.")
                    interrupted = True
                    break
            else:
                if stop_after is not None and step < t.num_iter:
                    last_good = save_checkpoint(step)
                    interrupted = True
    except BaseException:
        metrics_log.close()
        raise
    finally:
        bar.close()
    if interrupted:
        metrics_log.close()
        checkpoints.close()
        return RunResult(run_dir, step, None, val_db, interrupted=True)

    if step % t.evaluation_step:
        val_db, _ = validate()
        metrics_log.write({"step": step, "val_nmse_db": val_db})
    save_checkpoint(step)
    checkpoints.close()
    final_model = nnx.merge(graphdef, jax.device_get(state.trainable), jax.device_get(frozen))
    adapter_path = None
    if kind == "lora":
        lora_params = loading.lora_subtree(loading.model_params(final_model))
        adapter_path = ckpt.save_adapter(run_dir / "adapter", lora_params, cfg,
                                         base_fingerprint=origin.get("base_fingerprint"), step=step,
                                         extra={"base_path": origin.get("base_path")}, overwrite=True)
        merge_lora(final_model)
    final_params = loading.model_params(final_model)
    final_path = ckpt.save_model(run_dir / "final", final_params, cfg, kind="merged" if kind == "lora" else "base",
                                 step=step, fingerprint=params_fingerprint(final_params),
                                 extra={"name": t.saved_model_name, "val_nmse_db": val_db, **origin}, overwrite=True)
    ckpt.write_json_atomic(run_dir / "summary.json", {
        "kind": kind, "steps": step, "val_nmse_db": val_db, "final": str(final_path),
        "adapter": str(adapter_path) if adapter_path else None, "trainable_params": n_train, "total_params": n_total})
    log(f"final model: {final_path}" + (f"; adapter: {adapter_path}" if adapter_path else "")
        + (f"; validation NMSE {val_db:.2f} dB" if val_db is not None else ""))
    metrics_log.close()
    return RunResult(run_dir, step, final_path, val_db, adapter_path=adapter_path)


def _db(x: float) -> float:
    return 10 * math.log10(x) if x > 0 and math.isfinite(x) else float("nan")


class _LogLines:
    """Stands in for the progress bar with --no-progress: a plain line per logging step."""

    def __init__(self, start: int, total: int, log, every_s: float = 20.0):
        self.n, self.total, self.log, self.every_s = start, total, log, every_s
        self.t0, self.n0, self.last = time.perf_counter(), start, -float("inf")

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        now = time.perf_counter()
        if now - self.last < self.every_s and self.n < self.total:
            return
        self.last = now
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        self.log(f"step {self.n}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in kw.items())
                 + f"  eta {eta / 60:.1f} min")

    def write(self, s):
        self.log(s)

    def close(self):
        pass


def _progress(start: int, total: int, enabled: bool, log):
    if not enabled:
        return _LogLines(start, total, log)
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


def cli(kind: str, argv: list[str] | None = None) -> int:
    """Shared argument handling of train_base.py / train_lora.py; returns the exit code."""
    import argparse

    default_cfg = "configs/base.yaml" if kind == "base" else "configs/lora_inf.yaml"
    parser = argparse.ArgumentParser(
        prog=f"train_{kind}.py",
        description=("Train the Estimator_v4 base model from scratch." if kind == "base" else
                     "LoRA transfer from a base model (strict restore; only LoRA leaves train)."),
        epilog="Overrides: section.key=value, e.g. training.lr=3e-4 dataset.batch_size=64")
    parser.add_argument("--config", default=default_cfg, help=f"YAML config (default {default_cfg})")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        run_training(cfg, kind=kind, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (config_lib.ConfigError, ckpt.CheckpointError, channels.PDPError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

