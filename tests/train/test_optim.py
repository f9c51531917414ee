"""Schedules, config validation, the weight-decay mask and one AdamW step, against values computed by hand."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.train import optim
from nemojax.train.optim import OptimizerConfig, make_optimizer, make_schedule, weight_decay_mask, wsd_schedule

# ------------------------------------------------------------------ schedules

# lr=1, 100 steps, 10 warmup, the last 20% (steps 80..100) decay to 0.1. Warmup is (step + 1) / 10.
WSD_COMMON = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 79: 1.0, 80: 1.0, 100: 0.1, 150: 0.1}
# progress p = (step - 80) / 20; value = 0.1 + 0.9 * frac(p)
WSD_DECAY = {
    # frac = 1 - p
    "linear": {85: 0.1 + 0.9 * 0.75, 90: 0.55, 95: 0.1 + 0.9 * 0.25},
    # frac = (1 + cos(pi p)) / 2: cos(pi/4) = 0.70710678, cos(3 pi/4) = -0.70710678
    "cosine": {85: 0.1 + 0.9 * 0.85355339, 90: 0.55, 95: 0.1 + 0.9 * 0.14644661},
    # frac = 1 - sqrt(p): sqrt(0.25) = 0.5, sqrt(0.5) = 0.70710678, sqrt(0.75) = 0.8660254
    "1-sqrt": {85: 0.55, 90: 0.1 + 0.9 * 0.29289322, 95: 0.1 + 0.9 * 0.1339746},
}


@pytest.mark.parametrize("shape", sorted(WSD_DECAY))
def test_wsd_schedule_hand_values(shape):
    schedule = wsd_schedule(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1,
                            decay_shape=shape)
    for step, expected in {**WSD_COMMON, **WSD_DECAY[shape]}.items():
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6), (shape, step)


def test_wsd_schedule_scales_with_lr_and_through_config():
    schedule = make_schedule(OptimizerConfig(lr=3e-3, total_steps=100, warmup_steps=10, decay_fraction=0.2,
                                             min_lr_ratio=0.1, decay_shape="linear"))
    for step, expected in {**WSD_COMMON, **WSD_DECAY["linear"]}.items():
        assert float(schedule(step)) == pytest.approx(3e-3 * expected, rel=1e-5), step


def test_wsd_decay_window_starts_after_warmup_when_they_overlap():
    """10 steps, 8 warmup, decay_fraction 0.5: the decay cannot start at step 5, so it runs over steps 8..10."""
    schedule = wsd_schedule(2.0, total_steps=10, warmup_steps=8, decay_fraction=0.5)
    expected = {0: 0.25, 3: 1.0, 7: 2.0, 8: 2.0, 9: 1.0, 10: 0.0}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_wsd_without_warmup_or_decay():
    no_warmup = wsd_schedule(1.0, total_steps=10, warmup_steps=0, decay_fraction=0.5)
    assert [float(no_warmup(s)) for s in (0, 4, 5, 7, 10)] == pytest.approx([1.0, 1.0, 1.0, 0.6, 0.0], abs=1e-6)
    no_decay = wsd_schedule(1.0, total_steps=10, warmup_steps=2, decay_fraction=0.0)
    assert [float(no_decay(s)) for s in (0, 1, 5, 9, 10)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0], abs=1e-6)


def test_cosine_schedule_endpoints():
    """Linear warmup 0 -> 2 over 10 steps, then cosine to 0.2 at step 100 (midpoint 1.1 at step 55)."""
    schedule = make_schedule(OptimizerConfig(lr=2.0, total_steps=100, warmup_steps=10, schedule="cosine",
                                             min_lr_ratio=0.1))
    expected = {0: 0.0, 5: 1.0, 10: 2.0, 55: 1.1, 100: 0.2, 120: 0.2}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-5), step


def test_cosine_schedule_without_warmup_starts_at_lr():
    """warmup_steps=0 means no warmup: the first step trains at lr (as the WSD schedule does), it is not wasted at
    lr=0."""
    schedule = make_schedule(OptimizerConfig(lr=1.0, total_steps=10, warmup_steps=0, schedule="cosine"))
    assert float(schedule(0)) == pytest.approx(1.0, abs=1e-6)
    assert float(schedule(5)) == pytest.approx(0.5, abs=1e-6)  # cos(pi/2): half way through the decay
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-6)


def test_constant_schedule():
    schedule = make_schedule(OptimizerConfig(lr=0.5, schedule="constant"))
    assert [float(schedule(s)) for s in (0, 10, 999, 5000)] == [0.5] * 4


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("field, value", [
    ("schedule", "linear"), ("decay_shape", "exp"), ("warmup_steps", -1), ("warmup_steps", 1001),
    ("decay_fraction", -0.1), ("decay_fraction", 1.5), ("lr", 0.0), ("lr", -1e-3)])
def test_optimizer_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(f"optimizer.{field}={value!r}")):
        OptimizerConfig(**{field: value})


def test_optimizer_config_accepts_its_boundaries():
    OptimizerConfig(warmup_steps=0)
    OptimizerConfig(warmup_steps=1000, total_steps=1000)
    OptimizerConfig(decay_fraction=0.0)
    OptimizerConfig(decay_fraction=1.0)


# ------------------------------------------------------------------ weight-decay mask

NOT_DECAYED = {"scale", "bias", "A_log", "D", "dt_bias", "e_score_correction_bias"}


def test_weight_decay_mask_on_a_real_model():
    params = nemojax.Model.init(nemojax.presets.get("nemotron-3-super-120b-a12b-tiny")).params
    mask = weight_decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    by_name: dict[str, set[bool]] = {}
    for path, decayed in jax.tree_util.tree_flatten_with_path(mask)[0]:
        by_name.setdefault(path[-1].key, set()).add(decayed)
    # every leaf name is decayed all the time or never
    assert all(len(v) == 1 for v in by_name.values()), by_name
    not_decayed = {name for name, v in by_name.items() if v == {False}}
    decayed = {name for name, v in by_name.items() if v == {True}}
    assert not_decayed == NOT_DECAYED  # all six occur in this model and nothing else is exempt
    assert decayed == {"kernel", "embedding", "up_proj", "down_proj"}
    # spot checks at full paths: projections, embeddings, routed experts, the router kernel
    assert mask["embeddings"]["embedding"] and mask["lm_head"]["kernel"]
    assert mask["layers_1"]["mixer"]["experts"]["up_proj"] and mask["layers_1"]["mixer"]["experts"]["down_proj"]
    assert mask["layers_1"]["mixer"]["gate"]["kernel"] and mask["layers_3"]["mixer"]["q_proj"]["kernel"]
    assert not mask["layers_1"]["mixer"]["gate"]["e_score_correction_bias"]
    assert not mask["layers_0"]["mixer"]["conv1d_x"]["bias"] and not mask["norm_f"]["scale"]
    assert optim.NO_DECAY == frozenset(NOT_DECAYED)


# ------------------------------------------------------------------ one AdamW step

PARAMS = {"dense": {"kernel": np.array([[1.0, -2.0], [3.0, 0.5]], np.float32)},
          "norm": {"scale": np.array([1.0, 2.0], np.float32)}}
# global norm sqrt(1 + 4 + 4 + 16) = 5
GRADS = {"dense": {"kernel": np.array([[1.0, 0.0], [0.0, -2.0]], np.float32)},
         "norm": {"scale": np.array([2.0, 4.0], np.float32)}}
ADAM = dict(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, b1=0.9, b2=0.99, eps=0.1)


def _one_step(cfg: OptimizerConfig):
    optimizer = make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, PARAMS)
    state = optimizer.init(params)
    updates, state = optimizer.update(jax.tree.map(jnp.asarray, GRADS), state, params)
    return jax.tree.map(np.asarray, jax.tree.map(jnp.add, params, updates)), state


def _adam_moments(state) -> tuple[dict, dict]:
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu") and hasattr(s, "nu"))
             if hasattr(s, "mu")]
    assert len(found) == 1
    return found[0].mu, found[0].nu


def test_adamw_step_with_clipping_matches_hand_computation():
    """Clipped grads g = GRADS / 5; first Adam step: m_hat = g, v_hat = g^2, u = g / (|g| + eps);
    p' = p - lr * (u + wd * p) for decayed leaves, p - lr * u for the norm scale."""
    params, state = _one_step(OptimizerConfig(**ADAM, clip_norm=1.0))
    # kernel: g = [[0.2, 0], [0, -0.4]], u = [[0.2/0.3, 0], [0, -0.4/0.5]], wd * p = [[0.5, -1], [1.5, 0.25]]
    np.testing.assert_allclose(params["dense"]["kernel"],
                               [[1 - 0.1 * (2 / 3 + 0.5), -2 + 0.1], [3 - 0.15, 0.5 - 0.1 * (-0.8 + 0.25)]],
                               rtol=1e-6)
    # scale: g = [0.4, 0.8], u = [0.8, 0.8/0.9], not decayed
    np.testing.assert_allclose(params["norm"]["scale"], [1 - 0.08, 2 - 0.1 * 0.8 / 0.9], rtol=1e-6)
    mu, nu = _adam_moments(state)
    np.testing.assert_allclose(mu["dense"]["kernel"], [[0.02, 0.0], [0.0, -0.04]], rtol=1e-6)  # (1 - b1) g
    np.testing.assert_allclose(nu["dense"]["kernel"], [[4e-4, 0.0], [0.0, 1.6e-3]], rtol=1e-5)  # (1 - b2) g^2
    np.testing.assert_allclose(mu["norm"]["scale"], [0.04, 0.08], rtol=1e-6)


