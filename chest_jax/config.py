"""Typed, frozen configuration: YAML files with the original's section and key names.

A config file has the sections `dataset`, `ch_estimation` and `training` (and `compare` for
`compare.py`). Every key is declared below; an unknown key, a value of the wrong type or an
impossible value stops with a `ConfigError` naming the file, the key, the value and what is allowed.
Command-line overrides are `section.key=value` (values parsed as YAML, e.g. `training.lr=3e-4`,
`dataset.channel_type=[InF_Los]`).

One concept, kept in one module on purpose: every key of every section is declared (with its unit) and checked
here, so a reader finds a key, its default and what is allowed in one place.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from chest_jax import references
from chest_jax.errors import UserError

SCENARIOS = ("InF", "InH", "RMa", "UMa", "UMi")
CHANNEL_TYPES = tuple(f"{s}_{los}" for s in SCENARIOS for los in ("Los", "Nlos"))
LORA_TARGETS = ("mha_q_proj", "mha_k_proj", "mha_v_proj", "out_proj", "ffnn_linear1", "ffnn_linear2")
# Named subsets of LORA_TARGETS (the transfer study's target-module arms).
LORA_TARGET_GROUPS = {"attention": LORA_TARGETS[:4], "ffn": LORA_TARGETS[4:], "all": LORA_TARGETS}
# The classical estimators compare.py can score (implemented in chest_jax.baselines, which checks it has each).
BASELINES = ("ls_linear", "lmmse_robust", "lmmse_adaptive", "lmmse_pdp", "dft_ls", "lmmse_genie",
             "lmmse_practical", "lmmse_pooled")
# The frame generator draws each QAM dimension's level from 8 bits of one random word (ofdm.py).
MAX_QAM_ORDER = 4 ** 8


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names where and how to fix it."""


def dmrs_problem(dmrs: typing.Sequence[int], num_used: int) -> Optional[str]:
    """Why `dmrs` = (start, stop, step) does not select pilots among `num_used` subcarriers, or None."""
    if len(dmrs) != 3:
        return f"{list(dmrs)} must be [start, stop, step]"
    start, stop, step = dmrs
    if not (0 <= start < stop <= num_used and step > 0):
        return (f"{list(dmrs)} must be [start, stop, step] with 0 <= start < stop <= {num_used} used subcarriers "
                "and step > 0")
    return None


# Dataset keys that decide the population a model is trained and scored on: the profile pool and its split
# (which profiles are test profiles), the channel model, the frame and the link budget. Models trained on other
# channel types, distance ranges, weights, batch sizes or data seeds are still comparable on one test set;
# models trained on another pool, split or frame are not (their "test" profiles may be training profiles).
POPULATION_KEYS = ("pdp_dir", "num_profiles", "pdp_seed", "tr38901_version", "split", "split_seed",
                   "carrier_freq", "subcarrier_spacing", "fft_size", "num_guard_subcarriers", "num_symbol",
                   "cp_length", "ref_conf_dict", "mod_order", "transmit_power", "noise_spectral_density",
                   "is_channel", "is_noise", "max_random_tap_delay_cp_proportion")


def population_differences(trained: "DatasetConfig", scored: "DatasetConfig") -> list[str]:
    """`dataset.<key>: trained X, compare Y` for each POPULATION_KEYS entry that differs."""
    a, b = to_dict(trained), to_dict(scored)
    return [f"dataset.{k}: trained {a[k]!r}, compare {b[k]!r}" for k in POPULATION_KEYS if a[k] != b[k]]


def mod_order_problem(mod_order: int) -> Optional[str]:
    """Why `mod_order` is not a square QAM order the generator supports (4, 16, 64, ..., MAX_QAM_ORDER), or None."""
    levels = math.isqrt(mod_order) if mod_order > 0 else 0
    if mod_order >= 4 and levels * levels == mod_order and levels & (levels - 1) == 0 and mod_order <= MAX_QAM_ORDER:
        return None
    return f"{mod_order} must be a square QAM order: 4, 16, 64, 256, ..., {MAX_QAM_ORDER}"


