"""Power-delay-profile (PDP) sources: the original's `PDP_<type>.mat` files or the TR 38.901 generator.

A PDP is a tap list [delay_ns, linear power] whose powers sum to 1; a `PDPSet` holds all profiles of
one channel type, zero padded to a common tap count so the frame generator can index them. Path loss
is not part of a PDP (it is applied later, from the distance).

`load_pdp_set` picks the source from the dataset config: `dataset.pdp_dir` set -> the file
`PDP_<type>.mat` there; otherwise `dataset.num_profiles` generated profiles (`tr38901.py`). Profiles
are split once into disjoint train / val / test parts (`split_indices`, `load_split`), so test PDPs
never appear in training.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from chest_jax.config import DatasetConfig
from chest_jax.channels import tr38901
from chest_jax.channels.matio import PDPError, read_pdp_mat, validate_profile, write_pdp_mat

__all__ = ["PDPError", "PDPSet", "SPLIT_PARTS", "load_pdp_set", "load_split", "read_pdp_mat", "rms_delay_spread_ns",
           "split_indices", "write_pdp_mat"]

SPLIT_PARTS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class PDPSet:
    """The profiles of one channel type, zero padded to L = max taps. Arrays are read-only (sets are cached).

    delays_ns (M, L) float64 ns; powers (M, L) float64 linear, each row summing to 1; num_taps (M,) int64.
    """

    name: str  # channel type, e.g. "InF_Los"
    source: str  # where the profiles come from (generator settings or file path)
    delays_ns: np.ndarray
    powers: np.ndarray
    num_taps: np.ndarray

    def __post_init__(self) -> None:
        delays = np.array(self.delays_ns, dtype=np.float64)
        powers = np.array(self.powers, dtype=np.float64)
        num_taps = np.array(self.num_taps, dtype=np.int64)
        if delays.ndim != 2 or delays.shape != powers.shape or num_taps.shape != delays.shape[:1]:
            raise ValueError(f"PDPSet {self.name}: delays_ns {delays.shape} and powers {powers.shape} must be the "
                             f"same (M, L) shape and num_taps {num_taps.shape} must be (M,)")
        if delays.shape[0] == 0:
            raise PDPError(f"PDPSet {self.name} ({self.source}): holds no profiles; give at least one")
        if np.any(num_taps < 1) or np.any(num_taps > delays.shape[1]):
            raise ValueError(f"PDPSet {self.name}: num_taps must be in [1, {delays.shape[1]}]")
        for array in (delays, powers, num_taps):
            array.setflags(write=False)
        object.__setattr__(self, "delays_ns", delays)
        object.__setattr__(self, "powers", powers)
        object.__setattr__(self, "num_taps", num_taps)

    def __len__(self) -> int:
        return int(self.num_taps.shape[0])

    def __repr__(self) -> str:
        return (f"PDPSet(name={self.name!r}, {len(self)} profiles, {self.num_taps.min()}-{self.num_taps.max()} taps, "
                f"source={self.source!r})")

    def profile(self, i: int) -> np.ndarray:
        """Profile i as a (num_taps[i], 2) array [delay_ns, power]."""
        n = self.num_taps[i]
        return np.stack([self.delays_ns[i, :n], self.powers[i, :n]], axis=1)

    def subset(self, indices: np.ndarray) -> "PDPSet":
        """The profiles at `indices` (in that order), padded to their own maximum tap count."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or indices.size == 0:
            raise ValueError(f"PDPSet {self.name}: subset needs a non-empty 1-D index array, got shape {indices.shape}")
        if indices.min() < -len(self) or indices.max() >= len(self):
            raise IndexError(f"PDPSet {self.name}: subset index out of range for {len(self)} profiles")
        num_taps = self.num_taps[indices]
        width = int(num_taps.max())
        return PDPSet(self.name, self.source, self.delays_ns[indices, :width], self.powers[indices, :width], num_taps)

    @staticmethod
    def from_profiles(name: str, source: str, profiles: Sequence[np.ndarray]) -> "PDPSet":
        """Pack (n_i, 2) [delay_ns, power] tap lists, each normalised to unit total power (tap order kept)."""
        if len(profiles) == 0:
            raise PDPError(f"{source}: holds no profiles for {name}; give at least one (n, 2) [delay_ns, power] array")
        checked = [validate_profile(np.asarray(p), f"{source}: profile {i} of {name}") for i, p in enumerate(profiles)]
        num_taps = np.array([p.shape[0] for p in checked], dtype=np.int64)
        delays = np.zeros((len(checked), int(num_taps.max())))
        powers = np.zeros_like(delays)
        for i, p in enumerate(checked):
            delays[i, : p.shape[0]] = p[:, 0]
            powers[i, : p.shape[0]] = p[:, 1] / p[:, 1].sum()
        return PDPSet(name, source, delays, powers, num_taps)


