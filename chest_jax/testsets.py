"""Fixed test sets: generated from the TEST split of the PDPs (cached on disk under a hash of everything that
generates them), or read from the original's `<prefix>_input.npy` / `<prefix>_true.npy` files.

A test set holds, per sample: inputs (B, S, K, 2) float32 (the received frame, DMRS REs of symbol 0 divided by
their pilot), h (B, K) complex64 (the true channel), and where the source has them tx (B, S, K) complex64,
noise_var (B,) mW per RE, distance (B,) m, tap_delays_ns (B, L) and tap_powers (B, L) (what the genie LMMSE needs).
`generate_samples` is also how the baselines draw the training channels they estimate correlations from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from chest_jax import channels, ofdm
from chest_jax.config import Config, DatasetConfig, TestSetConfig, to_dict
from chest_jax.errors import UserError


class TestSetError(UserError, ValueError):
    """A test set (file or generated) cannot be used as asked; the message names it and the fix."""

    __test__ = False  # not a pytest test class despite the name


# Bump when the frame generator (ofdm.py) or the PDP sources (channels/) change what a given config
# produces, so that cached test sets are regenerated instead of silently reused.
TEST_SET_CODE_VERSION = 1

# Test sets and training correlations are generated in chunks of this many samples, independent of the
# config's training batch size, so the first n samples of a set do not depend on its size or the batch size.
GENERATION_CHUNK = 32

# Dataset keys that cannot change a test set: the test-set entry fixes the channel type and distance, the
# seed is passed explicitly, and pdp_dir is replaced by the content hash of the PDP file actually read.
_CACHE_IGNORED_DATASET_KEYS = ("channel_type", "channel_weights", "batch_size", "distance_range", "rnd_seed", "pdp_dir")

_ARRAY_NAMES = ("inputs", "h", "tx", "noise_var", "distance", "tap_delays_ns", "tap_powers")
_REQUIRED_ARRAYS = ("inputs", "h")


@dataclass


class TestSet:
    """A fixed evaluation set. `arrays` maps each of inputs (B, S, K, 2) float32, h (B, K) complex64,
    tx (B, S, K) complex64, noise_var (B,) mW per RE, distance (B,) m, tap_delays_ns (B, L) and
    tap_powers (B, L) to an array, or to None where the source lacks it (pilots-only sets have no tx,
    imported original sets have only inputs and h)."""

    __test__ = False  # not a pytest test class despite the name

    name: str
    channel_type: Optional[str]
    distance: Optional[float]  # m; None when unknown or mixed
    source: str  # "tr38901-v16", "pdp:<dir>" or "file:<prefix>"
    arrays: dict[str, Optional[np.ndarray]]
    cache_path: Optional[str] = None
    loaded_from_cache: bool = False

    def __post_init__(self) -> None:
        for key in _REQUIRED_ARRAYS:
            if self.arrays.get(key) is None:
                raise TestSetError(f"test set {self.name!r} has no {key!r} array")
        self.arrays = {key: self.arrays.get(key) for key in _ARRAY_NAMES}
        n = len(self.arrays["inputs"])
        for key, value in self.arrays.items():
            if value is not None and len(value) != n:
                raise TestSetError(f"test set {self.name!r}: {key} has {len(value)} samples, inputs has {n}")

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    @property
    def has_frames(self) -> bool:
        return self.arrays["tx"] is not None

    @property
    def has_taps(self) -> bool:
        return self.arrays["tap_delays_ns"] is not None and self.arrays["noise_var"] is not None

    def batches(self, size: int) -> Iterator["TestBatch"]:
        """Consecutive batches of `size` samples; the last one holds the remainder (nothing is dropped)."""
        if size < 1:
            raise ValueError(f"batch size must be at least 1; got {size}")
        for start in range(0, len(self), size):
            yield TestBatch(**{key: None if value is None else value[start: start + size]
                               for key, value in self.arrays.items()})


@dataclass(frozen=True)


class TestBatch:
    """A slice of a TestSet with the field names of ofdm.Batch (absent fields are None)."""

    __test__ = False

    inputs: np.ndarray
    h: np.ndarray
    tx: Optional[np.ndarray] = None
    noise_var: Optional[np.ndarray] = None
    distance: Optional[np.ndarray] = None
    tap_delays_ns: Optional[np.ndarray] = None
    tap_powers: Optional[np.ndarray] = None


def data_source(dataset: DatasetConfig) -> str:
    """Where channels come from: "pdp:<dir>" (the original's PDP files) or "tr38901-<version>" (generator)."""
    return f"pdp:{dataset.pdp_dir}" if dataset.pdp_dir is not None else f"tr38901-{dataset.tr38901_version}"


def default_name(ts: TestSetConfig) -> str:
    return f"{ts.channel_type}_{ts.distance:g}m"


def single_type_dataset(cfg: Config, channel_type: str, distance_range: tuple[float, float]) -> DatasetConfig:
    return dataclasses.replace(cfg.dataset, channel_type=(channel_type,), channel_weights=None,
                               distance_range=(float(distance_range[0]), float(distance_range[1])))


_BATCH_FNS: dict[Any, Callable] = {}


def _batch_fn(spec: ofdm.FrameSpec, full: bool) -> Callable:
    """One jitted generator per frame spec, so repeated test sets do not recompile."""
    key = (spec, full)
    if key not in _BATCH_FNS:
        _BATCH_FNS[key] = ofdm.make_batch_fn(spec, GENERATION_CHUNK, full=full)
    return _BATCH_FNS[key]


def generate_samples(dataset: DatasetConfig, part: str, num_samples: int, key: Any, full: bool
                     ) -> dict[str, np.ndarray]:
    """num_samples samples of the `part` ("train"/"val"/"test") profiles of dataset's channel types (drawn with
    its channel_weights), in chunks of GENERATION_CHUNK, as host arrays named like `TestSet.arrays`."""
    spec = ofdm.FrameSpec.from_config(dataset)
    bank = ofdm.make_bank(channels.load_split(dataset, part), dataset.channel_weights)
    fn = _batch_fn(spec, full)
    distance_range = jnp.asarray(dataset.distance_range, dtype=jnp.float32)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAY_NAMES}
    for i in range(-(-num_samples // GENERATION_CHUNK)):
        batch = fn(jax.random.fold_in(key, i), bank, distance_range)
        for name in _ARRAY_NAMES:
            value = getattr(batch, name)
            if value is not None:
                chunks[name].append(np.asarray(value))
    return {name: np.concatenate(parts)[:num_samples] for name, parts in chunks.items() if parts}


def make_test_set(cfg: Config, ts: TestSetConfig, *, seed: int, full: bool = True) -> TestSet:
    """Generate a test set: ts.num_samples samples of ts.channel_type at the fixed distance ts.distance (m),
    drawn from the TEST split of the PDPs only (disjoint from training), deterministic in (cfg, ts, seed).

    full=True generates all num_symbol symbols (needed for EVM and export); full=False pilots only (S = 1).
    """
    dataset = single_type_dataset(cfg, ts.channel_type, (ts.distance, ts.distance))
    name = default_name(ts)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))
    arrays = generate_samples(dataset, "test", ts.num_samples, key, full)
    return TestSet(name=name, channel_type=ts.channel_type, distance=float(ts.distance),
                   source=data_source(cfg.dataset), arrays=arrays)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def generation_identity(cfg: Config, ts: TestSetConfig, *, seed: int, full: bool = True) -> dict[str, Any]:
    """Everything that determines a generated test set, as plain JSON data (the cache key)."""
    dataset = {k: v for k, v in to_dict(cfg.dataset).items() if k not in _CACHE_IGNORED_DATASET_KEYS}
    pdp_file = None
    if cfg.dataset.pdp_dir is not None:
        path = Path(cfg.dataset.pdp_dir).expanduser() / f"PDP_{ts.channel_type}.mat"
        pdp_file = {"name": path.name, "sha256": _file_sha256(path) if path.is_file() else None}
    return {
        "code_version": TEST_SET_CODE_VERSION,
        "generation_chunk": GENERATION_CHUNK,
        "dataset": dataset,
        "pdp_file": pdp_file,
        "test_set": {"channel_type": ts.channel_type, "distance": float(ts.distance),
                     "num_samples": int(ts.num_samples)},
        "seed": int(seed),
        "full": bool(full),
    }


