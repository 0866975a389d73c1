"""Tensor files and the error type shared by the interop modules: PyTorch `.pt`/`.pth`/`.bin` (read with
`weights_only=True`, needs torch) and `.safetensors` (numpy, no torch needed)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from chest_jax.errors import UserError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
WHOLE_MODEL_FIX = 'torch.save(torch.load("model.pt", weights_only=False).state_dict(), "model_state.pt")'



class InteropError(UserError, ValueError):
    """A file cannot be imported or exported as asked; the message names the file, what is wrong and the fix."""



class Problems:
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
        return load_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return load_torch_file(path)
    raise InteropError(f"{path}: unknown file type {suffix!r}; give a PyTorch state dict saved as .pt/.pth "
                       "(torch.save(model.state_dict(), path)) or as .safetensors")



def load_safetensors(path: Path) -> dict[str, np.ndarray]:
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



def import_torch(path: Path):
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



def load_torch_file(path: Path) -> dict[str, np.ndarray]:
    torch = import_torch(path)
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



def as_numpy(value: Any) -> np.ndarray:
    """numpy view of an array or a torch tensor (half precision widened to float32)."""
    return _tensor_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)



def write_state_dict_file(path: Path, sd: Mapping[str, np.ndarray]) -> None:
    if path.exists():
        raise InteropError(f"{path} already exists; choose another destination or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".safetensors":
        from safetensors.numpy import save_file

        save_file(dict(sd), str(path), metadata={"format": "pt"})
    elif path.suffix.lower() in TORCH_SUFFIXES:
        torch = import_torch(path)
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, str(path))
    else:
        raise InteropError(f"{path}: give the destination a .safetensors, .pt or .pth suffix")
