"""Tests for nemojax.nn.moe: the router against a numpy re-implementation of docs/numerics.md 8,
hand-derived routing cases, dense == ragged == numpy expert loop, and the latent MoE module against numpy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import ModelConfig, MoEConfig, Runtime
from nemojax.nn import moe

route = jax.jit(moe.route, static_argnames=("top_k", "n_group", "topk_group", "norm_topk_prob", "scaling"))
experts_dense = jax.jit(moe.experts_dense)
experts_ragged = jax.jit(moe.experts_ragged)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _np_route(logits, bias, *, top_k, n_group, topk_group, norm_topk_prob, scaling):
    """Spec 3.1, token by token in float64: sigmoid; bias for selection only; groups scored by the sum of their
    top-2 biased scores, best topk_group kept; top-k; weights from the unbiased sigmoid, normalised with +1e-20,
    then scaled. Returns (weights, ids), each row sorted by expert id."""
    T, E = logits.shape
    s = _sigmoid(logits.astype(np.float64))
    weights, ids = np.zeros((T, top_k)), np.zeros((T, top_k), int)
    for t in range(T):
        sel = s[t] + bias
        if n_group > 1:
            groups = sel.reshape(n_group, E // n_group)
            group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
            kept = np.argsort(-group_score)[:topk_group]
            allowed = np.zeros(n_group, bool)
            allowed[kept] = True
            sel = np.where(np.repeat(allowed, E // n_group), sel, -np.inf)
        chosen = np.sort(np.argsort(-sel)[:top_k])
        w = s[t, chosen]
        if norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        weights[t], ids[t] = w * scaling, chosen
    return weights, ids


def _sorted_by_id(weights, ids):
    """Rows of (weights, ids) reordered by expert id (top-k order is irrelevant, docs/numerics.md 8)."""
    weights, ids = np.asarray(weights), np.asarray(ids)
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(weights, order, -1), np.take_along_axis(ids, order, -1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=2, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0),
        dict(top_k=3, n_group=1, topk_group=1, norm_topk_prob=True, scaling=2.5),
        dict(top_k=2, n_group=1, topk_group=1, norm_topk_prob=False, scaling=1.0),
        dict(top_k=3, n_group=4, topk_group=2, norm_topk_prob=True, scaling=2.5),
        dict(top_k=2, n_group=8, topk_group=3, norm_topk_prob=True, scaling=1.0),
    ],
)
def test_route_matches_numpy(kw) -> None:
    """route() picks the same experts with the same weights as the numpy re-implementation of docs/numerics.md 8."""
    rng = np.random.default_rng(0)
    T, E = 64, 16
    logits = rng.standard_normal((T, E)).astype(np.float32) * 2
    bias = rng.standard_normal(E).astype(np.float32) * 0.3
    w, ids = route(jnp.asarray(logits), jnp.asarray(bias), **kw)
    assert w.dtype == jnp.float32 and ids.shape == (T, kw["top_k"])
    w, ids = _sorted_by_id(w, ids)
    w_ref, ids_ref = _np_route(logits, bias.astype(np.float64), **kw)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-7)


def test_correction_bias_changes_choice_not_weights() -> None:
    """A large bias on expert 3 makes it chosen, but its weight is still its unbiased sigmoid, normalised.

    logits [2, 1, 0, -1]: without bias the top-2 is {0, 1}; with bias [0, 0, 0, 3] it is {0, 3} and the weights
    are sigmoid(2) and sigmoid(-1) over their sum, times the scaling 2.
    """
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    kw = dict(top_k=2, n_group=1, topk_group=1, norm_topk_prob=True, scaling=2.0)
    w, ids = _sorted_by_id(*route(logits, jnp.zeros(4), **kw))
    assert ids.tolist() == [[0, 1]]
    s0, s1, s3 = _sigmoid(2.0), _sigmoid(1.0), _sigmoid(-1.0)
    np.testing.assert_allclose(w, [[2 * s0 / (s0 + s1), 2 * s1 / (s0 + s1)]], rtol=1e-6)
    w, ids = _sorted_by_id(*route(logits, jnp.array([0.0, 0.0, 0.0, 3.0]), **kw))
    assert ids.tolist() == [[0, 3]]
    np.testing.assert_allclose(w, [[2 * s0 / (s0 + s3), 2 * s3 / (s0 + s3)]], rtol=1e-6)


def test_group_limit_hand_case() -> None:
    """8 experts in 4 groups of 2, keep 2 groups: group sums of the top-2 are [1.0, 1.2, 1.1, 0.2], so groups 1
    and 2 are kept and the best single expert 0 (0.99, in group 0) is NOT chosen; top-2 = {2, 3}."""
    probs = np.array([0.99, 0.01, 0.6, 0.6, 0.55, 0.55, 0.1, 0.1])
    logits = jnp.asarray(np.log(probs / (1 - probs)), jnp.float32)[None]
    kw = dict(top_k=2, n_group=4, topk_group=2, norm_topk_prob=False, scaling=1.0)
    w, ids = _sorted_by_id(*route(logits, jnp.zeros(8), **kw))
    assert ids.tolist() == [[2, 3]]
    np.testing.assert_allclose(w, [[0.6, 0.6]], rtol=1e-5)
    w, ids = _sorted_by_id(*route(logits, jnp.zeros(8), **{**kw, "n_group": 1, "topk_group": 1}))
    assert ids[0, 0] == 0  # without group limiting expert 0 wins


def test_normaliser_epsilon_avoids_nan() -> None:
    """With every sigmoid underflowing to 0 the weights are 0/(0 + 1e-20) = 0, not NaN."""
    w, _ = route(jnp.full((2, 4), -200.0), jnp.zeros(4), top_k=2, n_group=1, topk_group=1, norm_topk_prob=True,
                 scaling=1.0)
    np.testing.assert_array_equal(np.asarray(w), 0.0)


def _np_experts(x, up, down, weights, ids):
    """Token-by-token sum_k w_k * down_e(relu(up_e(x))^2) in float64."""
    x, up, down = (np.asarray(v, np.float64) for v in (x, up, down))
    out = np.zeros((x.shape[0], up.shape[1]))
    for t in range(x.shape[0]):
        for w, e in zip(np.asarray(weights)[t], np.asarray(ids)[t], strict=True):
            out[t] += w * (np.maximum(x[t] @ up[e], 0.0) ** 2) @ down[e]
    return out


def test_experts_dense_equals_ragged_equals_numpy() -> None:
    """Dense (one-hot) and ragged (sorted ragged_dot) dispatch both equal a numpy loop over tokens."""
    rng = np.random.default_rng(1)
    T, D, F, E = 96, 16, 12, 8
    x = rng.standard_normal((T, D)).astype(np.float32)
    up = (rng.standard_normal((E, D, F)) / np.sqrt(D)).astype(np.float32)
    down = (rng.standard_normal((E, F, D)) / np.sqrt(F)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    weights, ids = route(jnp.asarray(logits), jnp.zeros(E), top_k=2, n_group=1, topk_group=1,
                         norm_topk_prob=True, scaling=1.0)
    # Every expert gets at least one token, and some none-uniformly: the ragged path sees uneven groups.
    counts = np.bincount(np.asarray(ids).ravel(), minlength=E)
    assert counts.min() > 0 and counts.max() != counts.min()
    ref = _np_experts(x, up, down, weights, ids)
    dense = experts_dense(x, up, down, weights, ids)
    ragged = experts_ragged(x, up, down, weights, ids)
    assert dense.dtype == jnp.float32 and ragged.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dense), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ragged), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(dense), rtol=1e-5, atol=1e-6)


def test_ragged_with_unused_experts() -> None:
    """Experts that receive no token (zero-size ragged groups) do not disturb the others."""
    rng = np.random.default_rng(2)
    T, D, F, E = 10, 8, 6, 8
    x = rng.standard_normal((T, D)).astype(np.float32)
    up = rng.standard_normal((E, D, F)).astype(np.float32)
    down = rng.standard_normal((E, F, D)).astype(np.float32)
    ids = jnp.asarray(rng.choice([1, 5, 6], size=(T, 2)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (T, 2)), jnp.float32)
    ref = _np_experts(x, up, down, weights, ids)
    np.testing.assert_allclose(np.asarray(experts_ragged(x, up, down, weights, ids)), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(experts_dense(x, up, down, weights, ids)), ref, rtol=1e-5, atol=1e-4)


def _moe_config(impl: str, latent: int | None) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=24, pattern="E",
                       moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=12, shared_intermediate_size=20,
                                     latent_size=latent, routed_scaling_factor=2.5, n_group=2, topk_group=1),
                       initializer_range=0.3, runtime=Runtime(moe_impl=impl))


def _np_moe(p, x, cfg: ModelConfig) -> np.ndarray:
    """Spec 3.1-3.3 from the params: router on x; fc1 -> weighted experts -> fc2; plus the shared MLP on x."""
    e = cfg.moe
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    tokens = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    logits = tokens @ p["gate"]["kernel"]
    weights, ids = _np_route(logits, p["gate"]["e_score_correction_bias"], top_k=e.top_k, n_group=e.n_group,
                             topk_group=e.topk_group, norm_topk_prob=e.norm_topk_prob, scaling=e.routed_scaling_factor)
    v = tokens @ p["fc1_latent_proj"]["kernel"] if e.latent_size else tokens
    routed = _np_experts(v, p["experts"]["up_proj"], p["experts"]["down_proj"], weights, ids)
    if e.latent_size:
        routed = routed @ p["fc2_latent_proj"]["kernel"]
    sh = p["shared_experts"]
    shared = np.maximum(tokens @ sh["up_proj"]["kernel"], 0.0) ** 2 @ sh["down_proj"]["kernel"]
    return (routed + shared).reshape(np.shape(x))


@pytest.mark.parametrize(("impl", "latent"), [("dense", 16), ("ragged", 16), ("dense", None)])
def test_moe_module_matches_numpy(impl: str, latent: int | None) -> None:
    """The MoE module (router, optional fc1/fc2 latent, experts, shared expert) equals numpy from its params."""
    cfg = _moe_config(impl, latent)
    x = jax.random.normal(jax.random.key(0), (2, 7, cfg.hidden_size), jnp.float32)
    module = moe.MoE(cfg)
    params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
    # A random correction bias so selection differs from the unbiased top-k on some tokens.
    params["gate"]["e_score_correction_bias"] = jax.random.normal(jax.random.key(2), (8,)) * 0.1
    assert ("fc1_latent_proj" in params) == (latent is not None)
    assert params["experts"]["up_proj"].shape == (8, latent or cfg.hidden_size, 12)
    out, _ = jax.jit(module.apply)({"params": params}, x)
    ref = _np_moe(params, x, cfg)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def _quantized_moe_config(impl: str, recipe: str) -> ModelConfig:
    from nemojax.lowp.recipe import LinearQuant, QuantRecipe, TensorQuant
    from nemojax.quant import named_recipes

    hand_made = {  # current amaxes only; the Super experts' recipe (static amaxes and weight block scales)
        "dynamic_nvfp4": QuantRecipe("dynamic_nvfp4", default=LinearQuant(weight=TensorQuant("nvfp4"),
                                                                          input=TensorQuant("nvfp4"))),
        "static_block_scales": QuantRecipe("static_block_scales", default=LinearQuant(
            weight=TensorQuant("nvfp4", static=True, ste="clipped", block_scales="static"),
            input=TensorQuant("nvfp4", static=True, ste="clipped")))}
    quant = hand_made[recipe] if recipe in hand_made else named_recipes.get(recipe)
    return ModelConfig(vocab_size=32, hidden_size=32, pattern="E",
                       moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=16),
                       initializer_range=0.3, runtime=Runtime(moe_impl=impl, quant=quant))


@pytest.mark.parametrize("recipe", ["nvfp4", "static_block_scales", "dynamic_nvfp4", "mxfp8"])
def test_quantized_experts_ragged_equals_dense(recipe: str) -> None:
    """Fake-quantized experts: the ragged dispatch (top_k rows per token) gives the dense dispatch's output and
    gradients (every expert on its own routed tokens, one quantized GEMM per expert), with per-expert state that
    is calibrated for some experts (amax > 0, block scales set) and left to the current values for the others (0).
    Recipes: static amaxes (nvfp4), static weight block scales too (as Super's experts), current amaxes only, MX
    (no amax)."""
    dense_cfg, ragged_cfg = (_quantized_moe_config(impl, recipe) for impl in ("dense", "ragged"))
    x = jax.random.normal(jax.random.key(0), (2, 9, 32), jnp.float32)
    params = nn.meta.unbox(moe.MoE(dense_cfg).init(jax.random.key(1), x)["params"])
    experts = params["experts"]
    amaxes = sorted(k for k in experts if k.endswith("_amax"))
    assert bool(amaxes) == (recipe in ("nvfp4", "static_block_scales"))  # static per-tensor amaxes only there
    for i, name in enumerate(amaxes):  # calibrated for even experts; per-expert [E] entries
        current = np.abs(np.asarray(experts[name[: -len("_input_amax")] if "input" in name else name[:-5]]))
        value = 0.5 * float(current.max()) if "input" not in name else 1.5 + i
        experts[name] = jnp.where(jnp.arange(8) % 2 == 0, value, 0.0).astype(jnp.float32)
    for name in [k for k in experts if k.endswith("_block_scale")]:  # expert 0 calibrated, the others current
        experts[name] = experts[name].at[0].set(1.0)
    assert any(k.endswith("_block_scale") for k in experts) == (recipe == "static_block_scales")

    def loss(p, x, cfg):
        y, _ = moe.MoE(cfg).apply({"params": p}, x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    (_, y_dense), g_dense = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                    static_argnums=2)(params, x, dense_cfg)
    (_, y_ragged), g_ragged = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                      static_argnums=2)(params, x, ragged_cfg)
    plain = moe.MoE(dense_cfg.replace(runtime={"quant": None})).apply({"params": params}, x)[0]
    assert float(jnp.max(jnp.abs(y_dense - plain))) > 1e-3  # quantization did act
    np.testing.assert_allclose(np.asarray(y_ragged), np.asarray(y_dense), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ragged), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_ragged_quantizable_keeps_training_and_stochastic_rounding_dense() -> None:
    from nemojax.lowp.recipe import LinearQuant, TensorQuant
    from nemojax.quant import named_recipes

    assert moe.ragged_quantizable(None) and moe.ragged_quantizable(named_recipes.nvfp4().default)
    assert not moe.ragged_quantizable(named_recipes.fp8_training().default)  # quantized backward GEMMs
    sr = LinearQuant(weight=TensorQuant("nvfp4", rounding="stochastic"))
    assert not moe.ragged_quantizable(sr)
