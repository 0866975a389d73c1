"""Exact import and export of models and adapters from and to the PyTorch original.

Two formats of the original are understood:

- its model state dict (`torch.save(model.state_dict(), "model.pt")`, or the same tensors in a `.safetensors`
  file): keys `ch_tf._embedding`, `ch_tf._layers.N.mha_q_proj.weight`, ..., plus the positional-encoding
  buffers `ch_tf._layers.N.pe` / `cond_pe`. Both the v4 `Estimator_v4` and the base v1 `Estimator` (no
  `mha_*_proj` layers) are read; v1 is lifted into v4 exactly by identity `mha_*_proj` (SPEC.md section 3).
- its LoRA adapter, a Hugging Face PEFT directory (`adapter_config.json` + `adapter_model.safetensors`).

Layouts: a PyTorch Linear weight is (out, in) and a Flax kernel (in, out), so every weight is transposed, and so
are the attention's `q/k/v_proj_weight`. PEFT stores lora_A (r, in) and lora_B (out, r); chest-jax stores
lora_A (in, r) and lora_B (r, out). Every conversion is strict: each tensor must be used, each parameter
filled, each shape right, or one `InteropError` lists every problem and nothing is returned.

Command line (`python -m chest_jax.interop --help`):
  python -m chest_jax.interop model.pt runs/imported/final --config configs/base.yaml
  python -m chest_jax.interop peft_adapter_dir runs/imported_adapter
  python -m chest_jax.interop runs/lora/adapter peft_out_dir --export-peft
  python -m chest_jax.interop runs/base/final model.safetensors --export-torch
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from chest_jax import config as config_lib
from chest_jax import model as model_lib
from chest_jax.config import LORA_TARGETS, ChEstimationConfig, PeftConfig

STATE_DICT_PREFIX = "ch_tf."
PEFT_KEY_PREFIX = "base_model.model."
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_ADAPTER_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became its default
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

QUERY_PROJECTIONS = ("mha_q_proj", "mha_k_proj", "mha_v_proj")
_TRANSPOSED_LEAVES = ("kernel", "q_proj_weight", "k_proj_weight", "v_proj_weight")

# Modules that can carry LoRA, as their path inside a layer, and the PEFT target name that selects them.
LORA_MODULES: dict[tuple[str, ...], str] = {
    ("mha_q_proj",): "mha_q_proj",
    ("mha_k_proj",): "mha_k_proj",
    ("mha_v_proj",): "mha_v_proj",
    ("mha", "out_proj"): "out_proj",
    ("cond_mha", "out_proj"): "out_proj",
    ("ffnn_linear1",): "ffnn_linear1",
    ("ffnn_linear2",): "ffnn_linear2",
}
LORA_LEAVES = ("lora_A", "lora_B")

WHOLE_MODEL_FIX = 'torch.save(torch.load("model.pt", weights_only=False).state_dict(), "model_state.pt")'

ParamPath = tuple  # a path in a pure dict, e.g. ("ch_tf", "_layers", 0, "mha", "q_proj_weight")


class InteropError(ValueError):
    """A file cannot be imported or exported as asked; the message names the file, what is wrong and the fix."""


# ---------------------------------------------------------------------------------------------
# Pure-dict helpers


def _flatten(tree: Mapping, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """{path tuple: leaf}; digit-string keys (Orbax spells list indices so) become ints, as in NNX pure dicts."""
    flat = {}
    for key, value in tree.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[ParamPath, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _path_str(path: ParamPath) -> str:
    return "/".join(str(k) for k in path)


def _torch_key(path: ParamPath) -> tuple[str, bool]:
    """The original's state-dict key for a chest-jax parameter path, and whether the layouts are transposed."""
    *parents, leaf = path
    name = "weight" if leaf in ("kernel", "scale") else leaf
    return ".".join(str(p) for p in (*parents, name)), leaf in _TRANSPOSED_LEAVES


def _torch_shape(path: ParamPath, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape)[::-1] if _torch_key(path)[1] else tuple(shape)


def _expected_params(cfg: ChEstimationConfig, dmrs: Sequence[int]) -> dict[ParamPath, Any]:
    """{path: ShapeDtypeStruct} of the base Estimator_v4 the config describes (no LoRA leaves)."""
    flat = _flatten(model_lib.abstract_params(cfg, tuple(dmrs)))
    return {p: s for p, s in flat.items() if p[-1] not in LORA_LEAVES}


def _encodings(cfg: ChEstimationConfig) -> dict[str, np.ndarray]:
    """Our own positional encodings, keyed by the original's per-layer buffer name."""
    tf, cond = cfg.transformer, cfg.cond
    cond_n_token = cond.length // cond.step_size - cond.steps_per_token + 1
    cond_d_model = cond.in_channels * cond.step_size * cond.steps_per_token
    return {"pe": model_lib.positional_encoding_sine(tf.n_token, tf.d_model),
            "cond_pe": model_lib.positional_encoding_sine(cond_n_token, cond_d_model)}


