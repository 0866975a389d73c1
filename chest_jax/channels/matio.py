"""Read and write the original pipeline's PDP files.

Format (MATLAB v5-v7, as `save('PDP_InF_Los.mat', 'pdp')` writes it): one variable `pdp`, a 1 x M cell
array; cell i is an n_i x 2 matrix of [delay in ns, linear power]. Powers may carry any absolute scale.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io

from chest_jax.errors import UserError

PDP_VARIABLE = "pdp"
EXPECTED_FORMAT = (f"a MATLAB file with a variable `{PDP_VARIABLE}` holding a 1 x M cell array whose cells are "
                   "n x 2 [delay_ns, power] matrices (delays >= 0 ns, powers >= 0 and not all zero, all finite)")


class PDPError(UserError, ValueError):
    """A PDP file or profile list is missing, unreadable or malformed; the message names it and the fix."""


def validate_profile(profile: object, where: str) -> np.ndarray:
    """Check one tap list and return it as a float64 (n, 2) [delay_ns, power] array (a copy).

    `where` names the profile in error messages, e.g. "PDP_InF_Los.mat: cell 7".
    """
    if not isinstance(profile, np.ndarray) or profile.dtype.kind not in "iuf":
        kind = type(profile).__name__ if not isinstance(profile, np.ndarray) else f"{profile.dtype} array"
        raise PDPError(f"{where}: expected a real numeric n x 2 matrix [delay_ns, power], found a {kind}")
    if profile.ndim != 2 or profile.shape[1] != 2 or profile.shape[0] < 1:
        raise PDPError(f"{where}: expected an n x 2 matrix [delay_ns, power] with n >= 1 taps, "
                       f"found shape {' x '.join(map(str, profile.shape))}")
    profile = profile.astype(np.float64)
    delays, powers = profile[:, 0], profile[:, 1]
    if not np.all(np.isfinite(profile)):
        raise PDPError(f"{where}: holds NaN or infinite delays/powers; every entry must be finite")
    if np.any(delays < 0):
        raise PDPError(f"{where}: has negative delays (min {delays.min():g} ns); delays must be >= 0 ns "
                       "(shift the profile so its first tap is at 0 ns)")
    if np.any(powers < 0):
        raise PDPError(f"{where}: has negative powers (min {powers.min():g}); powers are linear, >= 0 "
                       "(convert dB values with 10**(dB/10))")
    if not np.any(powers > 0):
        raise PDPError(f"{where}: all powers are zero; a profile needs at least one tap with positive power")
    return profile


def _describe(value: object) -> str:
    if not isinstance(value, np.ndarray):
        return f"a {type(value).__name__}"
    if value.dtype.names:
        return "a struct"
    return f"a {' x '.join(map(str, value.shape))} {value.dtype} array"


def read_pdp_mat(path: str | os.PathLike) -> list[np.ndarray]:
    """Read `pdp` from a MAT file: a list of M float64 (n_i, 2) [delay_ns, power] arrays, powers as stored."""
    path = Path(path)
    if not path.is_file():
        raise PDPError(f"{path}: no such file; expected {EXPECTED_FORMAT}")
    try:
        contents = scipy.io.loadmat(path, appendmat=False)
    except NotImplementedError:
        raise PDPError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it in MATLAB with "
                       f"save('{path.name}', '{PDP_VARIABLE}', '-v7')") from None
    except Exception as e:  # scipy signals a corrupt or foreign file with many exception types
        raise PDPError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}); "
                       f"expected {EXPECTED_FORMAT}") from None
    if PDP_VARIABLE not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise PDPError(f"{path}: has no variable `{PDP_VARIABLE}` (variables found: "
                       f"{', '.join(found) if found else 'none'}); expected {EXPECTED_FORMAT}")
    cells = contents[PDP_VARIABLE]
    if not isinstance(cells, np.ndarray) or cells.dtype != object:
        raise PDPError(f"{path}: `{PDP_VARIABLE}` is {_describe(cells)}, not a cell array; expected {EXPECTED_FORMAT}")
    if cells.size == 0:
        raise PDPError(f"{path}: `{PDP_VARIABLE}` is an empty cell array; it must hold at least one profile")
    if cells.ndim != 2 or min(cells.shape) != 1:
        raise PDPError(f"{path}: `{PDP_VARIABLE}` is a {' x '.join(map(str, cells.shape))} cell array; "
                       f"expected {EXPECTED_FORMAT}")
    # MATLAB numbers cells from 1; messages use its numbering.
    return [validate_profile(cell, f"{path}: cell {i + 1} of `{PDP_VARIABLE}`") for i, cell in enumerate(cells.ravel())]


def write_pdp_mat(path: str | os.PathLike, profiles: Sequence[np.ndarray]) -> None:
    """Write profiles (each (n_i, 2) [delay_ns, power]) as a MAT file readable by `read_pdp_mat`,
    MATLAB (`load(path).pdp{i}`) and scipy."""
    if len(profiles) == 0:
        raise PDPError(f"{path}: no profiles to write; give at least one (n, 2) [delay_ns, power] array")
    cells = np.empty((1, len(profiles)), dtype=object)
    for i, profile in enumerate(profiles):
        cells[0, i] = validate_profile(np.asarray(profile), f"{path}: profile {i} of {len(profiles)}")
    scipy.io.savemat(Path(path), {PDP_VARIABLE: cells}, appendmat=False, format="5", do_compression=True)
