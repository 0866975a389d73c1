"""The run directory of a training run: created, replaced (--overwrite, never over the model a run starts from),
or checked for --resume, where the one config change allowed is a larger training.num_iter (an extension).

Layout (`training.output_dir/training.saved_model_name/`):
  config.yaml       the resolved config            metrics.jsonl   one JSON line per log / evaluation
  checkpoints/<s>/  latest + every model_save_step  plots/eval_<step>.png
  final/            the trained model (for LoRA runs: the merged model)
  adapter/          LoRA runs only: the adapter (LoRA leaves, PEFT config, base fingerprint)
  summary.json      steps, final validation figures, trainable / total parameters
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from chest_jax import checkpoint as ckpt
from chest_jax import config as config_lib
from chest_jax.errors import UserError
from chest_jax.optim import learning_rate_schedule


class TrainingError(UserError, RuntimeError):
    """Training stopped for a reason the user must act on; the message says what and how."""


def _is_within(path: str | Path, directory: Path) -> bool:
    path, directory = Path(path).resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _config_diffs(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _config_diffs(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [(prefix, a, b)]


def _check_resume_config(cfg: config_lib.Config, run_dir: Path, log) -> None:
    """A resumed run keeps its config; the one difference allowed is a larger training.num_iter (an extension)."""
    stored = config_lib.load(run_dir / "config.yaml")
    diffs = _config_diffs(stored.to_dict(), cfg.to_dict())
    others = [d for d in diffs if d[0] != "training.num_iter"]
    if others:
        raise TrainingError(
            f"--resume: the config differs from the one {run_dir} was started with:\n  "
            + "\n  ".join(f"{k}: run {a!r}, now {b!r}" for k, a, b in others)
            + "\nResume with the run's own config (" + str(run_dir / "config.yaml") + ") and at most a larger "
            "training.num_iter, or start a new run under another training.saved_model_name.")
    if not diffs:
        return
    old, new = stored.training.num_iter, cfg.training.num_iter
    if new < old:
        raise TrainingError(f"--resume: training.num_iter={new} is below the run's {old}; a run can be extended, "
                            f"not shortened (its schedule and checkpoints were made for num_iter={old})")
    steps = ckpt.TrainCheckpoints(run_dir).all_steps()
    at = steps[-1] if steps else 0
    lr_old, lr_new = float(learning_rate_schedule(stored.training)(at)), float(learning_rate_schedule(cfg.training)(at))
    how = (f"the warmup + cosine schedule is recomputed over the new length: the learning rate at step {at} goes "
           f"from {lr_old:.3g} to {lr_new:.3g} and decays to 0 at step {new}" if cfg.training.use_scheduler
           else "the learning rate is constant")
    log(f"--resume: extending training.num_iter from {old} to {new}; {how}")
    config_lib.dump(cfg, run_dir / "config.yaml")


def prepare_run_dir(cfg: config_lib.Config, *, resume: bool, overwrite: bool, protected: tuple[Path, ...] = (),
                    log=print) -> Path:
    """The run directory, ready: checked (and extended) for --resume, or new (an old run replaced only with
    --overwrite, and never when it holds `protected` paths, such as the base a LoRA run was restored from)."""
    run_dir = Path(cfg.training.output_dir) / cfg.training.saved_model_name
    holds_run = run_dir.is_dir() and any((run_dir / n).exists() for n in ("config.yaml", "checkpoints", "final"))
    if resume:
        if not holds_run:
            raise TrainingError(f"--resume: {run_dir} holds no run to resume; start it without --resume")
        _check_resume_config(cfg, run_dir, log)
        return run_dir
    if holds_run:
        if not overwrite:
            steps = ckpt.TrainCheckpoints(run_dir).all_steps()
            at = f" (checkpoints up to step {steps[-1]})" if steps else ""
            raise TrainingError(
                f"{run_dir} already holds a run{at}. Continue it with --resume, pick another "
                f"training.saved_model_name=..., or pass --overwrite to replace it.")
        inside = [str(p) for p in protected if _is_within(p, run_dir)]
        if inside:
            raise TrainingError(
                f"--overwrite would delete {run_dir}, which holds {inside[0]}, the model this run starts from; "
                "nothing was deleted. Give this run its own training.saved_model_name=...")
        log(f"--overwrite: removing the previous run in {run_dir}")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, run_dir / "config.yaml")
    return run_dir
