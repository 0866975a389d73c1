"""Power-delay profiles from the 3GPP TR 38.901 fast-fading model (section 7.5, steps 4-6 and 11).

Each drop (one link) draws its large-scale parameters and turns them into a tap list
[delay_ns, linear power] whose powers sum to 1; path loss is applied later, from the distance.

LoS drops are not Ricean: the LoS ray is the tap at delay 0 with power K_R / (K_R + 1), and the frame generator
(`chest_jax.ofdm`) fades it like every other tap (a complex Gaussian gain), as the original did (SPEC.md section
1). The K-factor thus shapes the profile, not the fading statistics; there is no deterministic specular term.

Per drop, for the scenario's row of Table 7.5-6 (`tr38901_params.csv`, or `tr38901_params_rel19.csv`
with version="rel19"):
  1. lgDS ~ N(mu, sigma) and, for LoS, K [dB] ~ N(mu_K, sigma_K), drawn jointly with the tabulated
     DS-K correlation.
  2. Step 5: N exponential cluster delays with mean r_tau * DS, shifted so the first is at 0 and
     sorted; for LoS the output delays are divided by C_tau(K), the cubic in the drawn K [dB].
  3. Step 6: cluster powers exp(-tau (r_tau - 1) / (r_tau DS)) * 10^(-Z/10), Z ~ N(0, zeta^2) dB,
     on the *unscaled* delays, normalised to 1.
  4. Clusters more than `remove_below_db` (25 dB) below the strongest are removed. In LoS the
     comparison uses the LoS-inclusive powers P_n / (K_R + 1) + [n = 1] K_R / (K_R + 1), as the TR
     text orders it and ns-3 implements it (TR38901.md caveat 6). With a strong LoS ray this removes
     weak late clusters and lowers the realised LoS delay spread: measured over 20000 drops, the
     median rms DS / drawn DS is 0.79 (UMi), 0.82 (UMa), 0.87 (RMa), 0.93 (InH), 0.80 (InF), against
     1.01-1.06 with `los_inclusive_removal=False` (NLoS-normalised comparison). NLoS: 0.93-0.97.
  5. Step 11: the two strongest remaining clusters, ranked by their NLoS-normalised powers, become
     three sub-cluster taps at tau, tau + 1.28 c_DS, tau + 2.56 c_DS with 10/20, 6/20, 4/20 of
     the cluster power (Table 7.5-5). c_DS = 3.91 ns where the table has none (RMa, InH, InF).
  6. LoS: every NLoS tap is scaled by 1 / (K_R + 1) and the LoS ray, K_R / (K_R + 1), is added at
     delay 0. It is merged into the first cluster's tap there (powers added), so delays stay
     unique, as in the original's `.mat` files. Downstream every tap fades independently
     (Rayleigh), and two independent complex Gaussian taps at one delay are distributed as one tap
     with their summed power, so merging changes nothing statistically.
  7. The removed clusters' power is restored by renormalising the tap list to sum 1, and delays are
     re-referenced to the first remaining tap (only matters when an NLoS drop loses cluster 1).

Decisions and caveats (see shared/TR38901.md):
  * The default table is the V16.1-V18 one; Rel-19's UMi/UMa delay-spread refit is version="rel19".
  * InF uses V/S = 4.0 m (the 120 x 60 x 10 m hall) for both LoS and NLoS.
  * RMa: Table 7.5-6 is specified only up to 7 GHz. Above 7 GHz (e.g. the default 28 GHz) the RMa
    rows are an *extrapolation*: the same frequency-independent values are reused, as Sionna and
    ns-3 do. `ScenarioParams.extrapolated` records it.
  * C_tau is applied exactly as specified and K is not clipped: for large K (about 25 dB) it stretches
    the LoS delays up to 12.8x. The number of strongly stretched drops is logged.
  * The realised rms delay spread of a tap list only approximates the drawn DS.

Randomness: each (seed, channel type) pair has its own stream, with independent sub-streams for the
large-scale parameters, the delays and the shadowing, each drawn row by row, so the first k profiles
of a larger pool equal a pool of k profiles.
"""
from __future__ import annotations

import ast
import csv
import functools
import io
import logging
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

VERSIONS = ("v16", "rel19")
TABLE_FILES = {"v16": "tr38901_params.csv", "rel19": "tr38901_params_rel19.csv"}
_TABLE_SCENARIO = {"UMi": "UMi-StreetCanyon", "UMa": "UMa", "RMa": "RMa", "InH": "InH-Office", "InF": "InF"}

