"""Quantization as a Model transform: apply / strip, the quantized forward against hand-composed oracles,
calibration against intercepted activations, frozen state in training, and the cached decode path."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import nemojax
from nemojax import quant
from nemojax.infer.cache import init_cache
from nemojax.infer.extend import decode_step, prefill
from nemojax.infer.load import model_config_from_dict
from nemojax.lowp import fake
from nemojax.lowp.recipe import NOT_LINEAR, LinearQuant, QuantRecipe, TensorQuant, is_state
from nemojax.nn.linear import Linear
from nemojax.train.optim import OptimizerConfig, make_optimizer
from nemojax.train.step import init_state, lm_loss, make_train_step

TOKENS = jax.random.randint(jax.random.key(1), (2, 20), 0, 260)


@pytest.fixture(scope="module")
def model() -> nemojax.Model:
    # Mamba, attention, MLP; hidden 64, byte vocabulary
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*-")
    return nemojax.Model.init(config, 0)


@pytest.fixture(scope="module")
def moe_model() -> nemojax.Model:
    # Mamba and a LatentMoE layer (8 experts, top 2, shared expert)
    config = nemojax.presets.get("nemotron-3-super-120b-a12b-tiny", vocab_size=260, pattern="ME", mtp=None)
    return nemojax.Model.init(config, 0)


def _linear_paths(params) -> list[tuple[str, ...]]:
    return [p[:-1] for p in flatten_dict(params) if p[-1] == "kernel" and p[-2] not in NOT_LINEAR]


def test_apply_adds_only_state_and_strip_inverts(model):
    q = quant.apply(model, "nvfp4")
    before, after = flatten_dict(model.params), flatten_dict(q.params)
    added = set(after) - set(before)
    assert set(before) <= set(after) and all(after[p] is before[p] for p in before)
    assert added and all(is_state(p[-1]) for p in added)
    # every quantized linear (all but lm_head) got a weight amax and an input amax; nothing else
    expected = {(*p, name) for p in _linear_paths(model.params) if p != ("lm_head",)
                for name in ("kernel_amax", "kernel_input_amax")}
    assert added == expected
    assert all(after[p].dtype == jnp.float32 and float(after[p].sum()) == 0.0 for p in added)
    back = quant.strip(q)
    assert back.config == model.config
    assert jax.tree.structure(back.params) == jax.tree.structure(model.params)


def test_weight_only_forward_equals_fake_quantized_kernels(model):
    """W4A16 (weights only): the model's logits equal the unquantized model run on kernels replaced by their
    fake-quantized values (blocks along `in`), exactly for the layers the recipe selects (not lm_head)."""
    q = quant.apply(model, "nvfp4_w4a16")
    flat = dict(flatten_dict(model.params))
    for path in _linear_paths(model.params):
        if path != ("lm_head",):
            flat[(*path, "kernel")] = fake.fake_quant(flat[(*path, "kernel")], "nvfp4", axis=0)
    oracle = nemojax.Model(model.config, unflatten_dict(flat))(TOKENS)
    np.testing.assert_array_equal(np.asarray(q(TOKENS)), np.asarray(oracle))
    assert float(jnp.max(jnp.abs(q(TOKENS) - model(TOKENS)))) > 1e-3  # and quantization changed something


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8_e4m3", "mxfp8"])
def test_linear_w_a_equals_oracle(model, fmt):
    """One Linear with weights and inputs quantized: fq(x) @ fq(W) with the calibrated input amax."""
    static = not fmt.startswith("mx")
    spec = LinearQuant(weight=TensorQuant(fmt, static=static), input=TensorQuant(fmt, static=static))
    config = model.config.replace(runtime={"quant": QuantRecipe("t", default=spec)})
    layer = Linear(config, 48, ("embed", "mlp"), name="proj")
    x = jax.random.normal(jax.random.key(2), (3, 5, 64))
    params = nn.meta.unbox(layer.init(jax.random.key(0), x)["params"])
    assert set(params) == ({"kernel", "kernel_amax", "kernel_input_amax"} if static else {"kernel"})
    if static:
        params = {**params, "kernel_input_amax": jnp.float32(1.5)}  # a calibrated amax below max|x| clips
    y = layer.apply({"params": params}, x)
    amax = dict(amax=jnp.float32(1.5)) if static else {}
    w_amax = dict(amax=jnp.max(jnp.abs(params["kernel"]))) if static else {}
    oracle = fake.fake_quant(x, fmt, **amax) @ fake.fake_quant(params["kernel"], fmt, axis=0, **w_amax)
    np.testing.assert_allclose(np.asarray(y), np.asarray(oracle), rtol=1e-6, atol=1e-6)


def _intercepted_inputs(model: nemojax.Model, tokens: jax.Array) -> dict[tuple[str, ...], float]:
    """max |x| of each Linear's input in the unquantized model (the oracle of "max" calibration)."""
    seen: dict[tuple[str, ...], float] = {}

    def grab(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, Linear):
            seen[ctx.module.path] = max(seen.get(ctx.module.path, 0.0), float(jnp.max(jnp.abs(args[0]))))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        jax.block_until_ready(nemojax.model.module(model.config).apply({"params": model.params}, tokens))
    return seen


