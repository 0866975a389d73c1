"""What the study scripts (quality.py, transfer.py) share: train a run or reuse it when it already finished with
the same config, and summarise numbers over seeds."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import _common  # noqa: F401  (puts the repository on sys.path)
from chest_jax import checkpoint as ckpt
from chest_jax import config as C
from chest_jax.train import run_training


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parser.parse_args with the section.key=value overrides taken out first, wherever they stand: list options
    (--seeds 0 1 2) would otherwise swallow the overrides that follow them. They land in `args.overrides`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not _OVERRIDE.match(a)])
    args.overrides = [*getattr(args, "overrides", []), *overrides]
    return args


def train_or_reuse(cfg: C.Config, kind: str, log: Callable[[str], None]) -> tuple[Path, float | None]:
    """The run directory of `cfg` (training.output_dir / saved_model_name), trained with `kind` unless a finished
    run with the same dataset, model and training sections is there (training.output_dir and saved_model_name
    aside; an interrupted one is resumed); and the training wall time in seconds (summary.json's wall_s)."""
    t = cfg.training
    run_dir = Path(t.output_dir) / t.saved_model_name
    if (run_dir / "final").is_dir():
        stored = ckpt.config_from_meta(ckpt.read_meta(run_dir / "final"), run_dir / "final")
        # Where a run lives and what it is called are not part of its recipe: a run directory moved or renamed
        # (e.g. a quality run that became a scaling budget) is still the same run.
        same_place = dict(output_dir=t.output_dir, saved_model_name=t.saved_model_name)
        if stored.replace(compare=cfg.compare, training=dataclasses.replace(stored.training, **same_place)) != cfg:
            raise SystemExit(f"{run_dir} was trained with another config than this study asks for; delete it or "
                             "choose another --runs directory")
        log(f"{t.saved_model_name}: reusing the finished run in {run_dir}")
        return run_dir, json.loads((run_dir / "summary.json").read_text()).get("wall_s")
    log(f"{t.saved_model_name}: training {kind} ({t.num_iter} steps)")
    start = time.perf_counter()
    # A run killed before its first checkpoint has left only its config.yaml: resuming it starts from step 0
    # (after checking that the config is this one), where a fresh start would refuse the occupied directory.
    result = run_training(cfg, kind=kind, resume=(run_dir / "config.yaml").is_file(),
                          log=lambda line: log("  " + line), progress=False)
    if result.interrupted:
        raise SystemExit(f"{t.saved_model_name} was interrupted at step {result.final_step}; run the same command "
                         "again to resume")
    wall = time.perf_counter() - start
    summary_path = run_dir / "summary.json"
    summary_path.write_text(json.dumps({**json.loads(summary_path.read_text()), "wall_s": wall}, indent=1))
    return run_dir, wall


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof 1), standard error and count of the non-missing values."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()) if arr.size else None, "std": std,
            "se": None if std is None else std / np.sqrt(arr.size), "n": int(arr.size)}
