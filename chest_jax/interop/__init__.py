"""Exact import and export of models and adapters from and to the PyTorch original.

- `state_dict`: the original's model state dicts (v4 `Estimator_v4` and v1 `Estimator`) <-> parameter pure dicts.
- `peft`: its LoRA adapters (Hugging Face PEFT directories) <-> chest-jax LoRA leaves.
- `files`: `.pt`/`.pth`/`.safetensors` reading and writing, and the `InteropError` every conversion raises.
- `cli`: `python -m chest_jax.interop SRC DEST [--export-peft | --export-torch]`.

Every conversion is strict: each tensor must be used, each parameter filled, each shape right, or one
`InteropError` lists every problem and nothing is returned.
"""
from chest_jax.interop.cli import main
from chest_jax.interop.files import WHOLE_MODEL_FIX, InteropError, load_state_dict_file
from chest_jax.interop.peft import (LORA_MODULES, OutProjAdapterWarning, load_peft_adapter, save_peft_adapter,
                                    trained_out_proj)
from chest_jax.interop.state_dict import params_to_torch_state_dict, state_dict_version, torch_state_dict_to_params

__all__ = ["LORA_MODULES", "WHOLE_MODEL_FIX", "InteropError", "OutProjAdapterWarning", "load_peft_adapter",
           "load_state_dict_file", "main", "params_to_torch_state_dict", "save_peft_adapter", "state_dict_version",
           "torch_state_dict_to_params", "trained_out_proj"]