# Cross-correlation of lgDS and K in the LoS columns of Table 7.5-6 (TR38901.md section 1a).
_RHO_DS_K = {"UMi": -0.7, "UMa": -0.4, "RMa": 0.0, "InH": -0.5, "InF": -0.7}

# Below these frequencies the LSP formulas are evaluated at the clip value (TR38901.md section 1c).
_FC_FLOOR_GHZ = {"UMi": 2.0, "UMa": 6.0, "InH": 6.0}
_FC_RANGE_GHZ = (0.5, 100.0)
_RMA_TABLE_MAX_GHZ = 7.0

# InF hall 120 x 60 x 10 m: V = 72000 m^3, S = 18000 m^2 (walls, floor, ceiling), V/S = 4.0 m.
_INF_HALL_M = (120.0, 60.0, 10.0)

# Table 7.5-5: (delay offset in units of c_DS, fraction of the cluster power) per sub-cluster.
SUBCLUSTERS = ((0.0, 10 / 20), (1.28, 6 / 20), (2.56, 4 / 20))
NUM_STRONGEST_SPLIT = 2


@dataclass(frozen=True)
class ScenarioParams:
    """One row of Table 7.5-6, evaluated at a carrier frequency. lgDS = log10(DS / 1 s)."""

    channel_type: str  # e.g. "InF_Los"
    table_row: str  # e.g. "InF LOS"
    los: bool
    version: str  # "v16" or "rel19"
    carrier_freq_ghz: float
    mu_lg_ds: float
    sigma_lg_ds: float
    r_tau: float  # delay scaling parameter
    n_clusters: int  # N before the cluster removal
    zeta_db: float  # per-cluster shadowing std
    k_mu_db: Optional[float]  # Ricean K-factor mean (LoS only)
    k_sigma_db: Optional[float]
    rho_ds_k: Optional[float]  # correlation of lgDS and K (LoS only)
    c_ds_ns: float  # intra-cluster delay spread for the sub-cluster split
    extrapolated: bool  # the table is used outside its specified frequency range (RMa above 7 GHz)

    @property
    def median_ds_ns(self) -> float:
        return 10.0 ** (self.mu_lg_ds + 9.0)


@dataclass(frozen=True, eq=False)
class Drops:
    """Generated profiles and the per-drop draws behind them (arrays of shape (num_profiles,))."""

    params: ScenarioParams
    profiles: list[np.ndarray]  # each (n_taps, 2) [delay_ns, power], powers sum to 1, sorted by delay
    lg_ds: np.ndarray  # drawn log10(DS / 1 s)
    k_db: np.ndarray  # drawn K-factor in dB; NaN for NLoS
    c_tau: np.ndarray  # LoS delay scaling (1 for NLoS)
    num_clusters_kept: np.ndarray  # clusters left after the removal, before the sub-cluster split
    los_power: np.ndarray  # linear power of the LoS ray in the final (renormalised) profile; 0 for NLoS


def _read_table_text(version: str) -> str:
    return resources.files(__package__).joinpath(TABLE_FILES[version]).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _table(version: str) -> dict[tuple[str, bool], dict[str, str]]:
    lines = [line for line in io.StringIO(_read_table_text(version)) if not line.lstrip().startswith("#")]
    rows = {}
    for row in csv.DictReader(lines):
        rows[(row["scenario"], row["los"] == "LOS")] = row
    return rows


