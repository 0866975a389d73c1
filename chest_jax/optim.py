"""Optimizer and learning-rate schedule from `training`, as the original's engine built them.

The optimizer only ever sees the trainable tree (all parameters for base training, the LoRA leaves for transfer),
so clipping, weight decay and moments never touch frozen weights.
"""
from __future__ import annotations

import optax

from chest_jax.config import TrainingConfig


def learning_rate_schedule(t: TrainingConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over num_warmup_steps, then (schedule "cosine") cosine decay to 0 at num_iter,
    or ("wsd") `lr` held until the last decay_fraction of num_iter and a linear decay to 0 at num_iter; constant
    `lr` without use_scheduler."""
    if not t.use_scheduler:
        return optax.constant_schedule(t.lr)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=t.num_warmup_steps,
                                                  decay_steps=t.num_iter, end_value=0.0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, t.lr, t.num_warmup_steps),
         optax.constant_schedule(t.lr),
         optax.linear_schedule(t.lr, 0.0, t.wsd_decay_steps)],
        boundaries=[t.num_warmup_steps, t.num_iter - t.wsd_decay_steps])


def make_optimizer(t: TrainingConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then the optimizer; adam/sgd use coupled L2 decay like torch's `weight_decay`."""
    schedule = learning_rate_schedule(t)
    parts = [optax.clip_by_global_norm(t.max_norm)] if t.max_norm > 0 else []
    if t.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=t.weight_decay))
    else:
        if t.weight_decay > 0:
            parts.append(optax.add_decayed_weights(t.weight_decay))
        if t.optimizer == "adam":
            parts.append(optax.adam(schedule))
        else:
            parts.append(optax.sgd(schedule, momentum=t.momentum or None))
    return optax.chain(*parts)