def _encoding_tolerance(n_pos: int) -> float:
    # float32 rounding of the angle grows with it (up to 2 pi n); a different config differs by O(1).
    return 1e-3 + 4 * float(np.finfo(np.float32).eps) * 2 * math.pi * n_pos


class _Problems:
    """Collects every mismatch so one error can list them all."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, kind: str, text: str) -> None:
        self.lines.append(f"{kind:<11}{text}")

    def __bool__(self) -> bool:
        return bool(self.lines)

    def raise_if_any(self, headline: str, fix: str) -> None:
        if self.lines:
            listing = "\n  ".join(self.lines)
            plural = "s" if len(self.lines) > 1 else ""
            raise InteropError(f"{headline} ({len(self.lines)} problem{plural}); nothing was converted:\n"
                               f"  {listing}\n{fix}")


# ---------------------------------------------------------------------------------------------
# Reading files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict: `.safetensors` (numpy, no torch needed) or `.pt`/`.pth`/`.bin` (torch).

    Returns {key: array} in the file's layout (PyTorch (out, in) weights); half-precision tensors come back
    as float32. A whole pickled model (`torch.save(model)`) is refused: torch loads only weights here.
    """
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such file; give a .pt, .pth or .safetensors state dict file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _load_torch_file(path)
    raise InteropError(f"{path}: unknown file type {suffix!r}; give a PyTorch state dict saved as .pt/.pth "
                       "(torch.save(model.state_dict(), path)) or as .safetensors")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as numpy_error:  # noqa: BLE001 - e.g. bfloat16, which numpy has no dtype for
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise InteropError(f"{path}: not a readable safetensors file ({numpy_error}); if it holds bfloat16 "
                               "tensors, install torch (pip install 'chest-jax[torch]') to read it") from None
        try:
            return {k: _tensor_to_numpy(v) for k, v in load_torch(str(path)).items()}
        except Exception as e:  # noqa: BLE001
            raise InteropError(f"{path}: not a readable safetensors file ({e}); re-export it from the original "
                               "with safetensors.torch.save_file(model.state_dict(), path)") from None


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise InteropError(f"{path}: reading PyTorch .pt/.pth files needs torch; install it with "
                           "pip install 'chest-jax[torch]', or convert the file to .safetensors where torch is "
                           "installed") from None
    return torch


def _tensor_to_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype.itemsize < 4:
        tensor = tensor.float()
    return tensor.numpy()


def _load_torch_file(path: Path) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses arbitrary pickled objects, which is what torch.save(model) writes.
        raise InteropError(
            f"{path} holds a pickled object (e.g. a whole model saved with torch.save(model)), not a state dict "
            f"of tensors; chest-jax does not unpickle code. In the original's environment, convert it once "
            f"with:\n  {WHOLE_MODEL_FIX}\nand import model_state.pt") from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise InteropError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e}); save it with "
                           "torch.save(model.state_dict(), path)") from None
    if not isinstance(obj, Mapping):
        raise InteropError(f"{path} holds a {type(obj).__name__}, not a state dict; in the original's "
                           f"environment save model.state_dict() instead:\n  {WHOLE_MODEL_FIX}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        nested = [k for k in not_tensors if isinstance(obj[k], Mapping)]
        hint = (f"; the weights may be under {nested[0]!r}: torch.save(ckpt[{nested[0]!r}], 'model_state.pt')"
                if nested else "")
        raise InteropError(f"{path} is not a plain state dict: entries {not_tensors[:8]} are not tensors "
                           f"(a training checkpoint?){hint}")
    return {str(k): _tensor_to_numpy(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Model state dicts


def _as_numpy(value: Any) -> np.ndarray:
    """numpy view of an array or a torch tensor (half precision widened to float32)."""
    return _tensor_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)


def _normalized_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Strip DataParallel's `module.`; a bare transformer state dict (`_embedding`, ...) gets `ch_tf.`."""
    out = {}
    for key, value in sd.items():
        out[key[len("module."):] if key.startswith("module.") else key] = value
    if not any(k.startswith(STATE_DICT_PREFIX) for k in out) and "_embedding" in out:
        out = {STATE_DICT_PREFIX + k: v for k, v in out.items()}
    return out


def state_dict_version(sd: Mapping[str, Any]) -> str:
    """'v4' when the state dict has any `mha_q/k/v_proj` layer, else 'v1' (the original base `Estimator`)."""
    pattern = re.compile(r"(^|\.)_layers\.\d+\.mha_[qkv]_proj\.")
    return "v4" if any(pattern.search(k) for k in sd) else "v1"


def _config_hint(sd: Mapping[str, Any], cfg: ChEstimationConfig) -> str:
    """Config values the weights imply, where they differ from `cfg` (n_head is not stored in weights)."""
    tf, cond = cfg.transformer, cfg.cond
    implied: dict[str, int] = {}
    embedding = sd.get("ch_tf._embedding")
    if embedding is not None and np.ndim(embedding) == 2:
        implied["ch_estimation.transformer.n_token"], implied["ch_estimation.transformer.d_model"] = embedding.shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"ch_tf\._layers\.(\d+)\.", k))}
    if layers:
        implied["ch_estimation.transformer.num_layers"] = max(layers) + 1
    ffnn = sd.get("ch_tf._layers.0.ffnn_linear1.weight")
    if ffnn is not None and np.ndim(ffnn) == 2:
        implied["ch_estimation.transformer.dim_feedforward"] = ffnn.shape[0]
    cond_k = sd.get("ch_tf._layers.0.cond_mha.k_proj_weight")
    if cond_k is not None and np.ndim(cond_k) == 2 and cond_k.shape[1] % cond.in_channels == 0:
        implied["ch_estimation.cond.step_size"] = cond_k.shape[1] // cond.in_channels
    linear = sd.get("ch_tf._linear.weight")
    n_token = implied.get("ch_estimation.transformer.n_token", tf.n_token)
    if linear is not None and np.ndim(linear) == 2:
        length = linear.shape[0] * n_token // tf.channels
        implied["ch_estimation.transformer.length"] = implied["ch_estimation.cond.length"] = length
    current = {
        "ch_estimation.transformer.n_token": tf.n_token, "ch_estimation.transformer.d_model": tf.d_model,
        "ch_estimation.transformer.num_layers": tf.num_layers,
        "ch_estimation.transformer.dim_feedforward": tf.dim_feedforward,
        "ch_estimation.cond.step_size": cond.step_size, "ch_estimation.transformer.length": tf.length,
        "ch_estimation.cond.length": cond.length,
    }
    differing = [f"{k}={v}" for k, v in implied.items() if current[k] != v]
    if not differing:
        return ""
    return ("The weights look like a model with " + " ".join(differing) + ": set these in the config (or pass "
            "them as overrides); n_head is not stored in the weights and must be the original's.")