_FORMULA_FUNCTIONS = {"log10": math.log10}
_FORMULA_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                      ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _eval_formula(text: str, variables: dict[str, float]) -> float:
    """Evaluate a table formula such as "-0.24*log10(1+fc)-7.14" (numbers, + - * /, log10, names)."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in variables:
            return variables[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _FORMULA_OPERATORS:
            return _FORMULA_OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FORMULA_FUNCTIONS
                and len(node.args) == 1 and not node.keywords):
            return _FORMULA_FUNCTIONS[node.func.id](walk(node.args[0]))
        raise ValueError(f"unsupported element {ast.dump(node)} in the TR 38.901 table formula {text!r}")

    return walk(ast.parse(text.strip(), mode="eval"))


def _uma_c_ds_ns(fc_ghz: float) -> float:
    return max(0.25, 6.5622 - 3.4084 * math.log10(fc_ghz))


def _split_channel_type(channel_type: str) -> tuple[str, bool]:
    scenario, _, los = channel_type.partition("_")
    if scenario not in _TABLE_SCENARIO or los not in ("Los", "Nlos"):
        known = ", ".join(f"{s}_{suffix}" for s in _TABLE_SCENARIO for suffix in ("Los", "Nlos"))
        raise ValueError(f"unknown channel type {channel_type!r}; the TR 38.901 generator knows: {known}")
    return scenario, los == "Los"


def scenario_params(channel_type: str, version: str = "v16", *, carrier_freq_ghz: float = 28.0) -> ScenarioParams:
    """The Table 7.5-6 row of `channel_type` ("InF_Los", "UMa_Nlos", ...) at `carrier_freq_ghz` (GHz).

    The delay-spread mean/std come from the table's formulas, with the TR's frequency floors
    (UMi 2 GHz, UMa and InH 6 GHz); UMa's c_DS follows max(0.25, 6.5622 - 3.4084 log10 fc) ns.
    """
    scenario, los = _split_channel_type(channel_type)
    if version not in VERSIONS:
        raise ValueError(f"unknown TR 38.901 version {version!r}; use one of {', '.join(VERSIONS)} "
                         "(dataset.tr38901_version)")
    lo, hi = _FC_RANGE_GHZ
    if not lo <= carrier_freq_ghz <= hi:
        raise ValueError(f"carrier frequency {carrier_freq_ghz:g} GHz is outside the TR 38.901 range "
                         f"{lo:g}-{hi:g} GHz; set dataset.carrier_freq (GHz) inside it")
    row = _table(version).get((_TABLE_SCENARIO[scenario], los))
    if row is None:
        raise ValueError(f"{TABLE_FILES[version]} has no row for {_TABLE_SCENARIO[scenario]} "
                         f"{'LOS' if los else 'NLOS'}; the package data file is damaged, reinstall chest-jax")
    fc = max(carrier_freq_ghz, _FC_FLOOR_GHZ.get(scenario, 0.0))
    length, width, height = _INF_HALL_M
    variables = {"fc": fc, "V": length * width * height,
                 "S": 2 * (length * width + length * height + width * height)}

    def optional(key: str) -> Optional[float]:
        return None if row[key] == "NA" else float(row[key])

    return ScenarioParams(
        channel_type=channel_type,
        table_row=f"{row['scenario']} {row['los']}",
        los=los,
        version=version,
        carrier_freq_ghz=float(carrier_freq_ghz),
        mu_lg_ds=_eval_formula(row["mu_lgDS_formula"], variables),
        sigma_lg_ds=_eval_formula(row["sigma_lgDS_formula"], variables),
        r_tau=float(row["r_tau"]),
        n_clusters=int(row["n_clusters"]),
        zeta_db=float(row["zeta_db"]),
        k_mu_db=optional("k_mu_db"),
        k_sigma_db=optional("k_sigma_db"),
        rho_ds_k=_RHO_DS_K[scenario] if los else None,
        c_ds_ns=_uma_c_ds_ns(fc) if scenario == "UMa" else float(row["c_ds_ns"]),
        extrapolated=scenario == "RMa" and carrier_freq_ghz > _RMA_TABLE_MAX_GHZ,
    )


def los_delay_scaling(k_db: np.ndarray) -> np.ndarray:
    """C_tau of step 5 for the drawn K-factor in dB (not its mean); LoS delays are tau / C_tau."""
    return 0.7705 - 0.0433 * k_db + 0.0002 * k_db**2 + 0.000017 * k_db**3


def _streams(channel_type: str, seed: int) -> list[np.random.Generator]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r} (dataset.pdp_seed)")
    # crc32 (not hash()) so that the stream of a channel type is the same in every process.
    root = np.random.SeedSequence([int(seed), zlib.crc32(channel_type.encode())])
    return [np.random.default_rng(child) for child in root.spawn(3)]


def _large_scale(params: ScenarioParams, rng: np.random.Generator, num_drops: int, channel_type: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step 1: lgDS and (LoS) K [dB] per drop, with their tabulated correlation; also DS in ns, K linear and C_tau."""
    z_Mx2 = rng.standard_normal((num_drops, 2))
    lg_ds_M = params.mu_lg_ds + params.sigma_lg_ds * z_Mx2[:, 0]
    ds_ns_M = 10.0 ** (lg_ds_M + 9.0)
    if not params.los:
        return lg_ds_M, ds_ns_M, np.full(num_drops, np.nan), np.zeros(num_drops), np.ones(num_drops)
    rho = params.rho_ds_k
    k_db_M = params.k_mu_db + params.k_sigma_db * (rho * z_Mx2[:, 0] + math.sqrt(1.0 - rho**2) * z_Mx2[:, 1])
    c_tau_M = los_delay_scaling(k_db_M)
    if np.any(c_tau_M <= 0):
        raise ValueError(f"{channel_type}: a K-factor draw below -63 dB makes C_tau non-positive; "
                         "this cannot happen with the tabulated K statistics, check the parameter table")
    return lg_ds_M, ds_ns_M, k_db_M, 10.0 ** (k_db_M / 10.0), c_tau_M


