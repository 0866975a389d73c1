"""chest_jax/optim.py: the optimizers' update rules, gradient clipping and the learning-rate schedule, checked
against updates computed by hand in float64 numpy (the formulas of torch / optax, not observed numbers)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from chest_jax import config as C
from chest_jax.optim import learning_rate_schedule, make_optimizer

# optax.adam / adamw defaults, which make_optimizer does not override.
B1, B2, EPS = 0.9, 0.999, 1e-8

P0 = np.array([1.0, -2.0, 0.5])
G1 = np.array([0.1, 0.3, -0.2])
G2 = np.array([-0.05, 0.4, 0.1])
# weight decay large enough that wd * p is of the size of the gradient: coupled and decoupled decay then give
# visibly different updates (with the default 1e-6 both would equal plain Adam to 1e-6).
WD = 0.3


def training(*overrides):
    return C.load(None, [f"training.{o}" for o in overrides]).training


def two_updates(tx, grads):
    """The first len(grads) updates of tx from P0, each applied before the next (as the training step does)."""
    params = {"w": jnp.asarray(P0, jnp.float32)}
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        out.append(np.asarray(updates["w"], np.float64))
        params = {"w": params["w"] + updates["w"]}
    return out


def bias_correction(b, t):
    """1 - b^t as optax evaluates it, in float32: 1 - float32(0.999) is 1.3e-5 relative off 0.001, which would
    exceed the 1e-6 tolerance (the moments' (1 - b) factors stay float64 there, so only this term is float32)."""
    return float(np.float32(1.0) - np.float32(b) ** np.float32(t))


def adam_direction(grads):
    """Adam's bias-corrected directions m_hat / (sqrt(v_hat) + eps) for a gradient sequence (float64)."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        out.append((m / bias_correction(B1, t)) / (np.sqrt(v / bias_correction(B2, t)) + EPS))
    return out


def test_adam_weight_decay_is_coupled_l2_in_the_gradient():
    lr = 0.01
    tx = make_optimizer(training("optimizer=adam", f"weight_decay={WD}", f"lr={lr}", "use_scheduler=false",
                                 "max_norm=0"))
    got = two_updates(tx, [G1, G2])
    # torch Adam(weight_decay): the decay term wd * p joins the gradient before the moments.
    p1_want = P0 - lr * adam_direction([G1 + WD * P0])[0]
    d1, d2 = adam_direction([G1 + WD * P0, G2 + WD * p1_want])
    np.testing.assert_allclose(got[0], -lr * d1, rtol=1e-6)
    np.testing.assert_allclose(got[1], -lr * d2, rtol=1e-6)
    # and it is not the decoupled rule (the two differ by far more than the tolerance here)
    assert not np.allclose(got[0], -lr * (adam_direction([G1])[0] + WD * P0), rtol=1e-3)


def test_adamw_weight_decay_is_decoupled_from_the_moments():
    lr = 0.01
    tx = make_optimizer(training("optimizer=adamw", f"weight_decay={WD}", f"lr={lr}", "use_scheduler=false",
                                 "max_norm=0"))
    got = two_updates(tx, [G1, G2])
    # AdamW: the moments see the raw gradient; lr * wd * p is subtracted beside the Adam direction.
    d1, d2 = adam_direction([G1, G2])
    p1 = P0 - lr * (d1 + WD * P0)
    np.testing.assert_allclose(got[0], -lr * (d1 + WD * P0), rtol=1e-6)
    np.testing.assert_allclose(got[1], -lr * (d2 + WD * p1), rtol=1e-6)


def test_sgd_momentum_and_coupled_weight_decay():
    lr, mu = 0.1, 0.9
    tx = make_optimizer(training("optimizer=sgd", f"momentum={mu}", f"weight_decay={WD}", f"lr={lr}",
                                 "use_scheduler=false", "max_norm=0"))
    got = two_updates(tx, [G1, G2])
    # torch SGD: buf = g + wd p (first step), buf = mu buf + g + wd p after; update -lr buf.
    buf1 = G1 + WD * P0
    p1 = P0 - lr * buf1
    buf2 = mu * buf1 + G2 + WD * p1
    np.testing.assert_allclose(got[0], -lr * buf1, rtol=1e-6)
    np.testing.assert_allclose(got[1], -lr * buf2, rtol=1e-6)
    # momentum=0 is plain SGD: the second update forgets the first gradient
    plain = two_updates(make_optimizer(training("optimizer=sgd", "momentum=0", "weight_decay=0", f"lr={lr}",
                                                "use_scheduler=false", "max_norm=0")), [G1, G2])
    np.testing.assert_allclose(plain[1], -lr * G2, rtol=1e-6)


def test_adam_update_follows_the_warmup_schedule():
    # Step t's update is scaled by the schedule at t - 1 (optax counts from 0): the first update of a warmup
    # from 0 is zero, the second is lr / num_warmup_steps times the Adam direction.
    lr, warmup = 0.01, 4
    t = training("optimizer=adam", "weight_decay=0", f"lr={lr}", "use_scheduler=true", "num_iter=100",
                 f"num_warmup_steps={warmup}", "max_norm=0")
    got = two_updates(make_optimizer(t), [G1, G2])
    d1, d2 = adam_direction([G1, G2])
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1], -(lr / warmup) * d2, rtol=1e-6)
    assert float(learning_rate_schedule(t)(1)) == pytest.approx(lr / warmup, rel=1e-6)


def test_global_norm_clipping_scales_the_gradient_to_max_norm():
    lr, max_norm = 0.5, 0.2
    # two leaves: the norm is global, sqrt(3^2 + 4^2) = 5 over both, i.e. 25 x max_norm
    grads = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([[0.0, 4.0]])}
    params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 2))}

    def update(*extra):
        tx = make_optimizer(training("optimizer=sgd", "momentum=0", "weight_decay=0", f"lr={lr}",
                                     "use_scheduler=false", *extra))
        updates, _ = tx.update(grads, tx.init(params), params)
        return {k: np.asarray(v, np.float64) for k, v in updates.items()}

    clipped = update(f"max_norm={max_norm}")
    for k in grads:  # -lr * g * max_norm / |g|: the direction kept, the global norm set to max_norm
        np.testing.assert_allclose(clipped[k], -lr * np.asarray(grads[k]) * max_norm / 5.0, rtol=1e-6)
    norm = math.sqrt(sum(float(np.sum(u ** 2)) for u in clipped.values()))
    assert norm == pytest.approx(lr * max_norm, rel=1e-6)
    # a gradient already within max_norm is untouched
    small = update("max_norm=10")
    for k in grads:
        np.testing.assert_allclose(small[k], -lr * np.asarray(grads[k]), rtol=1e-6)
    # max_norm=0 disables clipping
    unclipped = update("max_norm=0")
    for k in grads:
        np.testing.assert_allclose(unclipped[k], -lr * np.asarray(grads[k]), rtol=1e-6)


def test_cosine_schedule_warmup_peak_midpoint_and_end():
    lr, warmup, num_iter = 3e-3, 10, 110
    sched = learning_rate_schedule(training(f"lr={lr}", f"num_warmup_steps={warmup}", f"num_iter={num_iter}",
                                            "use_scheduler=true"))
    # linear warmup 0 -> lr over num_warmup_steps
    assert float(sched(0)) == 0.0
    assert float(sched(warmup // 2)) == pytest.approx(lr / 2, rel=1e-6)
    assert float(sched(warmup)) == pytest.approx(lr, rel=1e-6)
    # then lr * (1 + cos(pi (s - W) / (num_iter - W))) / 2: lr / 2 halfway through the decay, 0 at num_iter
    assert float(sched(warmup + (num_iter - warmup) // 2)) == pytest.approx(lr / 2, rel=1e-6)
    s = warmup + 25
    assert float(sched(s)) == pytest.approx(lr * (1 + math.cos(math.pi * 25 / 100)) / 2, rel=1e-6)
    assert float(sched(num_iter)) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_without_scheduler():
    sched = learning_rate_schedule(training("lr=0.02", "use_scheduler=false", "num_iter=50",
                                            "num_warmup_steps=10"))
    assert [float(sched(s)) for s in (0, 10, 25, 50)] == [pytest.approx(0.02, rel=1e-6)] * 4


def test_wsd_schedule_warms_up_holds_then_decays_linearly_to_zero():
    lr, warmup, num_iter = 2e-3, 10, 100  # decay_fraction 0.2: the decay covers steps 80..100
    sched = learning_rate_schedule(training(f"lr={lr}", f"num_warmup_steps={warmup}", f"num_iter={num_iter}",
                                            "use_scheduler=true", "schedule=wsd", "decay_fraction=0.2"))
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(lr / 2, rel=1e-6)
    for s in (10, 45, 80):  # held at lr from the end of the warmup to the start of the decay
        assert float(sched(s)) == pytest.approx(lr, rel=1e-6)
    assert float(sched(90)) == pytest.approx(lr / 2, rel=1e-6)
    assert float(sched(95)) == pytest.approx(lr / 4, rel=1e-6)
    assert float(sched(num_iter)) == pytest.approx(0.0, abs=1e-12)


def test_wsd_schedule_refuses_a_warmup_and_decay_longer_than_the_run():
    with pytest.raises(C.ConfigError, match="decay_fraction"):
        training("num_iter=100", "num_warmup_steps=90", "schedule=wsd", "decay_fraction=0.2")
    with pytest.raises(C.ConfigError, match="decay_fraction"):
        training("decay_fraction=0")
    # the default cosine schedule ignores decay_fraction's budget check
    assert training("num_iter=100", "num_warmup_steps=90", "decay_fraction=0.2").schedule == "cosine"