def _require_relu(cfg: ChEstimationConfig, what: str) -> None:
    # The original's layers ignored the `activation` key and always applied ReLU (SPEC 3), so the same weights
    # compute something else under another activation.
    if cfg.transformer.activation != "relu":
        raise InteropError(f"{what}: the PyTorch original always applies ReLU in its feed-forward layers, but the "
                           f"config has ch_estimation.transformer.activation={cfg.transformer.activation!r}; "
                           "set it to relu")


def torch_state_dict_to_params(sd: Mapping[str, Any], cfg: ChEstimationConfig,
                               dmrs: Sequence[int] = (0, 3072, 6), *, source: str = "<state dict>") -> dict:
    """Convert the original's state dict (v4 `Estimator_v4` or v1 `Estimator`) to a chest-jax parameter pure dict.

    Args:
      sd: {key: array or tensor} as `load_state_dict_file` returns, PyTorch layout.
      cfg: the `ch_estimation` config section the model was trained with.
      dmrs: `dataset.ref_conf_dict.dmrs`.
      source: the file name, for messages.

    Returns:
      The pure dict of `nnx.state(Estimator_v4(cfg, dmrs), nnx.Param)`, float32 numpy arrays.

    Strict: every tensor must map to a parameter (the `pe`/`cond_pe` buffers are checked against our encodings
    and dropped), every parameter must be filled and every shape must match, else one `InteropError` lists
    every unmapped key, missing key and mis-shaped tensor. A fused `in_proj_weight` (3d, d) is split into q, k, v.
    The config's activation must be relu, the only one the original applied.
    """
    _require_relu(cfg, f"{source} cannot be imported")
    sd = _normalized_keys(sd)
    remaining = dict(sd)
    problems = _Problems()
    num_layers = cfg.transformer.num_layers

    if any(k.startswith(PEFT_KEY_PREFIX) or ".base_layer." in k or ".lora_" in k for k in remaining):
        raise InteropError(
            f"{source} is the state dict of a PEFT-wrapped model (keys with base_model.model. / base_layer / "
            "lora_). Import its base and adapter separately: in the original's environment save the adapter with "
            "model.save_pretrained(dir) and import that directory, or merge first with "
            "torch.save(model.merge_and_unload().state_dict(), 'model_state.pt')")

    encodings = _encodings(cfg)
    buffer_pattern = re.compile(r"ch_tf\._layers\.(\d+)\.(pe|cond_pe)$")
    for key in sorted(remaining):
        match = buffer_pattern.fullmatch(key)
        if not match or int(match.group(1)) >= num_layers:
            continue
        found = _as_numpy(remaining.pop(key)).astype(np.float64)
        ours = encodings[match.group(2)]
        if found.squeeze().shape != ours.shape:
            problems.add("encoding", f"{key}: shape {found.shape}, expected {ours.shape} "
                                     "(n_token x d_model, or cond tokens x 2*step_size): a different config")
            continue
        error = float(np.max(np.abs(found.reshape(ours.shape) - ours)))
        if not error <= _encoding_tolerance(ours.shape[0]):
            problems.add("encoding", f"{key}: differs from the positional encoding of this config by up to "
                                     f"{error:.3g}: the model was built with a different config or encoding")

    for key in sorted(k for k in remaining if k.endswith(".in_proj_weight")):
        fused = _as_numpy(remaining[key])
        stem = key[: -len("in_proj_weight")]
        split_keys = [f"{stem}{n}_proj_weight" for n in "qkv"]
        if fused.ndim != 2 or fused.shape[0] % 3:
            del remaining[key]
            problems.add("mis-shaped", f"{key}: found {fused.shape}, expected (3 d_model, d_model): q, k and v "
                                       "weights stacked")
            continue
        if any(k in remaining for k in split_keys):
            problems.add("ambiguous", f"{key} and {stem}q/k/v_proj_weight are both present; keep one form")
            continue
        del remaining[key]
        for split_key, part in zip(split_keys, np.split(fused, 3, axis=0)):
            remaining[split_key] = part

    version = state_dict_version(remaining)
    params: dict[ParamPath, np.ndarray] = {}
    for path, spec in _expected_params(cfg, dmrs).items():
        key, transposed = _torch_key(path)
        want = _torch_shape(path, spec.shape)
        if key not in remaining:
            if version == "v1" and len(path) > 3 and path[3] in QUERY_PROJECTIONS:
                # v1 attention read the LayerNorm output directly: identity projections keep the math equal.
                params[path] = (np.eye(spec.shape[0], dtype=np.float32) if path[-1] == "kernel"
                                else np.zeros(spec.shape, np.float32))
            else:
                problems.add("missing", f"{key}: expected {want}")
            continue
        value = _as_numpy(remaining.pop(key))
        if value.shape != want:
            problems.add("mis-shaped", f"{key}: expected {want}, found {value.shape}")
            continue
        if not np.all(np.isfinite(value)):
            problems.add("non-finite", f"{key}: holds NaN or inf values; the source model is broken")
            continue
        params[path] = np.ascontiguousarray((value.T if transposed else value).astype(np.float32))
    for key in sorted(remaining):
        problems.add("unmapped", f"{key} {tuple(np.shape(remaining[key]))}: no Estimator_v4 parameter has this "
                                 "name")

    hint = _config_hint(sd, cfg)
    fix = hint or ("Check that the file is an Estimator_v4 / Estimator state dict and that the config "
                   "(--config) is the one the model was trained with.")
    problems.raise_if_any(f"{source} does not match the {version} Estimator the config describes", fix)
    return _unflatten(params)


