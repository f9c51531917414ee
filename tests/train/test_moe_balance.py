"""The load-balancing loss, the aux-loss-free bias update and the router statistics, on hand cases and on the
statistics a real tiny MoE model sows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.model import module
from nemojax.train import moe_balance


def _sown(**routers: tuple[list[float], list[float]]) -> dict:
    """Intermediates shaped like Router's sow: {layer: {"mixer": {"gate": {"expert_load": (load,), ...}}}}."""
    return {name: {"mixer": {"gate": {"expert_load": (jnp.asarray(load, jnp.float32),),
                                      "expert_prob": (jnp.asarray(prob, jnp.float32),)}}}
            for name, (load, prob) in routers.items()}


UNIFORM = ([4.0, 4.0, 4.0, 4.0], [0.25, 0.25, 0.25, 0.25])  # 8 tokens, top-2, 4 experts
# 4 tokens, top-2: f = [0.75, 0.25, 0, 0]; E * sum(f * P) = 4 * (0.3 + 0.075) = 1.5
SKEWED = ([6.0, 2.0, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1])


def test_uniform_loads_and_probs_give_one():
    assert float(moe_balance.load_balancing_loss(_sown(layers_1=UNIFORM))) == pytest.approx(1.0)


def test_hand_case_and_mean_over_layers():
    assert float(moe_balance.load_balancing_loss(_sown(layers_1=SKEWED))) == pytest.approx(1.5)
    both = moe_balance.load_balancing_loss(_sown(layers_1=UNIFORM, layers_4=SKEWED))
    assert float(both) == pytest.approx(1.25)


def test_no_moe_layer_gives_zero():
    assert float(moe_balance.load_balancing_loss({})) == 0.0
    assert float(moe_balance.load_balancing_loss({"layers_0": {"mixer": {}}})) == 0.0


