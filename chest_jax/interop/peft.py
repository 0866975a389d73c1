"""LoRA adapters of the PyTorch original: Hugging Face PEFT directories (`adapter_config.json` +
`adapter_model.safetensors`, or the older `adapter_model.bin`) to and from chest-jax LoRA leaves.

PEFT stores lora_A (r, in) and lora_B (out, r); chest-jax stores lora_A (in, r) and lora_B (r, out), under the
same module paths (`base_model.model.ch_tf._layers.N.<module>.lora_A.weight` <-> `ch_tf/_layers/N/<module>/lora_A`).

One difference in meaning, not in layout: the original's attention applied `out_proj`'s weights directly,
bypassing PEFT's wrapper, so in the original an UN-merged PEFT model ignores the `out_proj` adapters, while a
merged one (`merge_and_unload()`) applies them, as chest-jax always does. An adapter whose `out_proj` lora_B is
non-zero therefore computes the same thing in both only after `merge_and_unload()`; export and import warn
when that is the case.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chest_jax import trees
from chest_jax.config import LORA_TARGETS, ChEstimationConfig, PeftConfig
from chest_jax.interop.files import InteropError, Problems, load_safetensors, load_torch_file

PEFT_KEY_PREFIX = "base_model.model."
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_ADAPTER_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became its default

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


class OutProjAdapterWarning(UserWarning):
    """An adapter trains `out_proj`, which the original applies only after `merge_and_unload()`."""


OUT_PROJ_NOTE = ("the PyTorch original's attention uses out_proj's weights directly, so an un-merged PEFT model "
                 "there ignores these adapters; load it in the original with PeftModel.from_pretrained(...) "
                 "followed by merge_and_unload() to compute what chest-jax computes")


def trained_out_proj(lora_params: Mapping) -> list[str]:
    """Paths of the `out_proj` adapters whose lora_B is not exactly zero (adapters that change out_proj)."""
    return sorted(trees.path_str(p[:-1]) for p, v in trees.flatten(lora_params).items()
                  if len(p) >= 2 and p[-2] == "out_proj" and p[-1] == "lora_B" and np.any(np.asarray(v) != 0))


def _warn_out_proj(lora_params: Mapping, what: str) -> None:
    trained = trained_out_proj(lora_params)
    if trained:
        warnings.warn(f"{what}: {len(trained)} out_proj adapter(s) are non-zero ({trained[0]}, ...); "
                      + OUT_PROJ_NOTE, OutProjAdapterWarning, stacklevel=3)


def _module_key(layer: int, module: tuple[str, ...], leaf: str) -> str:
    return f"{PEFT_KEY_PREFIX}ch_tf._layers.{layer}.{'.'.join(module)}.{leaf}.weight"


def _is_default(value: Any, default: Any) -> bool:
    if value is None or value == default:
        return True
    return isinstance(value, (dict, list, tuple)) and not value and not default


def _peft_from_adapter_config(data: Mapping[str, Any], where: Path) -> PeftConfig:
    fix = ("Use an adapter trained as plain LoRA (peft.LoraConfig with r, lora_alpha, lora_dropout, "
           "target_modules only).")
    problems = Problems()
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
        return load_safetensors(weights), weights
    legacy = directory / LEGACY_ADAPTER_WEIGHTS_NAME
    if legacy.is_file():
        return load_torch_file(legacy), legacy
    raise InteropError(f"{directory} has no {ADAPTER_WEIGHTS_NAME} (nor {LEGACY_ADAPTER_WEIGHTS_NAME}); a PEFT "
                       "adapter directory is what model.save_pretrained(dir) writes")


def _read_adapter_config(directory: Path) -> PeftConfig:
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
    return _peft_from_adapter_config(data, config_path)


def _map_tensors(tensors: Mapping[str, np.ndarray], peft: PeftConfig, cfg: ChEstimationConfig | None,
                 problems: Problems) -> dict[trees.ParamPath, np.ndarray]:
    """Each PEFT tensor at its chest-jax path and layout; what maps nowhere or has a wrong shape is a problem."""
    found: dict[trees.ParamPath, np.ndarray] = {}
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
    return found


def _report_missing(found: Mapping[trees.ParamPath, Any], num_layers: int, peft: PeftConfig,
                    problems: Problems, *, peft_names: bool) -> None:
    """A problem for every target leaf of layers 0..num_layers-1 not in `found` (unless a shape problem already
    names it), spelled as PEFT keys (import) or chest-jax paths (export)."""
    for layer in range(num_layers):
        for module, target in LORA_MODULES.items():
            if target not in peft.target_modules:
                continue
            for leaf in LORA_LEAVES:
                path = ("ch_tf", "_layers", layer, *module, leaf)
                if path in found or _leaf_problem_reported(problems, path):
                    continue
                name = _module_key(layer, module, leaf) if peft_names else trees.path_str(path)
                problems.add("missing", f"{name}: target {target!r} of layer {layer} has no {leaf}")


def _leaf_problem_reported(problems: Problems, path: trees.ParamPath) -> bool:
    layer, module, leaf = path[2], path[3:-1], path[-1]
    stems = (f"ch_tf._layers.{layer}.{'.'.join(module)}.{leaf}.weight:", f"{trees.path_str(path)}:")
    return any(stem in line for line in problems.lines for stem in stems)


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
    Warns (`OutProjAdapterWarning`) when an out_proj adapter is non-zero (see the module docstring).
    """
    directory = Path(directory)
    peft = _read_adapter_config(directory)
    tensors, weights_path = _read_adapter_tensors(directory)
    problems = Problems()
    found = _map_tensors(tensors, peft, cfg, problems)
    layer_ids = [int(m.group(1)) for k in tensors if (m := _PEFT_KEY.fullmatch(k))]
    num_layers = cfg.transformer.num_layers if cfg is not None else (max(layer_ids) + 1 if layer_ids else 0)
    if not layer_ids:
        problems.add("empty", f"{weights_path.name} holds no LoRA tensor of an Estimator_v4 module")
    _report_missing(found, num_layers, peft, problems, peft_names=True)
    problems.raise_if_any(f"{weights_path} does not match its adapter_config.json",
                          "The adapter must hold lora_A and lora_B for every target module of every layer, and "
                          "nothing else.")
    lora = trees.unflatten(found)
    _warn_out_proj(lora, f"PEFT adapter {directory}")
    return peft, lora