def test_calibrate_max_matches_intercepted_activations(model):
    q = quant.apply(model, "fp8")  # W8A8 + FP8 KV cache, all static
    batches = [TOKENS[:1], TOKENS[1:]]
    cal = quant.calibrate(q, batches)
    flat = flatten_dict(cal.params)
    oracle = {}
    for b in batches:
        for path, value in _intercepted_inputs(model, b).items():
            oracle[path] = max(oracle.get(path, 0.0), value)
    for path, value in oracle.items():
        if path == ("lm_head",):
            assert (*path, "kernel_input_amax") not in flat
            continue
        np.testing.assert_allclose(float(flat[(*path, "kernel_input_amax")]), value, rtol=1e-6)
        # the Mamba in_proj parts share one weight amax: the max over the checkpoint's fused in_proj
        parts = [p for p in flat if p[-1] == "kernel" and p[:-2] == path[:-1] and p[-2].startswith("in_proj_")]
        weights = parts if path[-1].startswith("in_proj_") else [(*path, "kernel")]
        assert len(weights) == (5 if path[-1].startswith("in_proj_") else 1)
        np.testing.assert_allclose(float(flat[(*path, "kernel_amax")]),
                                   max(float(jnp.max(jnp.abs(flat[w]))) for w in weights), rtol=0)
    # the KV cache amaxes: max |k|, |v| of the attention layer (k = x W_k, no RoPE in NemotronH)
    k_seen = []

    def grab(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, Linear) and ctx.module.path[-1] == "k_proj":
            k_seen.append(float(jnp.max(jnp.abs(out))))
        return out

    with nn.intercept_methods(grab):
        for b in batches:
            nemojax.model.module(model.config).apply({"params": model.params}, b)
    np.testing.assert_allclose(float(flat[("layers_1", "mixer", "k_amax")]), max(k_seen), rtol=1e-6)


def test_calibrated_amax_is_used(model):
    q = quant.calibrate(quant.apply(model, "nvfp4"), [TOKENS])
    flat = dict(flatten_dict(q.params))
    path = ("layers_0", "mixer", "in_proj_x", "kernel_input_amax")
    flat[path] = flat[path] * 0.25  # clips the layer's inputs
    clipped = nemojax.Model(q.config, unflatten_dict(flat))
    assert float(jnp.max(jnp.abs(clipped(TOKENS) - q(TOKENS)))) > 1e-3


def test_moe_experts_amax_per_expert_and_routed_tokens_only(moe_model):
    q = quant.calibrate(quant.apply(moe_model, "nvfp4"), [TOKENS])
    e = q.params["layers_1"]["mixer"]["experts"]
    assert e["up_proj_input_amax"].shape == (8,) and e["up_proj_amax"].shape == (8,)
    np.testing.assert_allclose(np.asarray(e["up_proj_amax"]), np.max(np.abs(np.asarray(e["up_proj"])), axis=(1, 2)))
    # oracle: the expert inputs are the latent projections of the tokens routed to each expert
    seen = {}

    def grab(next_fun, args, kwargs, ctx):
        if (ctx.method_name == "__call__" and type(ctx.module).__name__ == "Experts"
                and ctx.module.path[0] == "layers_1"):
            x, _, ids = args
            seen["x"], seen["ids"] = np.asarray(x), np.asarray(ids)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        nemojax.model.module(moe_model.config).apply({"params": moe_model.params}, TOKENS)
    for j in range(8):
        routed = (seen["ids"] == j).any(-1)
        want = np.abs(seen["x"][routed]).max() if routed.any() else 0.0
        np.testing.assert_allclose(float(e["up_proj_input_amax"][j]), want, rtol=1e-6)