def params_to_torch_state_dict(params: Mapping, cfg: ChEstimationConfig,
                               dmrs: Sequence[int] = (0, 3072, 6)) -> dict[str, np.ndarray]:
    """The inverse of `torch_state_dict_to_params`: the original's v4 state dict, float32 numpy (out, in) weights.

    Includes the per-layer `pe` / `cond_pe` buffers, so `Estimator_v4.load_state_dict(sd, strict=True)` of the
    original accepts it (after `torch.from_numpy` or via safetensors). LoRA leaves are refused: merge them first
    (`chest_jax.lora.merge_lora`) or export them as an adapter with `save_peft_adapter`.
    """
    _require_relu(cfg, "the parameters cannot be exported")
    flat = _flatten(params)
    expected = _expected_params(cfg, dmrs)
    problems = _Problems()
    lora = sorted(_path_str(p) for p in flat if p[-1] in LORA_LEAVES)
    if lora:
        raise InteropError(f"the parameters hold LoRA leaves ({lora[0]}, ...); a PyTorch base state dict has "
                           "none: merge them first (chest_jax.lora.merge_lora) or export the adapter with "
                           "save_peft_adapter")
    for path in sorted(set(expected) - set(flat), key=_path_str):
        problems.add("missing", f"{_path_str(path)}: expected {tuple(expected[path].shape)}")
    for path in sorted(set(flat) - set(expected), key=_path_str):
        problems.add("unexpected", f"{_path_str(path)} {tuple(np.shape(flat[path]))}")
    for path in sorted(set(flat) & set(expected), key=_path_str):
        if tuple(np.shape(flat[path])) != tuple(expected[path].shape):
            problems.add("mis-shaped", f"{_path_str(path)}: expected {tuple(expected[path].shape)}, "
                                       f"found {tuple(np.shape(flat[path]))}")
    problems.raise_if_any("the parameters do not match the Estimator_v4 the config describes",
                          "Pass the config the parameters were trained with.")

    encodings = _encodings(cfg)
    sd: dict[str, np.ndarray] = {}
    for layer in range(cfg.transformer.num_layers):
        for name, encoding in encodings.items():
            sd[f"ch_tf._layers.{layer}.{name}"] = np.array(encoding, dtype=np.float32)
    for path in expected:
        key, transposed = _torch_key(path)
        value = np.asarray(flat[path], dtype=np.float32)
        sd[key] = np.ascontiguousarray(value.T if transposed else value)
    return sd


