"""`python -m chest_jax.interop`: import the original's state dicts and PEFT adapters, export chest-jax models
and adapters back.

  python -m chest_jax.interop model.pt runs/imported/final --config configs/base.yaml
  python -m chest_jax.interop peft_adapter_dir runs/imported_adapter
  python -m chest_jax.interop runs/lora/adapter peft_out_dir --export-peft
  python -m chest_jax.interop runs/base/final model.safetensors --export-torch
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from chest_jax import checkpoint, errors, lora, trees
from chest_jax import config as config_lib
from chest_jax import model as model_lib
from chest_jax.interop.files import InteropError, load_state_dict_file, write_state_dict_file
from chest_jax.interop.peft import ADAPTER_CONFIG_NAME, load_peft_adapter, save_peft_adapter
from chest_jax.interop.state_dict import params_to_torch_state_dict, state_dict_version, torch_state_dict_to_params


def _import_state_dict(src: Path, dest: Path, cfg: config_lib.Config) -> str:
    sd = load_state_dict_file(src)
    version = state_dict_version(sd)
    dmrs = cfg.dataset.ref_conf_dict.dmrs
    params = torch_state_dict_to_params(sd, cfg.ch_estimation, dmrs, source=str(src))
    checkpoint.save_model(dest, params, cfg, kind="base", step=0, fingerprint=lora.params_fingerprint(params),
                          extra={"imported_from": str(src), "source_format": f"pytorch {version} state dict"})
    count = sum(int(np.size(v)) for v in trees.flatten(params).values())
    return f"imported the {version} state dict {src} ({count:,} parameters) into the chest-jax model {dest}"


def _import_adapter(src: Path, dest: Path, cfg: config_lib.Config) -> str:
    peft, lora_params = load_peft_adapter(src, cfg.ch_estimation)
    cfg = cfg.replace(ch_estimation=dataclasses.replace(cfg.ch_estimation, peft=peft))
    checkpoint.save_adapter(dest, lora_params, cfg, base_fingerprint=None, step=0,
                            extra={"imported_from": str(src), "source_format": "peft lora adapter"})
    count = sum(int(np.size(v)) for v in trees.flatten(lora_params).values())
    return (f"imported the PEFT adapter {src} (r={peft.r}, lora_alpha={peft.lora_alpha:g}, "
            f"{count:,} parameters) into the chest-jax adapter {dest}")


def _export_peft(src: Path, dest: Path) -> str:
    lora_params, cfg, _ = checkpoint.load_adapter(src)
    if cfg.ch_estimation.peft is None:
        raise InteropError(f"{src}: the adapter's stored config has no ch_estimation.peft section")
    save_peft_adapter(dest, cfg.ch_estimation.peft, lora_params)
    return f"exported the chest-jax adapter {src} as the PEFT adapter {dest}"


def _export_torch(src: Path, dest: Path) -> str:
    meta = checkpoint.read_meta(src)
    if meta.get("kind") not in checkpoint.MODEL_KINDS:
        raise InteropError(f"{src} holds a {meta.get('kind')!r} checkpoint; --export-torch takes a model "
                           f"({' or '.join(checkpoint.MODEL_KINDS)}); export adapters with --export-peft")
    cfg = checkpoint.config_from_meta(meta, src)
    dmrs = cfg.dataset.ref_conf_dict.dmrs
    params = checkpoint.restore_tree(src, model_lib.abstract_params(cfg.ch_estimation, dmrs),
                                     expected_from=f"the config stored in {src}")
    write_state_dict_file(dest, params_to_torch_state_dict(params, cfg.ch_estimation, dmrs))
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (0 ok, 2 bad input) and prints one line either way (plus a
    `warning: ...` line for each warning, e.g. an out_proj adapter the original applies only when merged).
    Bad input is any UserError (errors.run_cli, as in the train and compare CLIs); anything else is a bug and
    raises with its traceback."""
    args = _parser().parse_intermixed_args(argv)

    def body() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            message = _run(args)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        print(message)
        return 0

    return errors.run_cli(body, debug=args.debug)