def test_mse_calibration_lowers_weight_error(moe_model):
    q = quant.apply(moe_model, "nemotron3_super_nvfp4")
    with pytest.raises(ValueError, match="method='mse'"):
        quant.calibrate(q, [TOKENS])
    cal = quant.calibrate(q, [TOKENS], method="mse")
    e = cal.params["layers_1"]["mixer"]["experts"]
    w = e["up_proj"]
    dynamic = jax.vmap(lambda w: fake.fake_quant(w, "nvfp4", axis=0))(w)
    static = jax.vmap(lambda w, a, s: fake.fake_quant(w, "nvfp4", axis=0, amax=a, block_scale=s))(
        w, e["up_proj_amax"], e["up_proj_block_scale"])
    assert float(jnp.sum((static - w) ** 2)) < 0.9 * float(jnp.sum((dynamic - w) ** 2))


def test_grad_jit_vmap_and_frozen_state(model):
    q = quant.calibrate(quant.apply(model, "nvfp4"), [TOKENS])
    loss = lm_loss(q.config)
    batch = {"tokens": TOKENS, "targets": jnp.roll(TOKENS, -1, 1), "loss_mask": jnp.ones_like(TOKENS)}
    grads = jax.jit(jax.grad(lambda p: loss(p, batch, jax.random.key(0))[0]))(q.params)
    for path, g in flatten_dict(grads).items():
        if is_state(path[-1]):
            assert float(jnp.max(jnp.abs(g))) == 0.0, path
    assert float(jnp.max(jnp.abs(grads["layers_0"]["mixer"]["in_proj_x"]["kernel"]))) > 0
    # vmap over sequences equals the batched forward
    per_seq = jax.vmap(lambda t: q(t[None])[0])(TOKENS)
    np.testing.assert_allclose(np.asarray(per_seq), np.asarray(q(TOKENS)), rtol=1e-5, atol=1e-5)
    # a few optimizer steps move the weights and leave the state alone
    opt = make_optimizer(OptimizerConfig(lr=1e-2, total_steps=3, warmup_steps=0, schedule="constant"))
    step = jax.jit(make_train_step(opt, loss))
    state = init_state(q, opt, jax.random.key(0))
    for _ in range(3):
        state, _ = step(state, batch)
    before, after = flatten_dict(q.params), flatten_dict(state.params)
    for path in before:
        same = bool(jnp.all(before[path] == after[path]))
        assert same == is_state(path[-1]) or path[-1] in ("A_log", "D", "dt_bias", "scale", "bias"), path


def test_cached_decode_equals_forward_with_fp8_kv(model):
    q = quant.calibrate(quant.apply(model, "fp8"), [TOKENS])
    full = q(TOKENS)
    cache = init_cache(q.config, batch=2, max_len=24)
    logits, cache = prefill(q.config, q.params, TOKENS[:, :12], jnp.array([12, 12]), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 11]), rtol=1e-4, atol=1e-4)
    for t in range(12, 16):
        logits, cache = decode_step(q.config, q.params, TOKENS[:, t], cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)


def test_config_round_trip_and_hf_save(model, tmp_path):
    q = quant.calibrate(quant.apply(model, "nemotron3_nano_nvfp4"), [TOKENS])
    d = json.loads(json.dumps(dataclasses.asdict(q.config)))
    assert model_config_from_dict(d) == q.config
    nemojax.save_hf(q, tmp_path / "hp")  # the high-precision weights; the quantization state is not HF's
    back = nemojax.load_hf(tmp_path / "hp")
    assert back.config.runtime.quant is None
    for path, leaf in flatten_dict(quant.strip(q).params).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(back.params)[path]), np.asarray(leaf))


def test_errors(model):
    with pytest.raises(ValueError, match="quant recipe 'int8' is unknown"):
        quant.apply(model, "int8")
    with pytest.raises(ValueError, match="apply a recipe first"):
        quant.calibrate(model, [TOKENS])
    q = quant.apply(model, "nvfp4")
    with pytest.raises(ValueError, match="method='minmax' is invalid"):
        quant.calibrate(q, [TOKENS], method="minmax")
    with pytest.raises(ValueError, match="pass calibration batches"):
        quant.calibrate(q, None)
    with pytest.raises(ValueError, match="integer tokens"):
        quant.calibrate(q, [jnp.ones((2, 3, 4))])
