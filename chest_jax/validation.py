"""Validation during training: fixed samples from the VALIDATION profiles, scored at every evaluation_step.

Library code of the training loop (it sees the model only through `graphdef` + parameter trees); the held-out
test sets and the classical baselines are compare.py's (`chest_jax.testsets`, `chest_jax.baselines`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chest_jax import baselines, channels, losses, ofdm, references
from chest_jax import config as config_lib
from chest_jax.metrics import db, mean_of_db, nmse_per_sample


def make_eval_fn(graphdef) -> Callable:
    @jax.jit
    def eval_nmse(trainable, frozen, inputs, h):
        h_est, _ = nnx.merge(graphdef, trainable, frozen)(inputs, deterministic=True)
        return losses.nmse_per_sample(h, h_est.astype(jnp.float32)), h_est

    return eval_nmse


class Validation:
    """Fixed validation samples from the VALIDATION profiles, scored at every evaluation_step.

    A mixed set of `validation_size` samples over the training mix and distance range (its mean per-sample NMSE in
    dB, the original's figure, is `val_nmse_db`) and, per `validation_distances` entry, a set at that fixed distance
    (`val_nmse_db_<d>m`), so a run's log shows the high-SNR end the mixed figure hides. `references` holds the
    same record for the classical estimators that need nothing but the pilots (LS + linear, and the three pilot-only
    LMMSEs where the pilot layout allows them), scored once: the bar a run's numbers are read against.
    """

    def __init__(self, cfg: config_lib.Config, spec: ofdm.FrameSpec, key: jax.Array, eval_fn: Callable):
        t, d = cfg.training, cfg.dataset
        self.eval_fn, self.batch_size = eval_fn, d.batch_size
        bank = ofdm.make_bank(channels.load_split(d, "val"), d.channel_weights)
        self.mixed = ofdm.make_batch_fn(spec, t.validation_size)(key, bank, np.asarray(d.distance_range))
        self.at_distance = {}
        if t.validation_distances:
            fixed = ofdm.make_batch_fn(spec, t.validation_distance_samples)
            self.at_distance = {dist: fixed(jax.random.fold_in(key, i + 1), bank, np.asarray([dist, dist]))
                                for i, dist in enumerate(t.validation_distances)}
        names = ["ls_linear"] + ([] if references.lmmse_problem(spec.dmrs, spec.cp_fraction)
                                 else ["lmmse_robust", "lmmse_adaptive", "lmmse_pdp"])
        self.references = {name: self._record(lambda batch, name=name: nmse_per_sample(
            batch.h, baselines.REGISTRY[name].estimate(batch, spec, None, None))) for name in names}

    def _record(self, nmse_of: Callable, mixed_nmse: np.ndarray | None = None) -> dict[str, float]:
        """The validation record of an estimator, given its per-sample NMSE on a batch (`nmse_of`)."""
        nmse = nmse_of(self.mixed) if mixed_nmse is None else mixed_nmse
        record = {"val_nmse_db": db(np.mean(nmse)), "val_mean_nmse_db": mean_of_db(nmse)}
        for dist, batch in self.at_distance.items():
            record[f"val_nmse_db_{dist:g}m"] = db(np.mean(nmse_of(batch)))
        return record

    def _nmse(self, trainable, frozen, batch) -> tuple[np.ndarray, np.ndarray]:
        parts, first = [], None
        for lo in range(0, len(batch.h), self.batch_size):
            nmse, h_est = self.eval_fn(trainable, frozen, batch.inputs[lo:lo + self.batch_size],
                                       batch.h[lo:lo + self.batch_size])
            parts.append(np.asarray(nmse, np.float64))
            first = np.asarray(h_est) if first is None else first
        return np.concatenate(parts), first

    def __call__(self, trainable, frozen) -> tuple[dict[str, float], np.ndarray]:
        """({val_nmse_db, val_mean_nmse_db, val_nmse_db_<d>m ...}, the estimates of the first mixed batch)."""
        nmse, h_est = self._nmse(trainable, frozen, self.mixed)
        return self._record(lambda batch: self._nmse(trainable, frozen, batch)[0], nmse), h_est

    def describe(self, record: dict[str, float]) -> str:
        text = (f"validation NMSE {record['val_nmse_db']:.2f} dB (mean per-sample "
                f"{record['val_mean_nmse_db']:.2f} dB)")
        if self.at_distance:
            at = "/".join(f"{record[f'val_nmse_db_{d:g}m']:.1f}" for d in self.at_distance)
            text += f"; at {'/'.join(f'{d:g}' for d in self.at_distance)} m: {at} dB"
        return text
