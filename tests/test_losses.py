"""chest_jax/losses.py: the per-sample NMSE and the two training objectives on hand-computed examples."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chest_jax import losses


def _pair(z):
    return jnp.stack([jnp.real(z), jnp.imag(z)], -1).astype(jnp.float32)


# Two samples, K = 4. Sample 0: |h|^2 = 1, error 0.1 on one subcarrier: NMSE 0.01. Sample 1: |h|^2 = 4 (a
# stronger channel, so the normalisation matters), error power 4 (2j on another subcarrier): NMSE 1.0.
H = np.array([[1, 0, 0, 0], [0, 0, 2, 0]], np.complex64)
ERR = np.array([[0.1, 0, 0, 0], [0, 2j, 0, 0]], np.complex64)
NMSE = np.array([0.01, 1.0])


def test_nmse_per_sample_is_error_power_over_channel_power():
    got = losses.nmse_per_sample(jnp.asarray(H), _pair(H + ERR))
    np.testing.assert_allclose(np.asarray(got), NMSE, rtol=1e-6)


def test_nmse_objective_is_the_batch_mean_of_linear_nmse():
    assert float(losses.objective("nmse")(jnp.asarray(NMSE, jnp.float32))) == pytest.approx(0.505, rel=1e-6)


def test_nmse_db_objective_is_the_batch_mean_of_nmse_in_db():
    # mean(10 log10 0.01, 10 log10 1) = mean(-20, 0) = -10 dB (not 10 log10 of the mean NMSE, -2.97 dB)
    assert float(losses.objective("nmse_db")(jnp.asarray(NMSE, jnp.float32))) == pytest.approx(-10.0, rel=1e-6)


def test_objective_gradients_with_respect_to_each_sample():
    nmse = jnp.asarray(NMSE, jnp.float32)
    batch = len(NMSE)
    # nmse: every sample weighs 1 / B, whatever its error
    np.testing.assert_allclose(np.asarray(jax.grad(losses.objective("nmse"))(nmse)), [1 / batch] * batch,
                               rtol=1e-6)
    # nmse_db: d loss / d nmse_b = 10 / (ln 10 * nmse_b) / B, so the 100x smaller error gets a 100x larger weight
    want = 10.0 / (math.log(10.0) * NMSE) / batch
    np.testing.assert_allclose(np.asarray(jax.grad(losses.objective("nmse_db"))(nmse)), want, rtol=1e-6)


def test_nmse_db_floors_an_exact_estimate_at_minus_120_db():
    # an exact estimate (NMSE 0) counts as 1e-12, -120 dB, so the loss stays finite: mean(-120, 0) = -60
    value = losses.objective("nmse_db")(jnp.asarray([0.0, 1.0], jnp.float32))
    assert float(value) == pytest.approx(-60.0, rel=1e-6)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown training.loss 'mse'.*nmse, nmse_db"):
        losses.objective("mse")