def rms_delay_spread_ns(profile: np.ndarray) -> float:
    """RMS delay spread in ns of one (n, 2) [delay_ns, power] profile (powers of any scale, linear)."""
    profile = np.asarray(profile, dtype=np.float64)
    if profile.ndim != 2 or profile.shape[1] != 2 or profile.shape[0] < 1:
        raise ValueError(f"expected an (n, 2) [delay_ns, power] profile, got shape {profile.shape}")
    delays, powers = profile[:, 0], profile[:, 1]
    total = powers.sum()
    if not total > 0:
        raise ValueError("the profile's powers sum to zero; the delay spread is undefined")
    mean = np.dot(powers, delays) / total
    return float(np.sqrt(max(np.dot(powers, (delays - mean) ** 2) / total, 0.0)))


def _mat_path(pdp_dir: str, channel_type: str) -> Path:
    directory = Path(pdp_dir).expanduser()
    if not directory.is_dir():
        raise PDPError(f"dataset.pdp_dir {pdp_dir!r} is not a directory; point it at a folder of PDP_<type>.mat "
                       "files or set it to null to use the built-in TR 38.901 generator")
    path = directory / f"PDP_{channel_type}.mat"
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("PDP_*.mat"))
        raise PDPError(f"{path} does not exist (dataset.pdp_dir={pdp_dir!r} holds "
                       f"{', '.join(present) if present else 'no PDP_*.mat files'}); add PDP_{channel_type}.mat, "
                       f"remove {channel_type} from dataset.channel_type, or set dataset.pdp_dir to null to generate "
                       "TR 38.901 profiles")
    return path


@functools.lru_cache(maxsize=64)
def _load_mat_set(channel_type: str, path: str, mtime_ns: int, size: int) -> PDPSet:
    # mtime_ns and size are part of the cache key only, so an edited file is read again.
    return PDPSet.from_profiles(channel_type, path, read_pdp_mat(path))


@functools.lru_cache(maxsize=64)
def _generate_set(channel_type: str, num_profiles: int, seed: int, version: str, carrier_freq_ghz: float) -> PDPSet:
    drops = tr38901.generate_drops(channel_type, num_profiles, seed, version=version,
                                   carrier_freq_ghz=carrier_freq_ghz)
    source = (f"TR 38.901 {version} generator (pdp_seed={seed}, {num_profiles} profiles, "
              f"fc={carrier_freq_ghz:g} GHz)")
    if drops.params.extrapolated:
        source += "; RMa table extrapolated beyond its 7 GHz range"
    return PDPSet.from_profiles(channel_type, source, drops.profiles)


def load_pdp_set(channel_type: str, cfg: DatasetConfig) -> PDPSet:
    """The PDP set of `channel_type` ("InF_Los", ...) per `cfg`: `PDP_<type>.mat` from cfg.pdp_dir when set,
    else cfg.num_profiles TR 38.901 profiles (cfg.pdp_seed, cfg.tr38901_version, cfg.carrier_freq GHz).
    Cached per process; the returned arrays are read-only."""
    if cfg.pdp_dir is not None:
        path = _mat_path(cfg.pdp_dir, channel_type)
        stat = path.stat()
        return _load_mat_set(channel_type, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return _generate_set(channel_type, cfg.num_profiles, cfg.pdp_seed, cfg.tr38901_version, float(cfg.carrier_freq))


def split_indices(num_profiles: int, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint sorted index arrays {"train", "val", "test"} covering range(num_profiles), from a permutation
    seeded by `seed`. val and test get round(fraction * num_profiles) profiles but at least one each;
    train gets the rest."""
    if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {tuple(fractions)} must be three positive numbers (train, val, test) "
                         "summing to 1 (dataset.split)")
    num_val, num_test = (max(1, int(np.floor(f * num_profiles + 0.5))) for f in fractions[1:])
    num_train = num_profiles - num_val - num_test
    if num_train < 1:
        raise PDPError(f"a set of {num_profiles} profiles is too small to split into train/val/test with fractions "
                       f"{tuple(fractions)} (each part needs at least one profile); use more profiles "
                       "(dataset.num_profiles or a larger PDP file) or change dataset.split")
    permutation = np.random.default_rng(seed).permutation(num_profiles)
    bounds = np.cumsum([num_train, num_val])
    parts = np.split(permutation, bounds)
    return {name: np.sort(part) for name, part in zip(SPLIT_PARTS, parts)}


def load_split(cfg: DatasetConfig, part: str) -> list[PDPSet]:
    """One PDPSet per cfg.channel_type (in that order), restricted to `part` ("train", "val" or "test")."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"unknown split part {part!r}; use one of {', '.join(SPLIT_PARTS)}")
    sets = []
    for channel_type in cfg.channel_type:
        full = load_pdp_set(channel_type, cfg)
        sets.append(full.subset(split_indices(len(full), cfg.split, cfg.split_seed)[part]))
    return sets
