"""Building `Estimator_v4` models from configs and checkpoints, always strictly.

Used by training (the LoRA base), by `compare.py` and by the importer; it knows models and checkpoint files,
not training loops.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from chest_jax import checkpoint as ckpt
from chest_jax import config as config_lib
from chest_jax.lora import apply_lora, lora_leaves, params_fingerprint
from chest_jax.model import Estimator_v4, abstract_params


def compute_dtype(cfg: config_lib.Config):
    return jnp.bfloat16 if cfg.training.precision == "bfloat16" else jnp.float32


def with_precision(cfg: config_lib.Config, precision: str | None) -> config_lib.Config:
    """cfg computing in `precision` ("float32" or "bfloat16"; None: as it is). The parameters are float32 either
    way, so a model trained in one precision restores strictly into the other."""
    if precision is None or precision == cfg.training.precision:
        return cfg
    data = cfg.to_dict()
    return config_lib.from_dict({**data, "training": {**data["training"], "precision": precision}},
                                source=f"precision={precision!r}")


def new_model(cfg: config_lib.Config, key: jax.Array) -> Estimator_v4:
    """A freshly initialised plain `Estimator_v4` (LoRA leaves are added by `apply_lora`)."""
    return Estimator_v4(cfg.ch_estimation, cfg.dataset.ref_conf_dict.dmrs, rngs=nnx.Rngs(params=key),
                        compute_dtype=compute_dtype(cfg), cp_fraction=cfg.dataset.cp_fraction)


def model_params(model: nnx.Module) -> dict:
    """Every parameter (LoRA leaves included) as a pure nested dict."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model: nnx.Module, params: Any) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def abstract_base_params(cfg: config_lib.Config) -> dict:
    return abstract_params(cfg.ch_estimation, cfg.dataset.ref_conf_dict.dmrs, cp_fraction=cfg.dataset.cp_fraction)


def abstract_model_params(model: nnx.Module) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model_params(model))


def _model_differences(stored_cfg: config_lib.Config, cfg: config_lib.Config) -> list[str]:
    """Model settings of a checkpoint's stored config that `cfg` changes (dropout aside: it acts in training only)."""
    diffs = []
    for section in ("cond", "transformer"):
        a = config_lib.to_dict(getattr(stored_cfg.ch_estimation, section))
        b = config_lib.to_dict(getattr(cfg.ch_estimation, section))
        diffs += [f"ch_estimation.{section}.{k}: checkpoint {a[k]!r}, config {b[k]!r}"
                  for k in a if a[k] != b[k] and k != "dropout"]
    # The model-variant keys (residual, queries, any added later): every plain field of ch_estimation; peft is
    # checked by the adapter restore, cond and transformer above.
    for f in dataclasses.fields(stored_cfg.ch_estimation):
        if f.name in ("cond", "transformer", "peft"):
            continue
        a, b = getattr(stored_cfg.ch_estimation, f.name), getattr(cfg.ch_estimation, f.name)
        if a != b:
            diffs.append(f"ch_estimation.{f.name}: checkpoint {a!r}, config {b!r}")
    if stored_cfg.dataset.ref_conf_dict.dmrs != cfg.dataset.ref_conf_dict.dmrs:
        diffs.append(f"dataset.ref_conf_dict.dmrs: checkpoint {list(stored_cfg.dataset.ref_conf_dict.dmrs)}, "
                     f"config {list(cfg.dataset.ref_conf_dict.dmrs)}")
    return diffs


def _model_hint(diffs: list[str]) -> str:
    if not diffs:
        return ""
    return "The checkpoint was trained with a different model config:\n  " + "\n  ".join(diffs) + \
        "\nUse the checkpoint's model settings in your config, or train a new base."


def restore_base(path: str | Path, cfg: config_lib.Config, *, config_source: str, output_dir: str = "runs",
                 key: jax.Array | None = None) -> tuple[Estimator_v4, dict, Path]:
    """A plain `Estimator_v4` for `cfg`, filled strictly from a model checkpoint (base or merged)."""
    path = ckpt.resolve_model_path(path, output_dir)
    meta = ckpt.read_meta(path)
    if meta.get("kind") not in ckpt.MODEL_KINDS:
        raise ckpt.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, not a model "
                                   "(for an adapter, give BASE+ADAPTER or the LoRA run directory)")
    stored_cfg = None
    try:
        stored_cfg = ckpt.config_from_meta(meta, path)
    except Exception:  # noqa: BLE001 - a missing stored config only loses the hint
        pass
    diffs = _model_differences(stored_cfg, cfg) if stored_cfg is not None else []
    params = ckpt.restore_tree(path, abstract_base_params(cfg), hint=_model_hint(diffs),
                               expected_from=f"the model config of {config_source}")
    # Settings such as n_head, the activation or the residual variant change what the same parameters compute
    # without changing their shapes, so the strict structure check cannot catch them: refuse them here.
    if diffs:
        raise ckpt.CheckpointMismatchError(f"{path} cannot be used with the model config of {config_source}. "
                                           + _model_hint(diffs))
    model = nnx.eval_shape(lambda: new_model(cfg, jax.random.key(0)))
    set_params(model, params)
    fingerprint = params_fingerprint(params)
    if meta.get("fingerprint") and meta["fingerprint"] != fingerprint:
        raise ckpt.CheckpointError(f"checkpoint {path}: its parameters do not match the fingerprint recorded when "
                                   "it was saved; the files were modified or damaged")
    return model, meta, path


