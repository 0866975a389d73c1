"""The PyTorch original's model state dicts (`torch.save(model.state_dict(), path)` or the same tensors in a
`.safetensors` file) to and from chest-jax parameter pure dicts.

Keys `ch_tf._embedding`, `ch_tf._layers.N.mha_q_proj.weight`, ..., plus the positional-encoding buffers
`ch_tf._layers.N.pe` / `cond_pe`. Both the v4 `Estimator_v4` and the base v1 `Estimator` (no `mha_*_proj` layers)
are read; v1 is lifted into v4 exactly by identity `mha_*_proj` (SPEC.md section 3). A PyTorch Linear weight is
(out, in) and a Flax kernel (in, out), so every weight is transposed, and so are the attention's
`q/k/v_proj_weight`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from chest_jax import model as model_lib
from chest_jax import trees
from chest_jax.config import ChEstimationConfig
from chest_jax.interop.files import InteropError, Problems, as_numpy

STATE_DICT_PREFIX = "ch_tf."
QUERY_PROJECTIONS = ("mha_q_proj", "mha_k_proj", "mha_v_proj")
_TRANSPOSED_LEAVES = ("kernel", "q_proj_weight", "k_proj_weight", "v_proj_weight")

# Modules that can carry LoRA, as their path inside a layer, and the PEFT target name that selects them.


def _torch_key(path: trees.ParamPath) -> tuple[str, bool]:
    """The original's state-dict key for a chest-jax parameter path, and whether the layouts are transposed."""
    *parents, leaf = path
    name = "weight" if leaf in ("kernel", "scale") else leaf
    return ".".join(str(p) for p in (*parents, name)), leaf in _TRANSPOSED_LEAVES