def _check_writable_peft(directory: Path, peft: PeftConfig) -> None:
    if peft.peft_type != "LORA" or peft.r < 1 or peft.lora_alpha <= 0 or not 0 <= peft.lora_dropout < 1:
        raise InteropError(f"cannot write {directory}: the PEFT config {peft} is not a valid LoRA config "
                           "(peft_type LORA, r >= 1, lora_alpha > 0, lora_dropout in [0, 1))")
    unknown_targets = [t for t in peft.target_modules if t not in LORA_TARGETS]
    if unknown_targets or not peft.target_modules:
        raise InteropError(f"cannot write {directory}: target_modules {list(peft.target_modules)} must name "
                           f"modules among {', '.join(LORA_TARGETS)}")


def _peft_tensors(peft: PeftConfig, lora_params: Mapping, problems: Problems) -> tuple[dict[str, np.ndarray], int]:
    """The PEFT-layout tensors of the LoRA leaves, and the number of layers they span."""
    tensors: dict[str, np.ndarray] = {}
    layers: set[int] = set()
    for path, value in trees.flatten(lora_params).items():
        module = tuple(path[3:-1])
        is_lora = (len(path) >= 5 and path[:2] == ("ch_tf", "_layers") and isinstance(path[2], int)
                   and module in LORA_MODULES and path[-1] in LORA_LEAVES)
        if not is_lora:
            problems.add("unexpected", f"{trees.path_str(path)}: not a LoRA leaf of an Estimator_v4 module")
            continue
        if LORA_MODULES[module] not in peft.target_modules:
            problems.add("unexpected", f"{trees.path_str(path)}: {LORA_MODULES[module]!r} is not in target_modules")
            continue
        value = np.asarray(value)
        rank_axis = 1 if path[-1] == "lora_A" else 0
        if value.ndim != 2 or value.shape[rank_axis] != peft.r:
            want = "(in, r)" if path[-1] == "lora_A" else "(r, out)"
            problems.add("mis-shaped", f"{trees.path_str(path)}: found {value.shape}, expected {want} with "
                                       f"r={peft.r}")
            continue
        layers.add(path[2])
        tensors[_module_key(path[2], module, path[-1])] = np.ascontiguousarray(value.T.astype(np.float32))
    return tensors, max(layers) + 1 if layers else 0


def _adapter_config(peft: PeftConfig, base_model_class: str, parent_library: str) -> dict[str, Any]:
    return {
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


def save_peft_adapter(directory: str | os.PathLike, peft: PeftConfig, lora_params: Mapping,
                      base_model_class: str = "Estimator_v4", *, parent_library: str = "model.estimator_v4",
                      overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory the original can load (`PeftModel.from_pretrained(model, dir)`).

    Args:
      directory: created if needed; holds adapter_config.json and adapter_model.safetensors afterwards.
      peft: r, lora_alpha, lora_dropout and target_modules written to adapter_config.json.
      lora_params: pure dict of LoRA leaves (as `load_peft_adapter` returns or `chest_jax.checkpoint.load_adapter`
        gives), lora_A (in, r) and lora_B (r, out); base parameters are refused.
      base_model_class, parent_library: PEFT's `auto_mapping` (the original's class and module).
      overwrite: replace adapter files already in `directory`.

    Tensors are written float32 in PEFT layout, lora_A (r, in) and lora_B (out, r), keys
    `base_model.model.ch_tf._layers.N.<module>.lora_A.weight`. Warns (`OutProjAdapterWarning`) when an out_proj
    adapter is non-zero: the original must then `merge_and_unload()` to compute what chest-jax computes.
    """
    directory = Path(directory)
    _check_writable_peft(directory, peft)
    problems = Problems()
    tensors, num_layers = _peft_tensors(peft, lora_params, problems)
    _report_missing(trees.flatten(lora_params), num_layers, peft, problems, peft_names=False)
    if not tensors and not problems:
        problems.add("empty", "no LoRA leaves given")
    problems.raise_if_any(f"cannot write the adapter {directory}",
                          "Pass the LoRA leaves of one model whose LoRA targets are the config's target_modules.")
    targets = [directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise InteropError(f"{', '.join(existing)} already exist; choose another directory or pass overwrite=True")
    _warn_out_proj(lora_params, f"exporting {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    weights_tmp = directory / (ADAPTER_WEIGHTS_NAME + ".tmp")
    config_tmp = directory / (ADAPTER_CONFIG_NAME + ".tmp")
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    config_tmp.write_text(json.dumps(_adapter_config(peft, base_model_class, parent_library), indent=2) + "\n")
    weights_tmp.replace(targets[1])
    config_tmp.replace(targets[0])
    return directory