def test_gradient_flows_to_probs_not_loads():
    """d/dP_e = E * f_e / layers = [3, 1, 0, 0] / 2 for the skewed layer; loads get exactly zero."""
    sown = _sown(layers_1=UNIFORM, layers_4=SKEWED)
    grads = jax.grad(lambda s: moe_balance.load_balancing_loss(s))(sown)
    np.testing.assert_allclose(grads["layers_4"]["mixer"]["gate"]["expert_prob"][0], [1.5, 0.5, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["layers_1"]["mixer"]["gate"]["expert_prob"][0], [0.5] * 4, rtol=1e-6)
    for layer in ("layers_1", "layers_4"):
        np.testing.assert_array_equal(grads[layer]["mixer"]["gate"]["expert_load"][0], np.zeros(4))


def _router_params(bias: list[float]) -> dict:
    return {"kernel": jnp.full((3, 4), 0.5), "e_score_correction_bias": jnp.asarray(bias, jnp.float32)}


def test_update_correction_bias_moves_by_exactly_rate():
    """Loads [6, 2, 4, 4] (mean 4): expert 0 over-loaded goes down by rate, expert 1 up, the balanced two stay.
    Only the router present in `loads` changes; kernels never do."""
    params = {"layers_1": {"mixer": {"gate": _router_params([0.5, -0.25, 0.0, 1.0])}},
              "layers_4": {"mixer": {"gate": _router_params([0.5, -0.25, 0.0, 1.0])}},
              "norm_f": {"scale": jnp.ones(3)}}
    loads = {("layers_1", "mixer", "gate"): jnp.array([6.0, 2.0, 4.0, 4.0])}
    new = moe_balance.update_correction_bias(params, loads, rate=0.125)
    np.testing.assert_array_equal(new["layers_1"]["mixer"]["gate"]["e_score_correction_bias"],
                                  [0.375, -0.125, 0.0, 1.0])
    np.testing.assert_array_equal(new["layers_4"]["mixer"]["gate"]["e_score_correction_bias"],
                                  [0.5, -0.25, 0.0, 1.0])
    np.testing.assert_array_equal(new["layers_1"]["mixer"]["gate"]["kernel"], np.full((3, 4), 0.5))
    np.testing.assert_array_equal(new["norm_f"]["scale"], np.ones(3))
    # the input is not edited
    np.testing.assert_array_equal(params["layers_1"]["mixer"]["gate"]["e_score_correction_bias"],
                                  [0.5, -0.25, 0.0, 1.0])


def test_update_correction_bias_no_op_cases():
    params = {"layers_1": {"mixer": {"gate": _router_params([0.5, -0.25, 0.0, 1.0])}}}
    loads = {("layers_1", "mixer", "gate"): jnp.array([6.0, 2.0, 4.0, 4.0])}
    for new in (moe_balance.update_correction_bias(params, loads, rate=0.0),
                moe_balance.update_correction_bias(params, {}, rate=0.1),
                moe_balance.update_correction_bias(params, {("layers_1", "mixer", "gate"): jnp.full(4, 3.0)}, 0.1)):
        np.testing.assert_array_equal(new["layers_1"]["mixer"]["gate"]["e_score_correction_bias"],
                                      [0.5, -0.25, 0.0, 1.0])


def test_update_correction_bias_under_jit_keeps_dtype():
    params = {"layers_1": {"mixer": {"gate": _router_params([0.0, 0.0, 0.0, 0.0])}}}
    loads = {("layers_1", "mixer", "gate"): jnp.array([0.0, 1.0, 5.0, 2.0])}  # mean 2
    new = jax.jit(lambda p, l: moe_balance.update_correction_bias(p, l, 0.5))(params, loads)
    bias = new["layers_1"]["mixer"]["gate"]["e_score_correction_bias"]
    assert bias.dtype == jnp.float32
    np.testing.assert_array_equal(bias, [0.5, 0.5, -0.5, 0.0])


# ------------------------------------------------------------------ on a real model's sown statistics


@pytest.fixture(scope="module")
def sown_by_model():
    config = nemojax.presets.get("nemotron-3-nano-30b-a3b-tiny", vocab_size=64, pattern="E*E")
    model = nemojax.Model.init(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    apply = jax.jit(lambda params, tokens: module(config).apply({"params": params}, tokens, mutable=["intermediates"]))
    _, state = apply(model.params, tokens)
    return config, model, state["intermediates"]


def test_router_stats_finds_every_moe_layer(sown_by_model):
    config, model, inter = sown_by_model
    moe_layers = [i for i, kind in enumerate(config.pattern) if kind == "E"]
    assert moe_layers == [0, 2]
    expected_paths = {(f"layers_{i}", "mixer", "gate") for i in moe_layers}
    loads = moe_balance.router_stats(inter, "expert_load")
    probs = moe_balance.router_stats(inter, "expert_prob")
    assert set(loads) == set(probs) == expected_paths
    E, k, tokens = config.moe.num_experts, config.moe.top_k, 2 * 6
    for path in expected_paths:
        # each path leads to a router in the params, holding a correction bias
        router = model.params
        for key in path:
            router = router[key]
        assert router["e_score_correction_bias"].shape == (E,)
        assert loads[path].shape == probs[path].shape == (E,)
        assert float(jnp.sum(loads[path])) == tokens * k  # every token picks top_k experts
        assert np.all(np.asarray(loads[path]) == np.round(np.asarray(loads[path])))  # counts
        assert float(jnp.sum(probs[path])) == pytest.approx(1.0, abs=1e-5)  # mean of normalised scores
    assert set(moe_balance.expert_loads(inter)) == expected_paths


def test_balance_loss_and_bias_update_on_sown_statistics(sown_by_model):
    config, model, inter = sown_by_model
    loads = moe_balance.router_stats(inter, "expert_load")
    probs = moe_balance.router_stats(inter, "expert_prob")
    E = config.moe.num_experts
    expected = np.mean([E * np.sum(np.asarray(loads[p]) / np.sum(np.asarray(loads[p])) * np.asarray(probs[p]))
                        for p in loads])
    assert float(moe_balance.load_balancing_loss(inter)) == pytest.approx(expected, rel=1e-6)
    new = moe_balance.update_correction_bias(model.params, moe_balance.expert_loads(inter), rate=1e-2)
    for path, load in loads.items():
        old_bias = model.params[path[0]]["mixer"]["gate"]["e_score_correction_bias"]
        new_bias = new[path[0]]["mixer"]["gate"]["e_score_correction_bias"]
        np.testing.assert_allclose(new_bias - old_bias, 1e-2 * np.sign(np.mean(load) - np.asarray(load)), atol=1e-9)
        assert np.any(np.asarray(new_bias) != np.asarray(old_bias))