def _torch_shape(path: trees.ParamPath, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(shape)[::-1] if _torch_key(path)[1] else tuple(shape)


def _expected_params(cfg: ChEstimationConfig, dmrs: Sequence[int]) -> dict[trees.ParamPath, Any]:
    """{path: ShapeDtypeStruct} of the base Estimator_v4 the config describes (no LoRA leaves)."""
    flat = trees.flatten(model_lib.abstract_params(cfg, tuple(dmrs)))
    return {p: s for p, s in flat.items() if p[-1] not in ("lora_A", "lora_B")}


def _encodings(cfg: ChEstimationConfig) -> dict[str, np.ndarray]:
    """Our own positional encodings, keyed by the original's per-layer buffer name."""
    tf, cond = cfg.transformer, cfg.cond
    cond_net = model_lib.ConditionNetwork(cond.length, cond.in_channels, cond.step_size, cond.steps_per_token)
    return {"pe": model_lib.positional_encoding_sine(tf.n_token, tf.d_model),
            "cond_pe": model_lib.positional_encoding_sine(cond_net.n_token, cond_net.d_model)}


def _encoding_tolerance(n_pos: int) -> float:
    # float32 rounding of the angle grows with it (up to 2 pi n); a different config differs by O(1).
    return 1e-3 + 4 * float(np.finfo(np.float32).eps) * 2 * math.pi * n_pos


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


def _require_original_function(cfg: ChEstimationConfig, what: str) -> None:
    """Refuse configs under which the same weights compute something the original does not."""
    # The original's layers ignored the `activation` key and always applied ReLU (SPEC 3).
    if cfg.transformer.activation != "relu":
        raise InteropError(f"{what}: the PyTorch original always applies ReLU in its feed-forward layers, but the "
                           f"config has ch_estimation.transformer.activation={cfg.transformer.activation!r}; "
                           "set it to relu")
    if cfg.residual != "none":
        raise InteropError(f"{what}: ch_estimation.residual={cfg.residual!r} adds a classical estimate "
                           f"({cfg.reference}) to the transformer's output, which the PyTorch original cannot "
                           "represent; only models with residual: none move between chest-jax and the original")
    if cfg.queries != "learned":
        raise InteropError(f"{what}: ch_estimation.queries={cfg.queries!r} feeds the pilots into the query tokens "
                           "through a layer the PyTorch original does not have, so it cannot represent it; only "
                           "models with queries: learned move between chest-jax and the original")


def _refuse_peft_wrapped(keys: Sequence[str], source: str) -> None:
    if any(k.startswith("base_model.model.") or ".base_layer." in k or ".lora_" in k for k in keys):
        raise InteropError(
            f"{source} is the state dict of a PEFT-wrapped model (keys with base_model.model. / base_layer / "
            "lora_). Import its base and adapter separately: in the original's environment save the adapter with "
            "model.save_pretrained(dir) and import that directory, or merge first with "
            "torch.save(model.merge_and_unload().state_dict(), 'model_state.pt')")


def _check_encodings(remaining: dict[str, Any], cfg: ChEstimationConfig, problems: Problems) -> None:
    """Pop the `pe` / `cond_pe` buffers of every layer, checking them against our encodings of this config."""
    encodings = _encodings(cfg)
    buffer_pattern = re.compile(r"ch_tf\._layers\.(\d+)\.(pe|cond_pe)$")
    for key in sorted(remaining):
        match = buffer_pattern.fullmatch(key)
        if not match or int(match.group(1)) >= cfg.transformer.num_layers:
            continue
        found = as_numpy(remaining.pop(key)).astype(np.float64)
        ours = encodings[match.group(2)]
        if found.squeeze().shape != ours.shape:
            problems.add("encoding", f"{key}: shape {found.shape}, expected {ours.shape} "
                                     "(n_token x d_model, or cond tokens x 2*step_size): a different config")
            continue
        error = float(np.max(np.abs(found.reshape(ours.shape) - ours)))
        if not error <= _encoding_tolerance(ours.shape[0]):
            problems.add("encoding", f"{key}: differs from the positional encoding of this config by up to "
                                     f"{error:.3g}: the model was built with a different config or encoding")


def _split_fused_in_proj(remaining: dict[str, Any], problems: Problems) -> None:
    """Replace every fused `in_proj_weight` (3d, d) by its q, k, v parts `q/k/v_proj_weight`."""
    for key in sorted(k for k in remaining if k.endswith(".in_proj_weight")):
        fused = as_numpy(remaining[key])
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


def _fill_params(remaining: dict[str, Any], cfg: ChEstimationConfig, dmrs: Sequence[int], version: str,
                 problems: Problems) -> dict[trees.ParamPath, np.ndarray]:
    """Pop the tensor of every expected parameter (transposed to our layout); v1 gets identity mha_*_proj."""
    params: dict[trees.ParamPath, np.ndarray] = {}
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
        value = as_numpy(remaining.pop(key))
        if value.shape != want:
            problems.add("mis-shaped", f"{key}: expected {want}, found {value.shape}")
            continue
        if not np.all(np.isfinite(value)):
            problems.add("non-finite", f"{key}: holds NaN or inf values; the source model is broken")
            continue
        params[path] = np.ascontiguousarray((value.T if transposed else value).astype(np.float32))
    return params


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
    _require_original_function(cfg, f"{source} cannot be imported")
    sd = _normalized_keys(sd)
    _refuse_peft_wrapped(list(sd), source)
    remaining = dict(sd)
    problems = Problems()
    _check_encodings(remaining, cfg, problems)
    _split_fused_in_proj(remaining, problems)
    version = state_dict_version(remaining)
    params = _fill_params(remaining, cfg, dmrs, version, problems)
    for key in sorted(remaining):
        problems.add("unmapped", f"{key} {tuple(np.shape(remaining[key]))}: no Estimator_v4 parameter has this "
                                 "name")
    hint = _config_hint(sd, cfg)
    fix = hint or ("Check that the file is an Estimator_v4 / Estimator state dict and that the config "
                   "(--config) is the one the model was trained with.")
    problems.raise_if_any(f"{source} does not match the {version} Estimator the config describes", fix)
    return trees.unflatten(params)


def params_to_torch_state_dict(params: Mapping, cfg: ChEstimationConfig,
                               dmrs: Sequence[int] = (0, 3072, 6)) -> dict[str, np.ndarray]:
    """The inverse of `torch_state_dict_to_params`: the original's v4 state dict, float32 numpy (out, in) weights.

    Includes the per-layer `pe` / `cond_pe` buffers, so `Estimator_v4.load_state_dict(sd, strict=True)` of the
    original accepts it (after `torch.from_numpy` or via safetensors). LoRA leaves are refused: merge them first
    (`chest_jax.lora.merge_lora`) or export them as an adapter with `save_peft_adapter`.
    """
    _require_original_function(cfg, "the parameters cannot be exported")
    flat = trees.flatten(params)
    expected = _expected_params(cfg, dmrs)
    problems = Problems()
    lora = sorted(trees.path_str(p) for p in flat if p[-1] in ("lora_A", "lora_B"))
    if lora:
        raise InteropError(f"the parameters hold LoRA leaves ({lora[0]}, ...); a PyTorch base state dict has "
                           "none: merge them first (chest_jax.lora.merge_lora) or export the adapter with "
                           "save_peft_adapter")
    for path in sorted(set(expected) - set(flat), key=trees.path_str):
        problems.add("missing", f"{trees.path_str(path)}: expected {tuple(expected[path].shape)}")
    for path in sorted(set(flat) - set(expected), key=trees.path_str):
        problems.add("unexpected", f"{trees.path_str(path)} {tuple(np.shape(flat[path]))}")
    for path in sorted(set(flat) & set(expected), key=trees.path_str):
        if tuple(np.shape(flat[path])) != tuple(expected[path].shape):
            problems.add("mis-shaped", f"{trees.path_str(path)}: expected {tuple(expected[path].shape)}, "
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