def attach_adapter(model: Estimator_v4, adapter_path: str | Path, *, base_fingerprint: str, key: jax.Array,
                   log: Callable[[str], None] = print) -> tuple[dict, config_lib.Config]:
    """Add LoRA leaves to `model` (in place) and fill them strictly from an adapter trained on this base.

    An adapter that records its base's fingerprint refuses any other base. One without (every adapter imported
    from PEFT: the original recorded none) cannot be checked: it is attached with a warning through `log`, and
    the caller is responsible for pairing it with the base it was trained on.
    """
    adapter_path = Path(adapter_path)
    meta = ckpt.read_meta(adapter_path)
    if meta.get("kind") != "adapter":
        raise ckpt.CheckpointError(f"{adapter_path} holds a '{meta.get('kind')}' checkpoint, not an adapter")
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint:
        raise ckpt.CheckpointError(
            f"adapter {adapter_path} was trained on a different base model (base fingerprint "
            f"{meta['base_fingerprint'][:12]}..., this base {base_fingerprint[:12]}...); apply it to the base it "
            f"was trained on{': ' + meta['base_path'] if meta.get('base_path') else ''}")
    if not meta.get("base_fingerprint"):
        origin = f" (imported from {meta['imported_from']})" if meta.get("imported_from") else ""
        log(f"WARNING: adapter {adapter_path}{origin} records no base fingerprint, so nothing can check that it "
            f"belongs to this base (fingerprint {base_fingerprint[:12]}...). It is attached UNVERIFIED: an adapter on "
            "the wrong base gives wrong numbers without any error. Pair it with the base it was trained on.")
    adapter_cfg = ckpt.config_from_meta(meta, adapter_path)
    apply_lora(model, adapter_cfg.ch_estimation.peft, rngs=nnx.Rngs(params=key))
    lora, _, _ = ckpt.load_adapter(adapter_path, lora_leaves(abstract_model_params(model)))
    set_params(model, config_lib.deep_merge(model_params(model), lora))
    return meta, adapter_cfg


@dataclass
class Origin:
    """What a run starts from: nothing (base training), or a base checkpoint and its fingerprint (LoRA)."""

    base_path: str | None = None
    base_fingerprint: str | None = None
    protected: tuple[Path, ...] = ()  # run directories --overwrite must never delete

    def meta(self) -> dict[str, Any]:
        return {"base_path": self.base_path, "base_fingerprint": self.base_fingerprint} if self.base_path else {}


def _lora_run_dir(cfg: config_lib.Config) -> Path:
    t = cfg.training
    run = Path(t.pretrained_model_name)
    return run if run.is_dir() else Path(t.output_dir) / t.pretrained_model_name


def build_training_model(cfg: config_lib.Config, kind: str, keys: dict[str, jax.Array],
                         log: Callable[[str], None]) -> tuple[nnx.Module, Origin]:
    """The model a training run starts from, and what identifies that start.

    kind "base": a fresh model from keys["init"], or, with training.pretrained_model_name set, that base restored
    strictly for full fine-tuning (every parameter trains; the result is a plain model recording where it
    started). kind "lora": the base at training.pretrained_model_name restored strictly, with new adapters from
    keys["lora"] (model_load_mode pretrained), or the base and adapter recorded by the LoRA run named there
    (model_load_mode finetune)."""
    t = cfg.training
    if kind == "base":
        if not t.pretrained_model_name:
            return new_model(cfg, keys["init"]), Origin()
        model, meta, path = restore_base(t.pretrained_model_name, cfg, config_source="train_base.py",
                                         output_dir=t.output_dir)
        log(f"full fine-tuning from {path} (step {meta.get('step')}, strict: every leaf matched); every parameter "
            "trains")
        return model, Origin(str(path.absolute()), params_fingerprint(model_params(model)), (path,))
    if not t.pretrained_model_name:
        raise config_lib.ConfigError("training.pretrained_model_name: train_lora.py needs the base run directory "
                                     "or checkpoint to start from (e.g. training.pretrained_model_name=runs/base)")
    source = "train_lora.py"
    if t.model_load_mode == "finetune":
        lora_run = _lora_run_dir(cfg)
        adapter = lora_run / "adapter"
        if not ckpt.is_checkpoint_dir(adapter):
            raise ckpt.CheckpointError(f"model_load_mode finetune: {lora_run} is not a LoRA run directory "
                                       "(no adapter/ inside); use model_load_mode: pretrained to start from a base")
        base_path = ckpt.read_meta(adapter).get("base_path")
        if not base_path:
            raise ckpt.CheckpointError(f"{adapter}: the adapter does not record its base model")
        model, _, path = restore_base(base_path, cfg, config_source=source, output_dir=t.output_dir)
        fp = params_fingerprint(model_params(model))
        _, adapter_cfg = attach_adapter(model, adapter, base_fingerprint=fp, key=keys["lora"], log=log)
        if adapter_cfg.ch_estimation.peft != cfg.ch_estimation.peft:
            raise config_lib.ConfigError(f"ch_estimation.peft differs from the adapter's in {adapter}: "
                                         f"{adapter_cfg.ch_estimation.peft} vs {cfg.ch_estimation.peft}")
        log(f"finetune: base {path} + adapter {adapter}")
        return model, Origin(str(path.absolute()), fp, (path, lora_run))
    model, meta, path = restore_base(t.pretrained_model_name, cfg, config_source=source,
                                             output_dir=t.output_dir)
    fp = params_fingerprint(model_params(model))
    log(f"restored base {path} (step {meta.get('step')}, strict: every leaf matched)")
    wrapped = apply_lora(model, cfg.ch_estimation.peft, rngs=nnx.Rngs(params=keys["lora"]))
    log(f"LoRA r={cfg.ch_estimation.peft.r} alpha={cfg.ch_estimation.peft.lora_alpha} on {len(wrapped)} modules")
    return model, Origin(str(path.absolute()), fp, (path,))