# ---------------------------------------------------------------------------------------------
# PEFT adapters

# adapter_config.json options that change what the weights mean, with the value a plain LoRA has.
_UNSUPPORTED_ADAPTER_OPTIONS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA adds a magnitude vector"),
    "use_rslora": (False, "rsLoRA scales by alpha/sqrt(r), chest-jax by alpha/r"),
    "bias": ("none", "trained biases are not part of a chest-jax adapter"),
    "lora_bias": (False, "a bias on lora_B is not part of a chest-jax adapter"),
    "fan_in_fan_out": (False, "the weights would be stored transposed"),
    "rank_pattern": ({}, "per-module ranks are not supported; one r for every module"),
    "alpha_pattern": ({}, "per-module alphas are not supported; one lora_alpha for every module"),
    "layers_to_transform": (None, "LoRA on only some layers is not supported"),
    "exclude_modules": (None, "excluded modules are not supported"),
    "modules_to_save": (None, "fully trained extra modules are not part of a chest-jax adapter"),
    "layer_replication": (None, "layer replication is not supported"),
    "use_qalora": (False, "QA-LoRA is not supported"),
    "target_parameters": (None, "LoRA on raw parameters is not supported"),
    "trainable_token_indices": (None, "trainable tokens are not supported"),
}
_PEFT_KEY = re.compile(
    r"base_model\.model\.ch_tf\._layers\.(\d+)\.(mha_q_proj|mha_k_proj|mha_v_proj|mha\.out_proj|cond_mha\.out_proj"
    r"|ffnn_linear1|ffnn_linear2)\.(lora_A|lora_B)\.weight")


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value == default:
        return True
    return isinstance(value, (dict, list, tuple)) and not value and not default