def test_adamw_step_below_clip_norm_is_not_scaled():
    """Global norm 5 < clip 10: grads pass unchanged. u = g / (|g| + 0.1)."""
    params, state = _one_step(OptimizerConfig(**ADAM, clip_norm=10.0))
    np.testing.assert_allclose(params["dense"]["kernel"],
                               [[1 - 0.1 * (1 / 1.1 + 0.5), -2 + 0.1], [3 - 0.15, 0.5 - 0.1 * (-2 / 2.1 + 0.25)]],
                               rtol=1e-6)
    np.testing.assert_allclose(params["norm"]["scale"], [1 - 0.1 * 2 / 2.1, 2 - 0.1 * 4 / 4.1], rtol=1e-6)
    mu, _ = _adam_moments(state)
    np.testing.assert_allclose(mu["dense"]["kernel"], [[0.1, 0.0], [0.0, -0.2]], rtol=1e-6)
    unclipped, _ = _one_step(OptimizerConfig(**ADAM, clip_norm=None))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7), unclipped, params)


def test_adamw_decays_only_masked_leaves():
    """With zero gradients Adam's update is 0, so what remains is the decay: p * (1 - lr * wd) on kernels only."""
    optimizer = make_optimizer(OptimizerConfig(**ADAM))
    params = jax.tree.map(jnp.asarray, PARAMS)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], PARAMS["dense"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new["norm"]["scale"], PARAMS["norm"]["scale"])