def check_resumed_base(origin: Origin, meta: dict, frozen: dict, run_dir: Path) -> Origin:
    """A resumed LoRA run keeps the base its checkpoint was trained on: the base now at base_path must be it."""
    recorded = meta.get("base_fingerprint")
    in_checkpoint = params_fingerprint(frozen)
    if recorded and recorded != in_checkpoint:
        raise ckpt.CheckpointDamagedError(f"{run_dir}: the base weights in the latest checkpoint do not match the "
                                          "base fingerprint it records; the checkpoint is damaged")
    if in_checkpoint != origin.base_fingerprint:
        raise ckpt.CheckpointMismatchError(
            f"--resume: the base model at {origin.base_path} has changed since {run_dir} started (fingerprint "
            f"{in_checkpoint[:12]}... in the run's checkpoint, {str(origin.base_fingerprint)[:12]}... now); the "
            "adapter belongs to the old base. Restore that base, or start a new LoRA run on the new one.")
    return Origin(meta.get("base_path") or origin.base_path, in_checkpoint, origin.protected)


def _split_spec(spec: str, output_dir: str) -> tuple[Path, Path | None]:
    """`PATH` or `BASE+ADAPTER` -> (the model checkpoint, the adapter checkpoint or None); a LoRA run directory
    given as ADAPTER stands for its adapter/."""
    base_spec, _, adapter_spec = spec.partition("+")
    base_path = ckpt.resolve_model_path(base_spec, output_dir)
    if not adapter_spec:
        return base_path, None
    adapter_path = Path(adapter_spec)
    return base_path, adapter_path / "adapter" if (adapter_path / "adapter").is_dir() else adapter_path


def load_model(spec: str, *, output_dir: str = "runs", precision: str | None = None,
               log: Callable[[str], None] = print) -> tuple[Estimator_v4, config_lib.Config, dict]:
    """A model for evaluation from `PATH` (model checkpoint, run directory or run name) or `BASE+ADAPTER`.

    The model config comes from the checkpoint itself; the restore is still strict against it. precision:
    compute in "float32" or "bfloat16" instead of the checkpoint's own `training.precision` (None: as trained).
    """
    base_path, adapter_path = _split_spec(spec, output_dir)
    cfg = with_precision(ckpt.config_from_meta(ckpt.read_meta(base_path), base_path), precision)
    model, meta, _ = restore_base(base_path, cfg, config_source=f"{base_path}/meta")
    if adapter_path is not None:
        meta, _ = attach_adapter(model, adapter_path, base_fingerprint=params_fingerprint(model_params(model)),
                                 key=jax.random.key(0), log=log)
    return model, cfg, meta


def training_datasets(spec: str, *, output_dir: str = "runs") -> list[tuple[str, config_lib.DatasetConfig]]:
    """The dataset configs a model spec (PATH or BASE+ADAPTER) was trained on: its own, its adapter's, and the
    base it was adapted from where that is recorded and still on disk, each named by where it was read."""
    paths = [p for p in _split_spec(spec, output_dir) if p is not None]
    found: list[tuple[str, config_lib.DatasetConfig]] = []
    for path in paths:
        meta = ckpt.read_meta(path)
        found.append((str(path), ckpt.config_from_meta(meta, path).dataset))
        base_path = meta.get("base_path")
        if base_path and str(base_path) not in {p for p, _ in found}:
            try:
                resolved = ckpt.resolve_model_path(base_path, output_dir)
            except ckpt.CheckpointError:
                continue  # the base was moved or deleted: its adapter's own config is still checked
            found.append((str(resolved), ckpt.config_from_meta(ckpt.read_meta(resolved), resolved).dataset))
    return found


def make_predict_fn(model: Estimator_v4) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
    """A jitted eval-mode `inputs_BxSxKx2 -> (h_est_BxKx2, eq_BxSxKx2)`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(inputs):
        return nnx.merge(graphdef, state)(jnp.asarray(inputs, jnp.float32), deterministic=True)

    return predict