def _peft_from_adapter_config(data: Mapping[str, Any], where: Path) -> PeftConfig:
    fix = ("Use an adapter trained as plain LoRA (peft.LoraConfig with r, lora_alpha, lora_dropout, "
           "target_modules only).")
    problems = _Problems()
    if data.get("peft_type") != "LORA":
        problems.add("peft_type", f"{data.get('peft_type')!r}: only LORA adapters can be imported")
    for key, (default, reason) in _UNSUPPORTED_ADAPTER_OPTIONS.items():
        if key in data and not _is_default(data[key], default):
            problems.add("unsupported", f"{key}={data[key]!r}: {reason}")
    targets = data.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
        problems.add("target", f"target_modules={targets!r}: give a list of module names among "
                               f"{', '.join(LORA_TARGETS)} (regular expressions are not supported)")
        targets = []
    for name in targets:
        if name not in LORA_TARGETS:
            problems.add("target", f"{name!r} is not an Estimator_v4 LoRA target; known: {', '.join(LORA_TARGETS)}")
    r, alpha, dropout = data.get("r"), data.get("lora_alpha"), data.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.add("r", f"{r!r}: must be a positive integer rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.add("lora_alpha", f"{alpha!r}: must be a positive number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.add("lora_dropout", f"{dropout!r}: must be in [0, 1)")
    problems.raise_if_any(f"{where} describes an adapter chest-jax cannot represent", fix)
    return PeftConfig(peft_type="LORA", r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      target_modules=tuple(t for t in LORA_TARGETS if t in targets))


def _lora_shapes(module: tuple[str, ...], cfg: ChEstimationConfig, r: int) -> dict[str, tuple[int, int]]:
    """chest-jax (in, r) / (r, out) shapes of one module's LoRA leaves."""
    d, ff = cfg.transformer.d_model, cfg.transformer.dim_feedforward
    fan_in, fan_out = {("ffnn_linear1",): (d, ff), ("ffnn_linear2",): (ff, d)}.get(module, (d, d))
    return {"lora_A": (fan_in, r), "lora_B": (r, fan_out)}


def _read_adapter_tensors(directory: Path) -> tuple[dict[str, np.ndarray], Path]:
    weights = directory / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        return _load_safetensors(weights), weights
    legacy = directory / LEGACY_ADAPTER_WEIGHTS_NAME
    if legacy.is_file():
        return _load_torch_file(legacy), legacy
    raise InteropError(f"{directory} has no {ADAPTER_WEIGHTS_NAME} (nor {LEGACY_ADAPTER_WEIGHTS_NAME}); a PEFT "
                       "adapter directory is what model.save_pretrained(dir) writes")


def load_peft_adapter(directory: str | os.PathLike,
                      cfg: ChEstimationConfig | None = None) -> tuple[PeftConfig, dict]:
    """Read the original's PEFT LoRA adapter directory.

    Args:
      directory: holds adapter_config.json and adapter_model.safetensors (or the older adapter_model.bin).
      cfg: optional `ch_estimation` config of the base model; when given, the number of layers and every
        leaf's shape are checked against it.

    Returns:
      (peft, lora): the PeftConfig (r, lora_alpha, lora_dropout, target_modules from adapter_config.json) and
      the LoRA leaves as a pure dict {"ch_tf": {"_layers": {i: {module: {"lora_A": (in, r), "lora_B": (r, out)}}}}},
      float32; attention output projections sit at {"mha": {"out_proj": ...}} and {"cond_mha": {"out_proj": ...}}.

    Strict: a key that maps to no targeted module, or a targeted module of a layer (0 .. the last layer found,
    or cfg's num_layers) without both tensors, or a wrong shape, raises one `InteropError` listing them all.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        raise InteropError(f"{directory} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG_NAME} (save "
                           "one with model.save_pretrained(dir) in the original's environment)")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{config_path} is not valid JSON ({e}); restore it from the original adapter") from None
    if not isinstance(data, dict):
        raise InteropError(f"{config_path} must hold a JSON object (PEFT's LoraConfig)")
    peft = _peft_from_adapter_config(data, config_path)
    tensors, weights_path = _read_adapter_tensors(directory)

    problems = _Problems()
    found: dict[ParamPath, np.ndarray] = {}
    for key in sorted(tensors):
        match = _PEFT_KEY.fullmatch(key)
        module = tuple(match.group(2).split(".")) if match else None
        if module is None or LORA_MODULES[module] not in peft.target_modules:
            why = ("its module is not in target_modules of adapter_config.json" if module else
                   "not a LoRA tensor of an Estimator_v4 module")
            problems.add("unmapped", f"{key} {tuple(tensors[key].shape)}: {why}")
            continue
        value = np.asarray(tensors[key])
        leaf = match.group(3)
        path = ("ch_tf", "_layers", int(match.group(1)), *module, leaf)
        ours = value.T if value.ndim == 2 else value
        if value.ndim != 2 or (leaf == "lora_A" and value.shape[0] != peft.r) or \
                (leaf == "lora_B" and value.shape[1] != peft.r):
            want = "(r, in)" if leaf == "lora_A" else "(out, r)"
            problems.add("mis-shaped", f"{key}: found {value.shape}, expected {want} with r={peft.r}")
            continue
        if cfg is not None:
            if path[2] >= cfg.transformer.num_layers:
                problems.add("unmapped", f"{key}: layer {path[2]}, but the config's model has "
                                         f"num_layers={cfg.transformer.num_layers}")
                continue
            want_ours = _lora_shapes(module, cfg, peft.r)[leaf]
            if ours.shape != want_ours:
                problems.add("mis-shaped", f"{key}: found {value.shape}, expected {want_ours[::-1]} for the "
                                           "config's model")
                continue
        found[path] = np.ascontiguousarray(ours.astype(np.float32))

    layer_ids = [int(m.group(1)) for k in tensors if (m := _PEFT_KEY.fullmatch(k))]
    num_layers = cfg.transformer.num_layers if cfg is not None else (max(layer_ids) + 1 if layer_ids else 0)
    if not layer_ids:
        problems.add("empty", f"{weights_path.name} holds no LoRA tensor of an Estimator_v4 module")
    for layer in range(num_layers):
        for module, target in LORA_MODULES.items():
            if target not in peft.target_modules:
                continue
            for leaf in LORA_LEAVES:
                path = ("ch_tf", "_layers", layer, *module, leaf)
                if path not in found and not _shape_problem_reported(problems, layer, module, leaf):
                    key = f"{PEFT_KEY_PREFIX}ch_tf._layers.{layer}.{'.'.join(module)}.{leaf}.weight"
                    problems.add("missing", f"{key}: target {target!r} of layer {layer} has no {leaf}")
    problems.raise_if_any(f"{weights_path} does not match its adapter_config.json",
                          "The adapter must hold lora_A and lora_B for every target module of every layer, and "
                          "nothing else.")
    return peft, _unflatten(found)


def _shape_problem_reported(problems: _Problems, layer: int, module: tuple[str, ...], leaf: str) -> bool:
    stem = f"ch_tf._layers.{layer}.{'.'.join(module)}.{leaf}.weight:"
    return any(line.startswith("mis-shaped") and stem in line for line in problems.lines)


def save_peft_adapter(directory: str | os.PathLike, peft: PeftConfig, lora_params: Mapping,
                      base_model_class: str = "Estimator_v4", *, parent_library: str = "model.estimator_v4",
                      overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory the original can load (`PeftModel.from_pretrained(model, dir)`).

    Args:
      directory: created if needed; holds adapter_config.json and adapter_model.safetensors afterwards.
      peft: r, lora_alpha, lora_dropout and target_modules written to adapter_config.json.
      lora_params: pure dict of LoRA leaves (as `load_peft_adapter` returns or `chest_jax.lora.split_params`
        gives), lora_A (in, r) and lora_B (r, out); base parameters are refused.
      base_model_class, parent_library: PEFT's `auto_mapping` (the original's class and module).
      overwrite: replace adapter files already in `directory`.

    Tensors are written float32 in PEFT layout, lora_A (r, in) and lora_B (out, r), keys
    `base_model.model.ch_tf._layers.N.<module>.lora_A.weight`.
    """
    directory = Path(directory)
    if peft.peft_type != "LORA" or peft.r < 1 or peft.lora_alpha <= 0 or not 0 <= peft.lora_dropout < 1:
        raise InteropError(f"cannot write {directory}: the PEFT config {peft} is not a valid LoRA config "
                           "(peft_type LORA, r >= 1, lora_alpha > 0, lora_dropout in [0, 1))")
    unknown_targets = [t for t in peft.target_modules if t not in LORA_TARGETS]
    if unknown_targets or not peft.target_modules:
        raise InteropError(f"cannot write {directory}: target_modules {list(peft.target_modules)} must name "
                           f"modules among {', '.join(LORA_TARGETS)}")
    problems = _Problems()
    tensors: dict[str, np.ndarray] = {}
    layers: set[int] = set()
    for path, value in _flatten(lora_params).items():
        module = tuple(path[3:-1])
        is_lora = (len(path) >= 5 and path[:2] == ("ch_tf", "_layers") and isinstance(path[2], int)
                   and module in LORA_MODULES and path[-1] in LORA_LEAVES)
        if not is_lora:
            problems.add("unexpected", f"{_path_str(path)}: not a LoRA leaf of an Estimator_v4 module")
            continue
        if LORA_MODULES[module] not in peft.target_modules:
            problems.add("unexpected", f"{_path_str(path)}: {LORA_MODULES[module]!r} is not in target_modules")
            continue
        value = np.asarray(value)
        rank_axis = 1 if path[-1] == "lora_A" else 0
        if value.ndim != 2 or value.shape[rank_axis] != peft.r:
            want = "(in, r)" if path[-1] == "lora_A" else "(r, out)"
            problems.add("mis-shaped", f"{_path_str(path)}: found {value.shape}, expected {want} with r={peft.r}")
            continue
        layers.add(path[2])
        key = f"{PEFT_KEY_PREFIX}ch_tf._layers.{path[2]}.{'.'.join(module)}.{path[-1]}.weight"
        tensors[key] = np.ascontiguousarray(value.T.astype(np.float32))
    for layer in range(max(layers) + 1 if layers else 0):
        for module, target in LORA_MODULES.items():
            for leaf in LORA_LEAVES:
                path = ("ch_tf", "_layers", layer, *module, leaf)
                key = f"{PEFT_KEY_PREFIX}ch_tf._layers.{layer}.{'.'.join(module)}.{leaf}.weight"
                if target in peft.target_modules and key not in tensors and \
                        not any(_path_str(path) in line for line in problems.lines):
                    problems.add("missing", f"{_path_str(path)}: target {target!r} of layer {layer}")
    if not tensors and not problems:
        problems.add("empty", "no LoRA leaves given")
    problems.raise_if_any(f"cannot write the adapter {directory}",
                          "Pass the LoRA leaves of one model whose LoRA targets are the config's target_modules.")

    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": base_model_class, "parent_library": parent_library},
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": peft.r,
        "lora_alpha": int(peft.lora_alpha) if float(peft.lora_alpha).is_integer() else peft.lora_alpha,
        "lora_dropout": peft.lora_dropout,
        "target_modules": list(peft.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    targets = [directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise InteropError(f"{', '.join(existing)} already exist; choose another directory or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    weights_tmp = directory / (ADAPTER_WEIGHTS_NAME + ".tmp")
    config_tmp = directory / (ADAPTER_CONFIG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(adapter_config, indent=2) + "\n")
    weights_tmp.replace(targets[1])
    config_tmp.replace(targets[0])
    return directory


# ---------------------------------------------------------------------------------------------
# Command line


def _write_state_dict_file(path: Path, sd: Mapping[str, np.ndarray]) -> None:
    if path.exists():
        raise InteropError(f"{path} already exists; choose another destination or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save_file

        save_file(dict(sd), str(path), metadata={"format": "pt"})
    elif path.suffix.lower() in TORCH_SUFFIXES:
        torch = _import_torch(path)
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, str(path))
    else:
        raise InteropError(f"{path}: give the destination a .safetensors, .pt or .pth suffix")


def _checkpoint_module():
    from chest_jax import checkpoint

    return checkpoint


def _import_state_dict(src: Path, dest: Path, cfg: config_lib.Config) -> str:
    from chest_jax import lora

    checkpoint = _checkpoint_module()
    sd = load_state_dict_file(src)
    version = state_dict_version(_normalized_keys(sd))
    dmrs = cfg.dataset.ref_conf_dict.dmrs
    params = torch_state_dict_to_params(sd, cfg.ch_estimation, dmrs, source=str(src))
    checkpoint.save_model(dest, params, cfg, kind="base", step=0, fingerprint=lora.params_fingerprint(params),
                          extra={"imported_from": str(src), "source_format": f"pytorch {version} state dict"})
    count = sum(int(np.size(v)) for v in _flatten(params).values())
    return f"imported the {version} state dict {src} ({count:,} parameters) into the chest-jax model {dest}"


def _import_adapter(src: Path, dest: Path, cfg: config_lib.Config) -> str:
    checkpoint = _checkpoint_module()
    peft, lora_params = load_peft_adapter(src, cfg.ch_estimation)
    cfg = cfg.replace(ch_estimation=dataclasses.replace(cfg.ch_estimation, peft=peft))
    checkpoint.save_adapter(dest, lora_params, cfg, base_fingerprint=None, step=0,
                            extra={"imported_from": str(src), "source_format": "peft lora adapter"})
    count = sum(int(np.size(v)) for v in _flatten(lora_params).values())
    return (f"imported the PEFT adapter {src} (r={peft.r}, lora_alpha={peft.lora_alpha:g}, "
            f"{count:,} parameters) into the chest-jax adapter {dest}")


def _export_peft(src: Path, dest: Path) -> str:
    checkpoint = _checkpoint_module()
    lora_params, cfg, _ = checkpoint.load_adapter(src)
    if cfg.ch_estimation.peft is None:
        raise InteropError(f"{src}: the adapter's stored config has no ch_estimation.peft section")
    save_peft_adapter(dest, cfg.ch_estimation.peft, lora_params)
    return f"exported the chest-jax adapter {src} as the PEFT adapter {dest}"


def _export_torch(src: Path, dest: Path) -> str:
    checkpoint = _checkpoint_module()
    meta = checkpoint.read_meta(src)
    if meta.get("kind") not in checkpoint.MODEL_KINDS:
        raise InteropError(f"{src} holds a {meta.get('kind')!r} checkpoint; --export-torch takes a model "
                           f"({' or '.join(checkpoint.MODEL_KINDS)}); export adapters with --export-peft")
    cfg = checkpoint.config_from_meta(meta, src)
    dmrs = cfg.dataset.ref_conf_dict.dmrs
    params = checkpoint.restore_tree(src, model_lib.abstract_params(cfg.ch_estimation, dmrs),
                                     expected_from=f"the config stored in {src}")
    _write_state_dict_file(dest, params_to_torch_state_dict(params, cfg.ch_estimation, dmrs))
    return f"exported the chest-jax model {src} as the PyTorch Estimator_v4 state dict {dest}"


def _detect_kind(src: Path) -> str:
    if src.is_dir() and (src / ADAPTER_CONFIG_NAME).is_file():
        return "adapter"
    if src.is_file():
        return "state_dict"
    if src.is_dir():
        raise InteropError(f"{src} is a directory without {ADAPTER_CONFIG_NAME}: not a PEFT adapter. To export a "
                           "chest-jax checkpoint, add --export-peft (adapters) or --export-torch (models)")
    raise InteropError(f"{src} does not exist; give a .pt/.pth/.safetensors state dict or a PEFT adapter directory")


def _run(args: argparse.Namespace) -> str:
    src, dest = Path(args.src), Path(args.dest)
    if args.export_peft and args.export_torch:
        raise InteropError("give one of --export-peft and --export-torch")
    if args.export_peft:
        return _export_peft(src, dest)
    if args.export_torch:
        return _export_torch(src, dest)
    cfg = config_lib.load(args.config, args.overrides)
    kind = _detect_kind(src) if args.kind == "auto" else args.kind
    if kind == "adapter":
        return _import_adapter(src, dest, cfg)
    return _import_state_dict(src, dest, cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chest_jax.interop",
        description="Import the PyTorch original's model state dict or PEFT LoRA adapter into chest-jax, or "
                    "export chest-jax adapters (PEFT) and models (state dict) back.")
    parser.add_argument("src", help="a .pt/.pth/.safetensors state dict, a PEFT adapter directory, or with "
                                    "--export-* a chest-jax checkpoint directory")
    parser.add_argument("dest", help="where to write (a chest-jax checkpoint directory, a PEFT directory, or a "
                                     ".safetensors/.pt file for --export-torch)")
    parser.add_argument("--config", default=None,
                        help="YAML config of the model the weights belong to (defaults: configs/base values)")
    parser.add_argument("--kind", choices=("auto", "state_dict", "adapter"), default="auto",
                        help="what SRC is (auto: a directory with adapter_config.json is an adapter)")
    parser.add_argument("--export-peft", action="store_true",
                        help="SRC is a chest-jax adapter; write it as a PEFT adapter directory")
    parser.add_argument("--export-torch", action="store_true",
                        help="SRC is a chest-jax model checkpoint; write the original's state dict")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 2 bad input) and prints one line either way."""
    args = _parser().parse_intermixed_args(argv)
    known_errors: tuple[type[Exception], ...] = (InteropError, config_lib.ConfigError)
    try:
        known_errors += (_checkpoint_module().CheckpointError,)
    except ImportError:
        pass
    try:
        print(_run(args))
    except known_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