def _clusters(params: ScenarioParams, ds_ns_M: np.ndarray, delay_rng: np.random.Generator,
              shadow_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Steps 5-6: sorted cluster delays (ns, first at 0, before the LoS scaling) and normalised powers (M, N)."""
    num_drops, num_clusters = ds_ns_M.shape[0], params.n_clusters
    # 1 - U lies in (0, 1], so the logarithm stays finite.
    x_MxN = 1.0 - delay_rng.random((num_drops, num_clusters))
    tau_MxN = np.sort(-params.r_tau * ds_ns_M[:, None] * np.log(x_MxN), axis=1)
    tau_MxN -= tau_MxN[:, :1]
    shadow_db_MxN = params.zeta_db * shadow_rng.standard_normal((num_drops, num_clusters))
    p_MxN = np.exp(-tau_MxN * (params.r_tau - 1.0) / (params.r_tau * ds_ns_M[:, None])) * 10.0 ** (-shadow_db_MxN / 10)
    return tau_MxN, p_MxN / p_MxN.sum(axis=1, keepdims=True)


def _kept(p_MxN: np.ndarray, los_share_M: np.ndarray, nlos_scale_M: np.ndarray, remove_below_db: Optional[float],
          los_inclusive_removal: bool) -> np.ndarray:
    """(M, N) bool: the clusters within remove_below_db of the strongest (module docstring, point 4)."""
    if remove_below_db is None:
        return np.ones_like(p_MxN, dtype=bool)
    p_with_los_MxN = p_MxN * nlos_scale_M[:, None]
    p_with_los_MxN[:, 0] += los_share_M
    compared_MxN = p_with_los_MxN if los_inclusive_removal else p_MxN
    threshold_M = compared_MxN.max(axis=1) * 10.0 ** (-remove_below_db / 10.0)
    return compared_MxN >= threshold_M[:, None]


def _taps(params: ScenarioParams, tau_out_MxN: np.ndarray, p_MxN: np.ndarray, kept_MxN: np.ndarray,
          los_share_M: np.ndarray, nlos_scale_M: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Step 11 and the LoS ray: the tap lists (n_i, 2) [delay_ns, power] summing to 1, and the LoS power share."""
    # Rank the remaining clusters by their NLoS-normalised power.
    rank_order_MxN = np.argsort(np.where(kept_MxN, p_MxN, -1.0), axis=1)[:, ::-1]
    strongest_Mx2 = rank_order_MxN[:, :NUM_STRONGEST_SPLIT]
    strongest_kept_Mx2 = np.take_along_axis(kept_MxN, strongest_Mx2, axis=1)
    split_MxN = np.zeros_like(kept_MxN)
    np.put_along_axis(split_MxN, strongest_Mx2, strongest_kept_Mx2, axis=1)

    (_, first_fraction), *later_subclusters = SUBCLUSTERS
    delays = [tau_out_MxN]
    powers = [p_MxN * np.where(split_MxN, first_fraction, 1.0)]
    valid = [kept_MxN]
    strongest_delay_Mx2 = np.take_along_axis(tau_out_MxN, strongest_Mx2, axis=1)
    strongest_power_Mx2 = np.take_along_axis(p_MxN, strongest_Mx2, axis=1)
    for offset, fraction in later_subclusters:
        delays.append(strongest_delay_Mx2 + offset * params.c_ds_ns)
        powers.append(strongest_power_Mx2 * fraction)
        valid.append(strongest_kept_Mx2)
    delay_MxT = np.concatenate(delays, axis=1)
    valid_MxT = np.concatenate(valid, axis=1)
    power_MxT = np.where(valid_MxT, np.concatenate(powers, axis=1) * nlos_scale_M[:, None], 0.0)

    # The LoS ray joins column 0, the first cluster's tap at delay 0 (present even if that cluster was removed).
    power_MxT[:, 0] += los_share_M
    valid_MxT[:, 0] |= params.los

    total_M = power_MxT.sum(axis=1)
    power_MxT /= total_M[:, None]
    delay_MxT = np.where(valid_MxT, delay_MxT, np.inf)
    delay_MxT -= delay_MxT.min(axis=1, keepdims=True)
    order_MxT = np.argsort(delay_MxT, axis=1, kind="stable")
    delay_MxT = np.take_along_axis(delay_MxT, order_MxT, axis=1)
    power_MxT = np.take_along_axis(power_MxT, order_MxT, axis=1)
    num_taps_M = valid_MxT.sum(axis=1)
    profiles = [np.stack([delay_MxT[i, :n], power_MxT[i, :n]], axis=1) for i, n in enumerate(num_taps_M)]
    return profiles, los_share_M / total_M


def generate_drops(channel_type: str, num_profiles: int, seed: int, *, version: str = "v16",
                   carrier_freq_ghz: float = 28.0, remove_below_db: Optional[float] = 25.0,
                   los_inclusive_removal: bool = True) -> Drops:
    """Draw `num_profiles` links of `channel_type` and return their tap lists with the draws behind them.

    remove_below_db: clusters this many dB below the strongest are removed (None: keep all, as
    Sionna and QuaDRiGa do). Each profile has at most N + 4 taps (N = the table's cluster count).
    los_inclusive_removal: in LoS, compare the LoS-inclusive cluster powers with the threshold (ns-3,
    the project's decision); False compares the NLoS-normalised powers instead (TR38901.md caveat 6).
    """
    if isinstance(num_profiles, bool) or not isinstance(num_profiles, (int, np.integer)) or num_profiles < 1:
        raise ValueError(f"num_profiles must be a positive integer, got {num_profiles!r} (dataset.num_profiles)")
    params = scenario_params(channel_type, version, carrier_freq_ghz=carrier_freq_ghz)
    lsp_rng, delay_rng, shadow_rng = _streams(channel_type, seed)
    num_drops = int(num_profiles)
    lg_ds_M, ds_ns_M, k_db_M, k_lin_M, c_tau_M = _large_scale(params, lsp_rng, num_drops, channel_type)
    tau_MxN, p_MxN = _clusters(params, ds_ns_M, delay_rng, shadow_rng)
    los_share_M = k_lin_M / (k_lin_M + 1.0)
    nlos_scale_M = 1.0 / (k_lin_M + 1.0)
    kept_MxN = _kept(p_MxN, los_share_M, nlos_scale_M, remove_below_db, los_inclusive_removal)
    profiles, los_power_M = _taps(params, tau_MxN / c_tau_M[:, None], p_MxN, kept_MxN, los_share_M, nlos_scale_M)
    if params.los:
        stretched = int(np.sum(k_db_M > 20.0))
        if stretched:
            logger.info("%s: %d of %d drops have K > 20 dB; C_tau stretches their delays by %.1fx at most",
                        channel_type, stretched, num_drops, float(1.0 / c_tau_M.min()))
    return Drops(params=params, profiles=profiles, lg_ds=lg_ds_M, k_db=k_db_M, c_tau=c_tau_M,
                 num_clusters_kept=kept_MxN.sum(axis=1), los_power=los_power_M)


def generate_profiles(channel_type: str, num_profiles: int, seed: int, *, version: str = "v16",
                      carrier_freq_ghz: float = 28.0, remove_below_db: Optional[float] = 25.0) -> list[np.ndarray]:
    """`num_profiles` TR 38.901 tap lists for `channel_type`, deterministic in (seed, channel_type).

    Returns a list of (n_taps, 2) float64 arrays [delay_ns, linear power]: powers sum to 1, delays
    sorted ascending and unique, the first at 0 ns; n_taps <= N + 4. See `generate_drops`.
    """
    return generate_drops(channel_type, num_profiles, seed, version=version, carrier_freq_ghz=carrier_freq_ghz,
                          remove_below_db=remove_below_db).profiles
