"""nemojax.elastic.router: budget codes, router MLPs and schedules, Gumbel-softmax sampling, expected sizes and the
router loss (values against hand-computed ones; gradient signs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import presets
from nemojax.elastic.choices import default_choices, layer_counts, make_choices
from nemojax.elastic.count import count
from nemojax.elastic.router import (
    Schedule,
    budget_code,
    expected_sizes,
    gumbel_key,
    init_routers,
    keep_probabilities,
    router_logits,
    router_loss,
    sample,
    sample_all,
)

BUDGETS = (1.0, 0.75, 0.5)
CONFIG = presets.get("nemotron-h-8b-tiny")  # M-M*-MM-


# ------------------------------------------------------------------------------------------------ budget code


@pytest.mark.parametrize("budgets, b, want", [
    (BUDGETS, 0.75, [0, 1, 0]),
    (BUDGETS, 1.0, [1, 0, 0]),
    (BUDGETS, 0.625, [0, 0.5, 0.5]),
    (BUDGETS, 0.8, [0.2, 0.8, 0]),
    ((0.75, 0.5), 1.0, [1, 0]),  # the full budget, not trained: the largest trained one
    ((0.75, 0.5), 0.25, [0, 1]),  # below the smallest: the smallest
])
def test_budget_code(budgets, b, want):
    np.testing.assert_allclose(budget_code(budgets, b), want, atol=1e-6)


@pytest.mark.parametrize("budgets, b, message", [
    (BUDGETS, 0.0, "budget=0.0"), (BUDGETS, 1.5, "budget=1.5"), (BUDGETS, -0.5, "budget=-0.5"),
    ((0.5, 0.75), 0.5, "strictly descending"), ((), 0.5, "budgets"),
])
def test_budget_code_errors(budgets, b, message):
    with pytest.raises(ValueError, match=message):
        budget_code(budgets, b)


# ------------------------------------------------------------------------------------------------ routers


def test_router_shapes_and_logits_by_hand():
    choices = default_choices(CONFIG, max_drop=2)
    routers = init_routers(jax.random.key(0), choices, BUDGETS, hidden=16, heterogeneous=True,
                           layer_counts=layer_counts(CONFIG), last_bias=2.0)
    assert routers["ffn"]["W1"].shape == (3, 16)
    assert routers["ffn"]["W2"].shape == (16, 3, 5)  # three '-' layers, five sizes each
    assert routers["hidden"]["W2"].shape == (16, 5) and routers["depth"]["W2"].shape == (16, 3)  # global axes
    np.testing.assert_array_equal(routers["ffn"]["b2"][:, -1], 2.0)
    assert 0.07 < float(jnp.std(routers["ffn"]["W2"])) < 0.13  # normal(0.1)
    schedule = Schedule(steps=11)
    code = budget_code(BUDGETS, 0.625)
    for step, scale in ((0, 1.0), (5, 5.5), (10, 10.0), (20, 10.0)):
        logits = router_logits(routers, code, step, schedule)
        r = {k: np.asarray(v, np.float64) for k, v in routers["ffn"].items()}
        h = np.asarray(code, np.float64) @ r["W1"]
        h = np.where(h > 0, h, 0.1 * h)
        want = (np.einsum("h,hlc->lc", h, r["W2"]) + r["b2"]) * scale
        np.testing.assert_allclose(logits["ffn"], want, rtol=1e-5, atol=1e-6)
        assert logits["hidden"].shape == (5,)
    with pytest.raises(ValueError, match="layer_counts"):
        init_routers(jax.random.key(0), choices, BUDGETS, heterogeneous=True)


def test_schedules():
    linear = Schedule(steps=101)
    assert float(linear.tau(0)) == pytest.approx(1.0) and float(linear.tau(100)) == pytest.approx(0.05)
    assert float(linear.tau(50)) == pytest.approx(0.525)
    code_form = Schedule(steps=101, tau_form="exponential")
    assert float(code_form.tau(1000)) == pytest.approx(0.9999 ** 1000, rel=1e-5)
    assert float(code_form.tau(10 ** 6)) == pytest.approx(0.05)  # floored at tau_end
    with pytest.raises(ValueError, match="tau_form"):
        Schedule(steps=10, tau_form="cosine")


# ------------------------------------------------------------------------------------------------ sampling


def test_hard_sample_is_the_gumbel_argmax_and_carries_gradient():
    logits = jnp.asarray([[0.3, -0.2, 0.1, 0.0], [1.0, 2.0, -1.0, 0.5]])
    key = gumbel_key(jax.random.key(3), step=7, dp_rank=1)
    index, pi, multiplier = sample(logits, key, tau=0.05, hard=True)
    g = jax.random.gumbel(key, logits.shape)
    np.testing.assert_array_equal(index, jnp.argmax(logits + g, axis=-1))
    np.testing.assert_allclose(pi, jax.nn.one_hot(index, 4), atol=1e-6)
    np.testing.assert_allclose(multiplier, 1.0, atol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(sample(z, key, 1.0, hard=True)[2]))(logits)
    assert float(jnp.max(jnp.abs(grad))) > 1e-3
    # soft: the multiplier is the chosen probability
    index, pi, multiplier = sample(logits, key, tau=1.0, hard=False)
    np.testing.assert_allclose(multiplier, jnp.max(pi, axis=-1))
    assert float(jnp.max(multiplier)) < 1.0
    # inference: argmax of the logits, multiplier 1
    index, pi, multiplier = sample(logits, None)
    np.testing.assert_array_equal(index, [0, 1])
    np.testing.assert_array_equal(multiplier, [1.0, 1.0])


def test_gumbel_keys_differ_by_step_and_rank():
    key = jax.random.key(0)
    draws = {(s, r): tuple(np.asarray(jax.random.gumbel(gumbel_key(key, s, r), (4,)))) for s in (0, 1) for r in (0, 1)}
    assert len(set(draws.values())) == 4
    picks = sample_all({"a": jnp.zeros(8), "b": jnp.zeros(8)}, key, 1.0)
    assert not np.allclose(picks["a"][1], picks["b"][1])  # each axis its own noise


def test_expected_sizes_and_keep_probabilities():
    choices = make_choices(CONFIG, {"ffn": (128, 96, 64), "depth": (0, 1, 2)})
    pi = {"ffn": jnp.asarray([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.2, 0.6]]),
          "depth": jnp.asarray([0.5, 0.25, 0.25])}
    sizes = expected_sizes(pi, choices, removal_order=(5, 2), num_layers=8)
    np.testing.assert_allclose(sizes["ffn"], [112.0, 64.0, 0.2 * 128 + 0.2 * 96 + 0.6 * 64], rtol=1e-6)
    # layer 5 goes when 1 or 2 are dropped (0.5), layer 2 when 2 are (0.25)
    np.testing.assert_allclose(sizes["depth"], [1, 1, 0.75, 1, 1, 0.5, 1, 1])
    np.testing.assert_allclose(expected_sizes(pi, choices)["depth"], 0.75)  # expected drops
    with pytest.raises(ValueError, match="removal_order has 1 layers"):
        keep_probabilities(pi["depth"], (0, 1, 2), (5,), 8)


# ------------------------------------------------------------------------------------------------ router loss


def _one_hot(index, n):
    return jax.nn.one_hot(index, n)


def test_router_loss_dead_zone_and_outside():
    choices = make_choices(CONFIG, {"ffn": (128, 96, 64), "mamba_heads": (8, 6, 4)})
    small = {"ffn": _one_hot(2, 3), "mamba_heads": _one_hot(2, 3)}
    ratio = float(count(CONFIG, {"ffn": 64, "mamba_heads": 4})) / float(count(CONFIG))
    assert float(router_loss(CONFIG, small, choices, ratio * 1.02)) == 0.0  # |1/1.02 - 1| < 0.05
    outside = float(router_loss(CONFIG, small, choices, ratio * 1.2))
    assert outside == pytest.approx(1 - 1 / 1.2, rel=1e-5)
    full = {"ffn": _one_hot(0, 3), "mamba_heads": _one_hot(0, 3)}
    assert float(router_loss(CONFIG, full, choices, 0.5)) == pytest.approx(1.0, rel=1e-6)
    memory = float(router_loss(CONFIG, full, choices, 0.5, target="memory", context=64))
    assert memory == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="target="):
        router_loss(CONFIG, full, choices, 0.5, target="flops")


def test_router_loss_full_budget_pull():
    choices = make_choices(CONFIG, {"ffn": (128, 96, 64), "mamba_heads": (8, 6, 4)})
    full = {"ffn": _one_hot(0, 3), "mamba_heads": _one_hot(0, 3)}
    assert float(router_loss(CONFIG, full, choices, 1.0)) == 0.0
    pi = {"ffn": jnp.asarray([0.5, 0.5, 0.0]), "mamba_heads": _one_hot(0, 3)}
    diff = 1 - float(count(CONFIG, {"ffn": 112.0})) / float(count(CONFIG))
    pull = 10 * ((0.5 ** 2 + 0.5 ** 2) / 3)  # 10 x MSE(pi, one_hot(0)); mamba_heads adds 0
    assert float(router_loss(CONFIG, pi, choices, 1.0)) == pytest.approx(diff + pull, rel=1e-5)
    assert diff < 0.05  # inside the tolerance, yet the full budget is still pulled: no dead zone at b = 1


def test_router_loss_gradient_pushes_the_expected_size_down_when_over_budget():
    choices = make_choices(CONFIG, {"ffn": (128, 96, 64), "mamba_heads": (8, 6, 4)})
    logits = {"ffn": jnp.asarray([0.2, 0.0, -0.2]), "mamba_heads": jnp.zeros(3)}

    def loss(z):
        return router_loss(CONFIG, {axis: jax.nn.softmax(v) for axis, v in z.items()}, choices, 0.5)

    grad = jax.grad(loss)(logits)
    for axis in logits:
        assert float(grad[axis][0]) > 0 > float(grad[axis][-1])  # more mass on the full size costs more
    stepped = {axis: v - 1.0 * grad[axis] for axis, v in logits.items()}
    before = expected_sizes({a: jax.nn.softmax(v) for a, v in logits.items()}, choices)["ffn"]
    after = expected_sizes({a: jax.nn.softmax(v) for a, v in stepped.items()}, choices)["ffn"]
    assert float(after) < float(before)


def test_router_params_get_gradient_through_the_whole_path():
    choices = make_choices(CONFIG, {"ffn": (128, 96, 64), "depth": (0, 1)})
    routers = init_routers(jax.random.key(1), choices, BUDGETS, hidden=8)
    schedule = Schedule(steps=100)

    def loss(params):
        logits = router_logits(params, budget_code(BUDGETS, 0.5), 3, schedule)
        picks = sample_all(logits, gumbel_key(jax.random.key(2), 3), schedule.tau(3))
        return router_loss(CONFIG, {a: pi for a, (_, pi, _) in picks.items()}, choices, 0.5, removal_order=(6,))

    grads = jax.grad(loss)(routers)
    assert float(loss(routers)) > 0.05
    for axis in ("ffn", "depth"):
        assert float(jnp.max(jnp.abs(grads[axis]["W2"]))) > 0
