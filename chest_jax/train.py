"""The one training loop behind `train_base.py` and `train_lora.py`.

The step is pure and jitted: it draws its batch on the device from `fold_in(data_key, step)`, differentiates only
the trainable tree (every parameter for base training, the LoRA leaves for transfer), and skips an update whose
loss or gradient is not finite. Dropout keys are `fold_in(dropout_key, step)`, so a resumed run needs no saved RNG
state and reproduces the uninterrupted one.

The run directory's layout and --resume / --overwrite rules are in `chest_jax.rundir`, validation in
`chest_jax.validation`, metrics.jsonl / wandb / the progress bar in `chest_jax.runlog`, devices in
`chest_jax.distributed`. What is left here is one concept, the loop, in the order a run goes through it (the
step, set-up and resume, the named steps of `_Loop`, the CLI); it is a little over 400 lines because of that.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from chest_jax import baselines, channels, distributed, losses, ofdm, plots, runlog
from chest_jax.rundir import TrainingError, prepare_run_dir
from chest_jax.validation import Validation, make_eval_fn
from chest_jax import checkpoint as ckpt
from chest_jax import config as config_lib
from chest_jax import loading
from chest_jax.errors import run_cli
from chest_jax.lora import dropout_keys, lora_leaves, merge_lora, params_fingerprint
from chest_jax.metrics import db
from chest_jax.model import param_count
from chest_jax.optim import learning_rate_schedule, make_optimizer

# Purposes of the keys split from rnd_seed: each stream is independent of the others.
_DATA, _INIT, _DROPOUT, _VALIDATION, _LORA = range(5)


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
    complete_before: bool = False  # --resume found the run already finished


# ---------------------------------------------------------------------------------------------
# Step functions


def sample_batch(step, data_key, bank, spec, batch_size, distance_range):
    """The training batch of `step` (pilots only); also the seam tests use to inject faults."""
    return ofdm.generate_batch(jax.random.fold_in(data_key, step), bank, spec, batch_size, distance_range, full=False)


def make_train_step(graphdef, tx, spec: ofdm.FrameSpec, batch_size: int, *, loss: str = "nmse",
                    loss_weight: float = 1.0, data_sharding: NamedSharding | None = None,
                    lora_dropout: bool = False) -> Callable:
    """The jitted `train_step(state, frozen, bank, distance_range, data_key, dropout_key) -> (state, metrics)`.

    `loss` names the objective (`chest_jax.losses`); `lora_dropout` gives the model's LoRA layers their own dropout
    keys (split from the step's dropout key) for the forward pass.
    """
    objective = losses.objective(loss)

    def loss_fn(trainable, frozen, batch, step_key):
        model = nnx.merge(graphdef, trainable, frozen)
        if lora_dropout:
            model_key, lora_key = jax.random.split(step_key)
            with dropout_keys(model, lora_key):
                h_est, _ = model(batch.inputs, deterministic=False, rngs=nnx.Rngs(dropout=model_key))
        else:
            h_est, _ = model(batch.inputs, deterministic=False, rngs=nnx.Rngs(dropout=step_key))
        nmse = losses.nmse_per_sample(batch.h, h_est.astype(jnp.float32))
        return loss_weight * objective(nmse), nmse

    def train_step(state: TrainState, frozen, bank, distance_range, data_key, dropout_key):
        batch = sample_batch(state.step, data_key, bank, spec, batch_size, distance_range)
        if data_sharding is not None:
            batch = batch._replace(inputs=jax.lax.with_sharding_constraint(batch.inputs, data_sharding),
                                   h=jax.lax.with_sharding_constraint(batch.h, data_sharding))
        (loss_value, nmse), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, frozen, batch, jax.random.fold_in(dropout_key, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = jax.tree.map(lambda p, u: p + u, state.trainable, updates)
        finite = jnp.isfinite(loss_value) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite),
        )
        metrics = {"loss": loss_value, "nmse": jnp.mean(nmse),
                   "mean_nmse_db": jnp.mean(10.0 * jnp.log10(jnp.maximum(nmse, 1e-30)))}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=(0,))


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly. A second Ctrl-C aborts at once.

    It spans the loop and the final save: a signal during `finish()` (final validation, checkpoint, final model)
    lets the model be written whole instead of killing the process halfway through it."""

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
# Model set-up


def _keys(cfg: config_lib.Config) -> dict[str, jax.Array]:
    root = jax.random.key(cfg.dataset.rnd_seed)
    return {name: jax.random.fold_in(root, i) for name, i in
            (("data", _DATA), ("init", _INIT), ("dropout", _DROPOUT), ("validation", _VALIDATION), ("lora", _LORA))}


# ---------------------------------------------------------------------------------------------
# The loop


class _Loop:
    """The state of one run between steps, and the named things it does: log, evaluate and save, stop, finish."""

    def __init__(self, cfg, kind, run_dir, state, frozen, graphdef, checkpoints, origin, validation, metrics_log,
                 bar, log):
        self.cfg, self.kind, self.run_dir, self.log = cfg, kind, run_dir, log
        self.state, self.frozen, self.graphdef = state, frozen, graphdef
        self.checkpoints, self.origin, self.validation = checkpoints, origin, validation
        self.metrics_log, self.bar = metrics_log, bar
        self.schedule = learning_rate_schedule(cfg.training)
        self.last_good: Path | None = None
        self.val: dict[str, float] | None = None
        self.step = int(state.step)
        self._t_last, self._step_last = time.perf_counter(), self.step

    def save_checkpoint(self) -> Path:
        path = self.checkpoints.dir / str(self.step)
        if self.step not in self.checkpoints.all_steps():
            params = (config_lib.deep_merge(self.state.trainable, self.frozen) if self.kind == "lora"
                      else self.state.trainable)
            path = self.checkpoints.save(self.step, params, self.state.opt_state, {"kind": self.kind,
                                                                                   **self.origin.meta()})
        self.last_good = path
        return path

    def log_step(self, metrics) -> None:
        t, d = self.cfg.training, self.cfg.dataset
        m = jax.device_get(metrics)
        nonfinite, first_bad = int(self.state.nonfinite), int(self.state.first_nonfinite)
        now = time.perf_counter()
        rate = (self.step - self._step_last) * d.batch_size / max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, self.step
        record = {"step": self.step, "loss": float(m["loss"]), "nmse_db": db(float(m["nmse"])),
                  "mean_nmse_db": float(m["mean_nmse_db"]), "lr": float(self.schedule(self.step - 1)),
                  "samples_per_s": rate, "skipped_steps": nonfinite}
        self.metrics_log.write(record)
        self.bar.update(self.step - self.bar.n)
        self.bar.set_postfix(nmse_db=f"{record['nmse_db']:.2f}", lr=f"{record['lr']:.2e}", samples_s=f"{rate:.0f}")
        if nonfinite and (t.nan_policy == "stop" or nonfinite > t.max_skipped_steps):
            where = (f"the last good checkpoint is {self.last_good}" if self.last_good
                     else "no checkpoint was written before it")
            why = (f"more than max_skipped_steps={t.max_skipped_steps} non-finite steps" if t.nan_policy == "skip"
                   else "a non-finite loss or gradient")
            raise TrainingError(
                f"training diverged: {why} at step {first_bad} (update skipped, parameters unchanged); {where}. "
                "Lower training.lr, check training.max_norm, or set training.nan_policy=skip to skip such steps.")

    def evaluate(self) -> None:
        t = self.cfg.training
        self.val, h_est = self.validation(self.state.trainable, self.frozen)
        self.metrics_log.write({"step": self.step, **self.val})
        self.bar.write(f"step {self.step}: {self.validation.describe(self.val)}")
        n = t.evaluation_batch_size
        plots.plot_channel_estimates(np.asarray(self.validation.mixed.h[:n]), h_est[:n, :, 0] + 1j * h_est[:n, :, 1],
                                     self.run_dir / "plots" / f"eval_{self.step:07d}.png",
                                     title=f"{t.saved_model_name} step {self.step}: val NMSE "
                                           f"{self.val['val_nmse_db']:.2f} dB")

    def evaluate_and_save(self) -> None:
        t = self.cfg.training
        if self.step % t.evaluation_step == 0:
            self.evaluate()
        self.save_checkpoint()

    def stop(self, signum: int) -> None:
        path = self.save_checkpoint()
        self.log(f"\nstopped by signal {signal.Signals(signum).name} after step {self.step}; checkpoint {path}. "
                 "Continue with --resume.")

    def run(self, step_fn, frozen, bank, distance_range, keys, end: int, stop: _StopRequest) -> bool:
        """Steps until `end`, logging, evaluating and saving on schedule; True when interrupted (a signal, or
        `end` before num_iter), with a checkpoint of the last step written."""
        t = self.cfg.training
        while self.step < end:
            self.state, metrics = step_fn(self.state, frozen, bank, distance_range, keys["data"],
                                          keys["dropout"])
            self.step += 1
            if self.step % t.logging_step == 0 or self.step == end:
                self.log_step(metrics)
            if self.step % t.evaluation_step == 0 or self.step % t.model_save_step == 0:
                self.evaluate_and_save()
            if stop.signum is not None:
                self.stop(stop.signum)
                return True
        if self.step < t.num_iter:  # ended early by stop_after
            self.save_checkpoint()
            return True
        return False

    def finish(self, n_train: int, n_total: int) -> RunResult:
        """Final validation, checkpoint, adapter (LoRA), final model and summary.json."""
        t = self.cfg.training
        if self.val is None or self.step % t.evaluation_step:
            self.evaluate()
        self.save_checkpoint()
        self.checkpoints.close()
        final_model = nnx.merge(self.graphdef, jax.device_get(self.state.trainable), jax.device_get(self.frozen))
        adapter_path = None
        if self.kind == "lora":
            adapter_path = ckpt.save_adapter(self.run_dir / "adapter", lora_leaves(loading.model_params(final_model)),
                                             self.cfg, base_fingerprint=self.origin.base_fingerprint, step=self.step,
                                             extra={"base_path": self.origin.base_path}, overwrite=True)
            merge_lora(final_model)
        final_params = loading.model_params(final_model)
        val_db = self.val["val_nmse_db"]
        final_path = ckpt.save_model(self.run_dir / "final", final_params, self.cfg,
                                     kind="merged" if self.kind == "lora" else "base", step=self.step,
                                     fingerprint=params_fingerprint(final_params),
                                     extra={"name": t.saved_model_name, "val_nmse_db": val_db,
                                            **self.origin.meta()}, overwrite=True)
        ckpt.write_json_atomic(self.run_dir / "summary.json", {
            "kind": self.kind, "steps": self.step, **self.val, "validation_references": self.validation.references,
            "final": str(final_path),
            "adapter": str(adapter_path) if adapter_path else None, "trainable_params": n_train,
            "total_params": n_total})
        self.log(f"final model: {final_path}" + (f"; adapter: {adapter_path}" if adapter_path else "")
                 + f"; {self.validation.describe(self.val)}")
        return RunResult(self.run_dir, self.step, final_path, val_db, adapter_path=adapter_path)


def _already_complete(run_dir: Path, step: int, num_iter: int, log) -> RunResult | None:
    """The result of a run that --resume finds finished (its final model written at num_iter), else None."""
    final = run_dir / "final"
    if step < num_iter or not ckpt.is_checkpoint_dir(final) or ckpt.read_meta(final).get("step") != num_iter:
        return None
    adapter = run_dir / "adapter"
    summary = ckpt.read_json(run_dir / "summary.json") or {}
    log(f"{run_dir} is complete: it reached training.num_iter={num_iter} and its final model is {final}; nothing "
        "to do. To train it longer, resume with a larger training.num_iter=...")
    return RunResult(run_dir, step, final, summary.get("val_nmse_db"), complete_before=True,
                     adapter_path=adapter if adapter.is_dir() else None)


@dataclass
class _Setup:
    """Everything a run needs before its first step."""

    graphdef: Any
    trainable: dict
    frozen: dict
    opt_state: Any
    start: int
    origin: loading.Origin
    n_train: int
    n_total: int


def _restore_resumed(cfg, kind, model, trainable_filter, opt_state, origin, checkpoints, run_dir, log):
    """(start step, trainable, frozen, opt_state, origin) from the newest readable checkpoint, or None when the
    run is already complete (then `_already_complete` has said so)."""
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    restored = checkpoints.restore_latest(loading.abstract_model_params(model), abstract(opt_state),
                                          expected_from=f"the config of {run_dir}", warn=log)
    if restored is None:
        log(f"--resume: no readable checkpoint in {run_dir}/checkpoints; starting from step 0")
        return 0, None, None, opt_state, origin
    start, params, opt_state, meta = restored
    loading.set_params(model, params)
    _, trainable_state, frozen_state = nnx.split(model, trainable_filter, ...)
    frozen = nnx.to_pure_dict(frozen_state)
    if kind == "lora":
        origin = loading.check_resumed_base(origin, meta, frozen, run_dir)
    return start, nnx.to_pure_dict(trainable_state), frozen, opt_state, origin


def _set_up(cfg, kind, tx, keys, *, resume, overwrite, log) -> tuple[_Setup | RunResult, Path, Any]:
    """The model, its trainable / frozen trees, optimizer state and start step (restored on --resume), and the
    run directory; a `RunResult` instead of a `_Setup` when --resume finds the run complete."""
    t = cfg.training
    model, origin = loading.build_training_model(cfg, kind, keys, log)
    trainable_filter = nnx.LoRAParam if kind == "lora" else nnx.Param
    graphdef, trainable_state, frozen_state = nnx.split(model, trainable_filter, ...)
    trainable, frozen = nnx.to_pure_dict(trainable_state), nnx.to_pure_dict(frozen_state)
    n_train, n_total = param_count(trainable), param_count(loading.model_params(model))
    log(f"parameters: trainable {n_train:,} / total {n_total:,} ({100 * n_train / n_total:.2f}%)"
        + (f"; frozen base {n_total - n_train:,}" if kind == "lora" else ""))
    run_dir = prepare_run_dir(cfg, resume=resume, overwrite=overwrite, protected=origin.protected, log=log)
    checkpoints = ckpt.TrainCheckpoints(run_dir, keep_period=t.model_save_step)
    opt_state, start = tx.init(trainable), 0
    if resume:
        start, new_trainable, new_frozen, opt_state, origin = _restore_resumed(
            cfg, kind, model, trainable_filter, opt_state, origin, checkpoints, run_dir, log)
        if new_trainable is not None:
            trainable, frozen = new_trainable, new_frozen
            complete = _already_complete(run_dir, start, t.num_iter, log)
            if complete is not None:
                checkpoints.close()
                return complete, run_dir, None
            log(f"resumed {run_dir} at step {start}")
    return _Setup(graphdef, trainable, frozen, opt_state, start, origin, n_train, n_total), run_dir, checkpoints


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
    distributed.maybe_initialize_distributed(log)
    mesh = distributed.make_mesh(cfg)
    replicated = NamedSharding(mesh, P())
    keys = _keys(cfg)
    spec = ofdm.FrameSpec.from_config(d)
    bank = jax.device_put(ofdm.make_bank(channels.load_split(d, "train"), d.channel_weights), replicated)
    distance_range = jax.device_put(jnp.asarray(d.distance_range, jnp.float32), replicated)
    tx = make_optimizer(t)
    setup, run_dir, checkpoints = _set_up(cfg, kind, tx, keys, resume=resume, overwrite=overwrite, log=log)
    if isinstance(setup, RunResult):
        return setup

    state = jax.device_put(TrainState(jnp.asarray(setup.start, jnp.int32), setup.trainable, setup.opt_state,
                                      jnp.asarray(0, jnp.int32), jnp.asarray(-1, jnp.int32)), replicated)
    frozen = jax.device_put(setup.frozen, replicated)
    step_fn = make_train_step(setup.graphdef, tx, spec, d.batch_size, loss=t.loss, loss_weight=t.ch_loss_weight,
                              data_sharding=NamedSharding(mesh, P("data")) if mesh.size > 1 else None,
                              lora_dropout=kind == "lora" and cfg.ch_estimation.peft.lora_dropout > 0)
    validation = Validation(cfg, spec, keys["validation"], make_eval_fn(setup.graphdef))
    metrics_log = runlog.MetricsLog(run_dir, cfg, log)
    log(f"run directory: {run_dir}  (devices: {mesh.size} x {jax.devices()[0].platform})")
    for name, record in validation.references.items():
        log(f"reference {baselines.TITLES[name]}: {validation.describe(record)}")
    end = t.num_iter if stop_after is None else min(t.num_iter, stop_after)
    loop = _Loop(cfg, kind, run_dir, state, frozen, setup.graphdef, checkpoints, setup.origin, validation,
                 metrics_log, runlog.progress(setup.start, t.num_iter, progress, log), log)
    try:
        # the mesh in context lets code inside the step see the data axis (references.box_lmmse splits its
        # per-sample loop by device under it)
        with _StopRequest() as stop, jax.set_mesh(mesh):
            if loop.run(step_fn, frozen, bank, distance_range, keys, end, stop):
                checkpoints.close()
                return RunResult(run_dir, loop.step, None, loop.val["val_nmse_db"] if loop.val else None,
                                 interrupted=True)
            result = loop.finish(setup.n_train, setup.n_total)
            if stop.signum is not None:
                log(f"signal {signal.Signals(stop.signum).name} arrived after the last step; the final model "
                    "was written whole first.")
            return result
    finally:
        loop.bar.close()
        metrics_log.close()


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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory (a larger training.num_iter extends it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = config_lib.load(args.config, args.overrides)
        run_training(cfg, kind=kind, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        return 0

    return run_cli(body, debug=args.debug)
