"""cross_entropy against a numpy log-softmax oracle, and against hand values on uniform logits."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.train.losses import cross_entropy

B, L, V = 3, 5, 11


def _numpy_lse(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (B, L, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.float32)
    mask[0, 3:] = 0
    mask[2, :2] = 0
    return logits, targets, mask


def test_matches_numpy_log_softmax_nll(case):
    logits, targets, mask = case
    loss, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    lse = _numpy_lse(logits.astype(np.float64))
    log_probs = logits - lse[..., None]
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    keep = mask.astype(bool)
    expected = nll[keep].mean()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(aux["nll"]) == pytest.approx(expected, rel=1e-5)
    assert float(aux["z_loss"]) == pytest.approx((lse[keep] ** 2).mean(), rel=1e-5)
    assert float(aux["tokens"]) == keep.sum() == 11


def test_z_loss_adds_its_weighted_mean_square_logsumexp(case):
    logits, targets, mask = case
    plain, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    loss, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-2)
    lse = _numpy_lse(logits.astype(np.float64))
    z = (lse[mask.astype(bool)] ** 2).mean()
    assert float(loss) == pytest.approx(float(plain) + 1e-2 * z, rel=1e-6)
    assert float(aux["nll"]) == pytest.approx(float(plain), rel=1e-6)


def test_masked_positions_are_ignored(case):
    """Garbage logits and out-of-place targets under the mask change nothing."""
    logits, targets, mask = case
    loss, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-3)
    hidden = mask == 0
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[hidden] = 1e4 * np.random.default_rng(1).normal(size=(hidden.sum(), V))
    targets2[hidden] = (targets2[hidden] + 1) % V
    loss2, aux2 = cross_entropy(jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(mask), z_loss=1e-3)
    assert float(loss2) == float(loss)
    assert float(aux2["z_loss"]) == float(aux["z_loss"])


def test_uniform_logits_hand_values():
    """Zero logits: nll = log V and logsumexp = log V at every position, whatever the targets."""
    logits = jnp.zeros((2, 4, V))
    targets = jnp.arange(8).reshape(2, 4) % V
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    loss, aux = cross_entropy(logits, targets, mask, z_loss=0.5)
    assert float(aux["nll"]) == pytest.approx(math.log(V), rel=1e-6)
    assert float(aux["z_loss"]) == pytest.approx(math.log(V) ** 2, rel=1e-6)
    assert float(loss) == pytest.approx(math.log(V) + 0.5 * math.log(V) ** 2, rel=1e-6)
    assert float(aux["tokens"]) == 3


def test_confident_correct_prediction_has_near_zero_loss():
    logits = jnp.zeros((1, 2, V)).at[0, 0, 3].set(30.0).at[0, 1, 7].set(30.0)
    loss, _ = cross_entropy(logits, jnp.array([[3, 7]]), jnp.ones((1, 2)))
    assert float(loss) == pytest.approx((V - 1) * math.exp(-30.0), abs=1e-9)
    wrong, _ = cross_entropy(logits, jnp.array([[7, 3]]), jnp.ones((1, 2)))
    assert float(wrong) == pytest.approx(30.0, rel=1e-6)


def test_all_masked_gives_zero_loss_not_nan(case):
    logits, targets, _ = case
    loss, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((B, L)), z_loss=1e-2)
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0.0


def test_bfloat16_logits_are_computed_in_float32(case):
    logits, targets, mask = case
    loss32, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    loss16, _ = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask))
    assert loss16.dtype == jnp.float32
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