@dataclass(frozen=True)
class RefConfDict:
    dmrs: tuple[int, int, int] = (0, 3072, 6)  # range(start, stop, step) over used subcarriers, symbol 0


@dataclass(frozen=True)
class DatasetConfig:
    channel_type: tuple[str, ...] = CHANNEL_TYPES
    channel_weights: Optional[tuple[float, ...]] = None  # None: scenarios drawn uniformly
    batch_size: int = 32
    noise_spectral_density: float = -174.0  # dBm/Hz
    subcarrier_spacing: float = 120.0  # kHz
    transmit_power: float = 30.0  # dBm
    distance_range: tuple[float, float] = (10.0, 500.0)  # m
    carrier_freq: float = 28.0  # GHz
    mod_order: int = 64
    ref_conf_dict: RefConfDict = field(default_factory=RefConfDict)
    fft_size: int = 4096
    num_guard_subcarriers: int = 1024
    num_symbol: int = 14
    cp_length: float = 590.0  # ns
    max_random_tap_delay_cp_proportion: float = 0.2
    rnd_seed: int = 0
    is_channel: bool = True
    is_noise: bool = True
    # PDP sources: `PDP_<type>.mat` files in pdp_dir, else the built-in TR 38.901 generator.
    pdp_dir: Optional[str] = None
    num_profiles: int = 1000  # generated profiles per channel type (the original's files hold 1000)
    pdp_seed: int = 0  # seed of the generated profile pool (independent of rnd_seed)
    tr38901_version: Literal["v16", "rel19"] = "v16"
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test profile fractions
    split_seed: int = 0

    @property
    def num_used_subcarriers(self) -> int:
        return self.fft_size - self.num_guard_subcarriers

    @property
    def cp_fraction(self) -> float:
        """The cyclic prefix as a fraction of the OFDM symbol (cp_length ns x subcarrier_spacing kHz x 1e-6):
        the delay range a channel may occupy, in the units `chest_jax.references` works in."""
        return self.cp_length * self.subcarrier_spacing * 1e-6


@dataclass(frozen=True)
class CondConfig:
    length: int = 3072
    in_channels: int = 2
    step_size: int = 12
    steps_per_token: int = 1


@dataclass(frozen=True)
class TransformerConfig:
    length: int = 3072
    channels: int = 2
    num_layers: int = 4
    d_model: int = 128
    n_token: int = 256
    n_head: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    activation: Literal["relu", "gelu"] = "relu"


@dataclass(frozen=True)
class PeftConfig:
    peft_type: Literal["LORA"] = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = LORA_TARGETS


