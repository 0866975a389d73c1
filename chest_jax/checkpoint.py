"""Orbax checkpoints with a strict structure check.

Three kinds of checkpoint directory, each one atomic Orbax save holding the items `params` (a pure dict of arrays)
and `meta` (JSON: kind, step, the resolved config, the base fingerprint):

- a model (`kind: base` or `merged`): a plain `Estimator_v4` parameter tree, e.g. `runs/<name>/final/`;
- an adapter (`kind: adapter`): the LoRA leaves only, plus their PEFT config and the fingerprint of the base they
  were trained on, e.g. `runs/<name>/adapter/`;
- a training checkpoint (`runs/<name>/checkpoints/<step>/`): `params`, `opt_state` and `meta`, managed by
  `TrainCheckpoints`.

Restoring always builds the expected tree first and compares it with the stored metadata: every missing,
unexpected or mis-shaped (or mis-typed) leaf is listed in one `CheckpointError`, before any array is read.
Orbax alone reports only the first mismatch and casts dtypes silently (see JAX_NOTES.md section 3).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from chest_jax import config as config_lib
from chest_jax import trees
from chest_jax.errors import UserError

FORMAT_VERSION = 1
MODEL_KINDS = ("base", "merged")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match what the config expects."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but holds another tree (missing, unexpected or mis-shaped leaves): the config
    or the model changed. Never repaired silently."""


class CheckpointDamagedError(CheckpointError):
    """The checkpoint's files cannot be read (truncated, corrupt or half-written): a damaged save, which
    `TrainCheckpoints.restore_latest` sets aside to fall back to an older one."""


# ---------------------------------------------------------------------------------------------
# Tree comparison


def leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flatten a pytree (arrays, ShapeDtypeStructs or Orbax ArrayMetadata) to {'a/b/0/kernel': (shape, dtype)}."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    for path, leaf in leaves[0]:
        if leaf is None:
            continue
        out[trees.path_str(path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def structure_problems(found: Mapping[str, tuple], expected: Mapping[str, tuple]) -> list[str]:
    problems = []
    for path in sorted(set(expected) - set(found)):
        problems.append(f"missing     {path}: expected {_fmt(expected[path])}")
    for path in sorted(set(found) - set(expected)):
        problems.append(f"unexpected  {path}: found {_fmt(found[path])}")
    for path in sorted(set(found) & set(expected)):
        if found[path] != expected[path]:
            problems.append(f"mismatched  {path}: expected {_fmt(expected[path])}, found {_fmt(found[path])}")
    return problems


def _fmt(spec: tuple) -> str:
    shape, dtype = spec
    return f"{shape} {dtype}"


def check_structure(found_tree: Any, expected_tree: Any, *, checkpoint: str | Path, expected_from: str,
                    hint: str = "") -> None:
    problems = structure_problems(leaf_specs(found_tree), leaf_specs(expected_tree))
    if problems:
        lines = "\n  ".join(problems)
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} does not match the parameter tree that {expected_from} expects "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}); nothing was loaded:\n  {lines}"
            + (f"\n{hint}" if hint else "")
        )


# ---------------------------------------------------------------------------------------------
# Model and adapter directories


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
        meta=ocp.JsonCheckpointHandler()))