def load_or_make_test_set(cfg: Config, ts: TestSetConfig, *, seed: int, cache_dir: str | os.PathLike,
                          full: bool = True) -> TestSet:
    """`make_test_set`, cached in cache_dir as <name>_<hash>.npz beside <name>_<hash>.json.

    The JSON holds the exact generating identity (`generation_identity`: the dataset section without keys
    that cannot change the set, the content hash of the PDP file read, the test-set entry, seed, frame kind
    and TEST_SET_CODE_VERSION); its hash names the files. A cached set is reused only when the stored JSON
    equals the current identity; otherwise (or when the files are unreadable) the set is regenerated.
    """
    identity = generation_identity(cfg, ts, seed=seed, full=full)
    text = json.dumps(identity, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    stem = f"{default_name(ts)}_{'full' if full else 'pilots'}_{digest}"
    cache = Path(cache_dir)
    npz_path, json_path = cache / f"{stem}.npz", cache / f"{stem}.json"
    if npz_path.is_file() and json_path.is_file():
        try:
            stored = json.loads(json_path.read_text())
            if stored.get("identity") == json.loads(text):
                with np.load(npz_path, allow_pickle=False) as data:
                    arrays = {name: data[name] for name in data.files}
                return TestSet(name=default_name(ts), channel_type=ts.channel_type, distance=float(ts.distance),
                               source=stored["source"], arrays=arrays, cache_path=str(npz_path),
                               loaded_from_cache=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # an unreadable or foreign cache entry is regenerated below
    test_set = make_test_set(cfg, ts, seed=seed, full=full)
    cache.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so an interrupted run never leaves a half-written set that
    # a later run would trust.
    tmp_npz = cache / f".{stem}.{os.getpid()}.tmp.npz"
    np.savez(tmp_npz, **{k: v for k, v in test_set.arrays.items() if v is not None})
    tmp_json = cache / f".{stem}.{os.getpid()}.tmp.json"
    tmp_json.write_text(json.dumps({"identity": identity, "source": test_set.source,
                                    "name": test_set.name}, indent=1, sort_keys=True))
    os.replace(tmp_npz, npz_path)
    os.replace(tmp_json, json_path)
    test_set.cache_path = str(npz_path)
    return test_set


def load_original_test_set(prefix: str | os.PathLike) -> TestSet:
    """Read a test set in the original's format: `<prefix>_input.npy`, real (B, S, K, 2) (the original:
    (B, 14, 3072, 2), Y with DMRS REs divided by the pilot) and `<prefix>_true.npy`, complex (B, K).

    Only NMSE and the LS / practical-LMMSE baselines can be computed from these: they hold no taps,
    noise variance or transmitted frame (the practical LMMSE then needs the noise variance passed in).
    """
    prefix = str(prefix)
    paths = {"input": Path(f"{prefix}_input.npy"), "true": Path(f"{prefix}_true.npy")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise TestSetError(f"original test set {prefix!r}: missing {', '.join(missing)}; a test set in the "
                                "original format is the pair <prefix>_input.npy and <prefix>_true.npy")
    try:
        inputs = np.load(paths["input"], allow_pickle=False)
        h = np.load(paths["true"], allow_pickle=False)
    except ValueError as e:
        raise TestSetError(f"original test set {prefix!r}: cannot read the .npy files ({e}); they must be "
                         "plain numeric numpy arrays") from None
    if inputs.ndim != 4 or inputs.shape[-1] != 2 or not np.issubdtype(inputs.dtype, np.floating):
        raise TestSetError(f"{paths['input']}: expected a real float array (B, S, K, 2) = (samples, symbols, "
                         f"subcarriers, re/im), e.g. (100, 14, 3072, 2); got {inputs.dtype} {inputs.shape}")
    if h.ndim != 2 or not np.iscomplexobj(h):
        raise TestSetError(f"{paths['true']}: expected a complex array (B, K) = (samples, subcarriers), "
                         f"e.g. (100, 3072) complex64; got {h.dtype} {h.shape}")
    if h.shape != (inputs.shape[0], inputs.shape[2]):
        raise TestSetError(f"original test set {prefix!r}: {paths['true'].name} has shape {h.shape} but "
                         f"{paths['input'].name} {inputs.shape} implies (B, K) = "
                         f"({inputs.shape[0]}, {inputs.shape[2]})")
    return TestSet(name=Path(prefix).name, channel_type=None, distance=None, source=f"file:{prefix}",
                   arrays={"inputs": inputs.astype(np.float32), "h": h.astype(np.complex64)})


def save_original_test_set(test_set: TestSet, prefix: str | os.PathLike) -> tuple[str, str]:
    """Write `<prefix>_input.npy` (float32 (B, S, K, 2)) and `<prefix>_true.npy` (complex64 (B, K)), the
    original's format, and return both paths. Export full frames (S = num_symbol) for the original's
    scripts; taps, noise variance and tx are not part of the format and are not written."""
    input_path, true_path = f"{prefix}_input.npy", f"{prefix}_true.npy"
    Path(input_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(input_path, np.asarray(test_set.arrays["inputs"], dtype=np.float32))
    np.save(true_path, np.asarray(test_set.arrays["h"]).astype(np.complex64))
    return input_path, true_path