@dataclass(frozen=True)
class ChEstimationConfig:
    cond: CondConfig = field(default_factory=CondConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    peft: Optional[PeftConfig] = None
    # chest-jax variant, off by default: "add" makes the transformer predict a correction added to a classical
    # estimate of the pilots (`reference`), its output layer zero-initialised, so training starts exactly at that
    # estimate; "gated" the same with each token's share of the reference also scaled by 1 + a learned gate of
    # its state (zero-initialised too), so the model can turn a noisy reference down at low SNR. The PyTorch
    # original cannot represent either (export refuses them).
    residual: Literal["none", "add", "gated"] = "none"
    # What a residual variant corrects (chest_jax.references, the baselines of the same names): "ls_linear" (LS +
    # linear interpolation), "lmmse_robust" (LMMSE with a uniform power-delay profile over the cyclic prefix),
    # "lmmse_adaptive" (LMMSE with the profile chosen per sample by maximum likelihood) or "lmmse_pdp" (LMMSE with
    # the profile estimated per sample from the pilots' periodogram; one Cholesky solve per sample, the costliest).
    # The LMMSEs estimate the noise from the pilots, and with them the correction is made in units of the
    # estimated noise amplitude.
    reference: Literal["ls_linear", "lmmse_robust", "lmmse_adaptive", "lmmse_pdp"] = "ls_linear"
    # chest-jax variant, off by default: "pilots" starts each query token from its own condition token (the
    # pilots of the same subcarriers, through a learned Linear `_query_proj`) added to the learned embedding, so
    # the local pilots reach the output without passing through a softmax mixture (the original's learned
    # queries see them only through cross-attention). Needs cond and transformer n_token equal. The PyTorch
    # original cannot represent it (export refuses it).
    queries: Literal["learned", "pilots"] = "learned"


@dataclass(frozen=True)
class TrainingConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-6
    max_norm: float = 1.0  # global-norm gradient clipping; 0 disables
    num_iter: int = 1_000_000
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9  # sgd only
    use_scheduler: bool = True
    num_warmup_steps: int = 1000
    # With use_scheduler: "cosine" (the original's) decays from the end of the warmup to 0 at num_iter; "wsd"
    # (warmup-stable-decay) holds lr until the last decay_fraction of num_iter, then decays linearly to 0. The
    # scaling study saw the preset's models leave their plateau only late, after the cosine had already lowered
    # the rate; wsd keeps the full rate longer at the same budget.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd only
    ch_loss_weight: float = 1.0
    logging_step: int = 10
    evaluation_step: int = 1000
    evaluation_batch_size: int = 4  # samples plotted at each evaluation
    validation_size: int = 256  # fixed validation samples scored at each evaluation
    # Also scored at each evaluation: validation samples at these fixed distances (m), so the log shows the
    # high-SNR end that the mean over the distance range hides; () turns it off.
    validation_distances: tuple[float, ...] = (10.0, 50.0, 150.0, 300.0, 500.0)
    validation_distance_samples: int = 32
    loss: Literal["nmse", "nmse_db"] = "nmse"  # chest_jax.losses; nmse is the original's
    model_save_step: int = 100_000
    saved_model_name: str = "estimator_v4_base"
    output_dir: str = "runs"  # the run directory is output_dir/saved_model_name
    # The base run directory or checkpoint to start from: train_lora.py adapts it; train_base.py fine-tunes all of
    # its parameters (the full fine-tuning control of a transfer study).
    pretrained_model_name: Optional[str] = None
    model_load_mode: Literal["pretrained", "finetune"] = "pretrained"
    use_wandb: bool = False
    wandb_proj: str = "chest-jax"
    wandb_mode: Literal["offline", "online"] = "offline"
    device: Literal["auto", "cpu", "gpu", "tpu"] = "auto"
    precision: Literal["float32", "bfloat16"] = "float32"  # bfloat16: bf16 matmul operands, float32 accumulation
    nan_policy: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 100  # with nan_policy=skip: stop after this many non-finite steps

    @property
    def wsd_decay_steps(self) -> int:
        """The steps of the wsd schedule's final linear decay: decay_fraction of num_iter, rounded."""
        return round(self.decay_fraction * self.num_iter)


@dataclass(frozen=True)
class TestSetConfig:
    channel_type: str = "InF_Los"
    distance: float = 50.0  # m, fixed for every sample
    num_samples: int = 100


@dataclass(frozen=True)
class CompareConfig:
    models: tuple[str, ...] = ()  # run directories, checkpoints or `base+adapter` pairs
    test_sets: tuple[TestSetConfig, ...] = (
        TestSetConfig("InF_Los", 50.0, 100),
        TestSetConfig("RMa_Los", 300.0, 100),
    )
    distances: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0)  # NMSE-vs-distance curves
    curve_samples: int = 50
    seed: int = 1234
    baselines: tuple[str, ...] = BASELINES  # every classical estimator (chest_jax.baselines)
    lmmse_train_samples: int = 2000  # samples of the training split used to estimate the practical correlation
    cache_dir: str = ".cache/testsets"
    out_dir: str = "results"
    # Test sets in the original's format, scored beside the generated ones: each a prefix of the pair
    # <prefix>_input.npy / <prefix>_true.npy (compare.py --test-set PREFIX).
    original_test_sets: tuple[str, ...] = ()
    # Score models trained on another profile pool / split / frame than `dataset` (marked in the table).
    allow_population_mismatch: bool = False
    # The precision the models compute in: null, each as it was trained (its training.precision); bfloat16 runs
    # float32-trained models with bfloat16 matmul operands (float32 accumulation), faster on CPUs with avx512_bf16.
    precision: Optional[Literal["float32", "bfloat16"]] = None


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    ch_estimation: ChEstimationConfig = field(default_factory=ChEstimationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------
# Building typed objects from plain data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values [{', '.join(_type_name(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _build(tp: Any, value: Any, key: str, source: str) -> Any:
    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: {value!r} is not valid; expected {_type_name(tp)}")

    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            fail()
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, key, source)
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis and args[0] is str and isinstance(value, str):
                return (value,)
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail()
        return tuple(_build(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail()
        return _build_dataclass(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported config type {tp}")


def _build_dataclass(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(where + str(k) for k in unknown)}; allowed keys{' in ' + prefix if prefix else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {k: _build(hints[k], v, f"{prefix}.{k}" if prefix else k, source) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Semantic validation


def _check(ok: bool, source: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key}: {value!r} is not allowed; {allowed}")


def _validate_dataset(d: DatasetConfig, source: str) -> None:
    for i, ct in enumerate(d.channel_type):
        _check(ct in CHANNEL_TYPES, source, f"dataset.channel_type[{i}]", ct,
               f"known channel types: {', '.join(CHANNEL_TYPES)}")
    _check(len(d.channel_type) > 0, source, "dataset.channel_type", list(d.channel_type), "give at least one type")
    if d.channel_weights is not None:
        _check(len(d.channel_weights) == len(d.channel_type) and all(w >= 0 for w in d.channel_weights)
               and sum(d.channel_weights) > 0, source, "dataset.channel_weights", list(d.channel_weights),
               "give one non-negative weight per channel_type, not all zero")
    _check(d.batch_size > 0, source, "dataset.batch_size", d.batch_size, "must be positive")
    lo, hi = d.distance_range
    _check(0 < lo <= hi, source, "dataset.distance_range", [lo, hi],
           "distances in m must be positive with low <= high")
    _check(d.subcarrier_spacing > 0, source, "dataset.subcarrier_spacing", d.subcarrier_spacing,
           "must be positive (kHz)")
    _check(d.carrier_freq > 0, source, "dataset.carrier_freq", d.carrier_freq, "must be positive (GHz)")
    _check(mod_order_problem(d.mod_order) is None, source, "dataset.mod_order", d.mod_order,
           mod_order_problem(d.mod_order) or "")
    _check(d.fft_size > 0 and 0 <= d.num_guard_subcarriers < d.fft_size, source, "dataset.num_guard_subcarriers",
           d.num_guard_subcarriers, f"must be in [0, fft_size={d.fft_size})")
    k = d.num_used_subcarriers
    _check(dmrs_problem(d.ref_conf_dict.dmrs, k) is None, source, "dataset.ref_conf_dict.dmrs",
           list(d.ref_conf_dict.dmrs), dmrs_problem(d.ref_conf_dict.dmrs, k) or "")
    _check(d.num_symbol >= 1, source, "dataset.num_symbol", d.num_symbol, "must be at least 1")
    _check(d.cp_length > 0, source, "dataset.cp_length", d.cp_length, "must be positive (ns)")
    _check(0 <= d.max_random_tap_delay_cp_proportion <= 1, source, "dataset.max_random_tap_delay_cp_proportion",
           d.max_random_tap_delay_cp_proportion, "must be in [0, 1]")
    _check(d.num_profiles >= 3, source, "dataset.num_profiles", d.num_profiles, "must be at least 3 (train/val/test)")
    _check(all(f > 0 for f in d.split) and abs(sum(d.split) - 1) < 1e-6, source, "dataset.split", list(d.split),
           "must be three positive fractions (train, validation, test) summing to 1")
    if d.pdp_dir is not None:
        _check(Path(d.pdp_dir).expanduser().is_dir(), source, "dataset.pdp_dir", d.pdp_dir,
               "must be an existing directory holding PDP_<type>.mat files (or null for the 38.901 generator)")


def _validate_model(m: ChEstimationConfig, k: int, source: str) -> None:
    c, tr = m.cond, m.transformer
    _check(c.length > 0 and c.step_size > 0 and c.length % c.step_size == 0, source, "ch_estimation.cond.length",
           c.length, f"must be a positive multiple of ch_estimation.cond.step_size={c.step_size}")
    _check(c.length == k, source, "ch_estimation.cond.length", c.length,
           f"must equal the used subcarriers fft_size - num_guard_subcarriers = {k}")
    _check(c.in_channels == 2, source, "ch_estimation.cond.in_channels", c.in_channels, "must be 2 (re, im)")
    _check(c.steps_per_token == 1, source, "ch_estimation.cond.steps_per_token", c.steps_per_token,
           "only 1 is supported (as the original's Estimator_v4 used)")
    _check(tr.length == c.length, source, "ch_estimation.transformer.length", tr.length,
           f"must equal ch_estimation.cond.length={c.length}")
    _check(tr.channels == 2, source, "ch_estimation.transformer.channels", tr.channels, "must be 2 (re, im)")
    _check(tr.n_token > 0 and tr.length % tr.n_token == 0, source, "ch_estimation.transformer.n_token", tr.n_token,
           f"must divide ch_estimation.transformer.length={tr.length}")
    _check(tr.num_layers >= 1, source, "ch_estimation.transformer.num_layers", tr.num_layers, "must be at least 1")
    _check(tr.n_head >= 1 and tr.d_model % tr.n_head == 0, source, "ch_estimation.transformer.n_head", tr.n_head,
           f"must divide d_model={tr.d_model}")
    _check(tr.dim_feedforward >= 1, source, "ch_estimation.transformer.dim_feedforward", tr.dim_feedforward,
           "must be positive")
    _check(0 <= tr.dropout < 1, source, "ch_estimation.transformer.dropout", tr.dropout, "must be in [0, 1)")
    if m.peft is not None:
        p = m.peft
        _check(p.r >= 1, source, "ch_estimation.peft.r", p.r, "must be a positive rank")
        _check(p.lora_alpha > 0, source, "ch_estimation.peft.lora_alpha", p.lora_alpha, "must be positive")
        _check(0 <= p.lora_dropout < 1, source, "ch_estimation.peft.lora_dropout", p.lora_dropout, "must be in [0, 1)")
        for i, name in enumerate(p.target_modules):
            _check(name in LORA_TARGETS, source, f"ch_estimation.peft.target_modules[{i}]", name,
                   f"target modules are matched by name among: {', '.join(LORA_TARGETS)}")
        _check(len(p.target_modules) > 0, source, "ch_estimation.peft.target_modules", [], "name at least one module")


def _validate_training(t: TrainingConfig, source: str) -> None:
    _check(t.lr > 0, source, "training.lr", t.lr, "must be positive")
    _check(t.weight_decay >= 0, source, "training.weight_decay", t.weight_decay, "must be >= 0")
    _check(t.max_norm >= 0, source, "training.max_norm", t.max_norm, "must be >= 0 (0 disables clipping)")
    _check(t.num_iter >= 1, source, "training.num_iter", t.num_iter, "must be at least 1")
    _check(0 <= t.num_warmup_steps < t.num_iter or not t.use_scheduler, source, "training.num_warmup_steps",
           t.num_warmup_steps, f"must be in [0, num_iter={t.num_iter})")
    _check(0 < t.decay_fraction <= 1, source, "training.decay_fraction", t.decay_fraction, "must be in (0, 1]")
    if t.use_scheduler and t.schedule == "wsd":
        decay_steps = t.wsd_decay_steps
        _check(t.num_warmup_steps + decay_steps <= t.num_iter, source, "training.num_warmup_steps",
               t.num_warmup_steps, f"with schedule wsd, warmup plus the decay ({decay_steps} steps = decay_fraction "
               f"{t.decay_fraction} x num_iter) must fit in num_iter={t.num_iter}: lower one of them")
    _check(0 <= t.momentum < 1, source, "training.momentum", t.momentum, "must be in [0, 1)")
    _check(all(x > 0 for x in t.validation_distances), source, "training.validation_distances",
           list(t.validation_distances), "must be positive distances in m (or [] for none)")
    for name in ("logging_step", "evaluation_step", "model_save_step", "validation_size", "evaluation_batch_size",
                 "validation_distance_samples"):
        _check(getattr(t, name) >= 1, source, f"training.{name}", getattr(t, name), "must be at least 1")
    _check(t.ch_loss_weight > 0, source, "training.ch_loss_weight", t.ch_loss_weight, "must be positive")
    _check(bool(t.saved_model_name) and "/" not in t.saved_model_name, source, "training.saved_model_name",
           t.saved_model_name, "must be a non-empty name without '/'")


def _validate_compare(cmp_: CompareConfig, source: str) -> None:
    for i, ts in enumerate(cmp_.test_sets):
        _check(ts.channel_type in CHANNEL_TYPES, source, f"compare.test_sets[{i}].channel_type", ts.channel_type,
               f"known channel types: {', '.join(CHANNEL_TYPES)}")
        _check(ts.distance > 0, source, f"compare.test_sets[{i}].distance", ts.distance, "must be positive (m)")
        _check(ts.num_samples >= 1, source, f"compare.test_sets[{i}].num_samples", ts.num_samples, "must be >= 1")
    for i, b in enumerate(cmp_.baselines):
        _check(b in BASELINES, source, f"compare.baselines[{i}]", b, f"allowed: {', '.join(BASELINES)}")
    _check(all(x > 0 for x in cmp_.distances), source, "compare.distances", list(cmp_.distances), "must be positive")


def validate(cfg: Config, source: str = "<config>") -> Config:
    """Check every value that types alone cannot (ranges, divisibility, cross-key consistency); raise ConfigError
    naming the key, the value and what is allowed."""
    _validate_dataset(cfg.dataset, source)
    _validate_model(cfg.ch_estimation, cfg.dataset.num_used_subcarriers, source)
    m = cfg.ch_estimation
    _check(m.reference == "ls_linear" or m.residual != "none", source, "ch_estimation.reference", m.reference,
           "it names what a residual variant corrects: set ch_estimation.residual (add or gated) too, or leave "
           "reference at ls_linear")
    if m.residual != "none" and m.reference.startswith("lmmse"):
        problem = references.lmmse_problem(tuple(cfg.dataset.ref_conf_dict.dmrs), cfg.dataset.cp_fraction)
        _check(problem is None, source, "ch_estimation.reference", m.reference, problem or "")
    _validate_training(cfg.training, source)
    _validate_compare(cfg.compare, source)
    return cfg


# ---------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. training.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. dataset.batch_size=64)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e.problem})") from None
    return parts, value


def _apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(data: dict, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must hold a mapping of sections "
                          "(dataset, ch_estimation, training, compare)")
    if "_base_" in data:
        raise ConfigError(f"{source}: _base_ must be resolved before from_dict")
    cfg = _build_dataclass(Config, data, "", source)
    return validate(cfg, source)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file; a top-level `_base_: other.yaml` (relative to this file) is merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the file must hold a mapping of sections (dataset, ch_estimation, training)")
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to {base_path}")
    return deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), data)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, merging nested dicts key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `section.key=value` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value, text)
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return from_dict(data, source)


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