def _to_numpy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def save_tree(path: str | Path, params: Any, meta: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Atomically save {params, meta} to `path` (Orbax writes a temporary directory and renames it)."""
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"{path} already exists; choose another destination or remove it first")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, **meta}
    _checkpointer().save(path, ocp.args.Composite(params=ocp.args.StandardSave(_to_numpy_tree(params)),
                                                  meta=ocp.args.JsonSave(dict(meta))))
    return path


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params").is_dir() and (path / "meta").exists()


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not is_checkpoint_dir(path):
        raise CheckpointError(f"{path} is not a chest-jax checkpoint (no params/ and meta items inside)")
    try:
        return _checkpointer().restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
        raise CheckpointDamagedError(f"checkpoint {path} is unreadable (meta item): {e}") from None


def stored_tree(path: str | Path, item: str = "params") -> Any:
    """The stored metadata tree (shapes and dtypes, no arrays read) of one item."""
    try:
        md = _checkpointer().metadata(Path(path)).item_metadata[item]
    except Exception as e:  # noqa: BLE001
        raise CheckpointDamagedError(f"checkpoint {path} is unreadable ({item} metadata): {e}") from None
    if md is None:
        raise CheckpointDamagedError(f"checkpoint {path} has no '{item}' item")
    return md.tree


def restore_tree(path: str | Path, abstract: Any, *, expected_from: str, item: str = "params",
                 hint: str = "") -> Any:
    """Strictly restore one item into the structure of `abstract` (pytree of ShapeDtypeStruct)."""
    path = Path(path).absolute()
    check_structure(stored_tree(path, item), abstract, checkpoint=path, expected_from=expected_from, hint=hint)
    try:
        restored = _checkpointer().restore(path, ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
    except Exception as e:  # noqa: BLE001 - truncated/corrupt array files
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: reading '{item}' failed: {e}") from None
    tree = restored[item]
    bad = [p for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if not hasattr(x, "dtype")]
    if bad:
        raise CheckpointDamagedError(f"checkpoint {path}: leaves came back unmaterialized: {bad[:5]}")
    return tree


def resolve_model_path(name: str | Path, output_dir: str | Path = "runs") -> Path:
    """A model checkpoint, a run directory (its `final/`), or a run name under output_dir."""
    candidates = [Path(name)]
    if not Path(name).is_absolute():
        candidates.append(Path(output_dir) / name)
    for cand in candidates:
        if is_checkpoint_dir(cand):
            return cand
        if (cand / "final").is_dir() and is_checkpoint_dir(cand / "final"):
            return cand / "final"
        if (cand / "checkpoints").is_dir():
            steps = TrainCheckpoints(cand).all_steps()
            latest = f"; its latest training checkpoint is {cand / 'checkpoints' / str(steps[-1])}" if steps else ""
            raise CheckpointError(f"run {cand} has no final model (the run did not finish){latest}. "
                                  "Finish it with --resume, or point at that checkpoint directly.")
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"no model checkpoint found at {tried}; give a run directory (holding final/), "
                          "a checkpoint directory, or a run name under training.output_dir")


def config_from_meta(meta: Mapping[str, Any], where: str | Path) -> config_lib.Config:
    try:
        return config_lib.from_dict(meta["config"], f"config stored in {where}")
    except KeyError:
        raise CheckpointError(f"{where}: meta has no config") from None


def save_model(path: str | Path, params: Any, cfg: config_lib.Config, *, kind: str, step: int,
               fingerprint: str, extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    assert kind in MODEL_KINDS
    meta = {"kind": kind, "step": int(step), "fingerprint": fingerprint, "config": cfg.to_dict(), **(extra or {})}
    return save_tree(path, params, meta, overwrite=overwrite)


def save_adapter(path: str | Path, lora_params: Any, cfg: config_lib.Config, *, base_fingerprint: str | None,
                 step: int, extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    if cfg.ch_estimation.peft is None:
        raise CheckpointError("save_adapter needs a config with ch_estimation.peft")
    meta = {"kind": "adapter", "step": int(step), "base_fingerprint": base_fingerprint,
            "peft": config_lib.to_dict(cfg.ch_estimation.peft), "config": cfg.to_dict(), **(extra or {})}
    return save_tree(path, lora_params, meta, overwrite=overwrite)


def load_adapter(path: str | Path, abstract_lora: Any | None = None) -> tuple[Any, config_lib.Config, dict]:
    """Load an adapter; `abstract_lora` (the LoRA leaves the target model expects) makes it strict."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") != "adapter":
        raise CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, not an adapter")
    cfg = config_from_meta(meta, path)
    if abstract_lora is None:
        abstract_lora = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored_tree(path),
                                     is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        abstract_lora = trees.int_keys(abstract_lora)
    lora = restore_tree(path, abstract_lora, expected_from=f"the adapter's model config ({path}/meta)")
    return lora, cfg, meta


# ---------------------------------------------------------------------------------------------
# Training checkpoints


class TrainCheckpoints:
    """`run_dir/checkpoints/<step>/`: the latest kept every evaluation_step, every model_save_step kept for good."""

    def __init__(self, run_dir: str | Path, *, keep_period: int | None = None):
        self.dir = (Path(run_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, keep_period=keep_period, create=True,
                                               cleanup_tmp_directories=True, enable_async_checkpointing=False)
        self._manager: ocp.CheckpointManager | None = None
        self._options = options

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(self.dir, options=self._options,
                                                  item_names=("params", "opt_state", "meta"))
        return self._manager

    def all_steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit() and p.is_dir())

    def save(self, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any]) -> Path:
        meta = {"format_version": FORMAT_VERSION, "step": int(step), **meta}
        self.manager.save(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(_to_numpy_tree(params)),
            opt_state=ocp.args.StandardSave(_to_numpy_tree(opt_state)),
            meta=ocp.args.JsonSave(dict(meta))), force=True)
        self.manager.wait_until_finished()
        return self.dir / str(step)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any, *, expected_from: str,
                       warn=print) -> tuple[int, Any, Any, dict] | None:
        """Restore the newest readable checkpoint; damaged ones are reported and skipped. None if there is none.

        A structure mismatch is not "damage": it means the config changed, and stops with its error.
        """
        for step in reversed(self.all_steps()):
            path = self.dir / str(step)
            try:
                meta = read_meta(path)
                params = restore_tree(path, abstract_params, expected_from=expected_from)
                opt_state = restore_tree(path, abstract_opt_state, expected_from=f"the optimizer of {expected_from}",
                                         item="opt_state")
            except CheckpointDamagedError as e:
                kept = self.dir.parent / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                kept.parent.mkdir(exist_ok=True)
                shutil.move(str(path), str(kept))
                warn(f"warning: checkpoint step {step} is unreadable and was skipped (moved to {kept}): "
                     f"{str(e).splitlines()[0]}")
                self.close()
                continue
            return step, params, opt_state, meta
        return None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (summary files are informational)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
