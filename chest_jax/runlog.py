"""What a run reports while it trains: `metrics.jsonl` in the run directory, an optional wandb mirror, and the
progress bar (or plain log lines with --no-progress).

metrics.jsonl is the record (one JSON object per line, non-finite numbers written as null); wandb only mirrors
it, and can never fail or block a run: a missing package, a failed start, no network or a failing `log` call
each turn into one warning and the run goes on with metrics.jsonl alone.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from chest_jax import config as config_lib


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """metrics.jsonl in the run directory, mirrored to wandb when asked (never blocking without network)."""

    def __init__(self, run_dir: Path, cfg: config_lib.Config, log: Callable[[str], None] = print):
        self.path = run_dir / "metrics.jsonl"
        self.log = log
        self.wandb_run = _start_wandb(run_dir, cfg, log) if cfg.training.use_wandb else None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        except Exception as e:  # noqa: BLE001 - wandb must never fail a run
            self.log(f"warning: wandb.log failed ({type(e).__name__}: {e}); mirroring to wandb stops, "
                     f"metrics go on in {self.path}")
            self.close()

    def close(self) -> None:
        run, self.wandb_run = self.wandb_run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as e:  # noqa: BLE001
            self.log(f"warning: wandb.finish failed ({type(e).__name__}: {e}); metrics are in {self.path}")


def _network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _start_wandb(run_dir: Path, cfg: config_lib.Config, log: Callable[[str], None]) -> Any:
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


class LogLines:
    """Stands in for the progress bar with --no-progress: a plain line per logging step, at most every_s."""

    def __init__(self, start: int, total: int, log: Callable[[str], None], every_s: float = 20.0):
        self.n, self.total, self.log, self.every_s = start, total, log, every_s
        self.t0, self.n0, self.last = time.perf_counter(), start, -float("inf")

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **kw: Any) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and self.n < self.total:
            return
        self.last = now
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        self.log(f"step {self.n}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in kw.items())
                 + f"  eta {eta / 60:.1f} min")

    def write(self, s: str) -> None:
        self.log(s)

    def close(self) -> None:
        pass


def progress(start: int, total: int, enabled: bool, log: Callable[[str], None]) -> Any:
    """A tqdm bar on stderr, or `LogLines` when the bar is off."""
    if not enabled:
        return LogLines(start, total, log)
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
