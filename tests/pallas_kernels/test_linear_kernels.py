"""Quantized models on the Pallas matmul kernels (nemojax/nn/pallas_quant_linear.py) against the fake-quantized path.

`config.runtime.matmul_impl="pallas"` runs every covered quantized Linear through fp8_matmul / nvfp4_matmul (interpret
mode on CPU); "xla" runs the fake path. Logits and gradients must agree; uncovered layers must fall back.
Errors are relative to the largest |logit| (or |grad|) of the xla run.
"""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import nemojax
from nemojax import quant
from nemojax.lowp.qarray import quantize
from nemojax.lowp.recipe import LinearQuant, QuantRecipe, TensorQuant, is_state
from nemojax.nn.linear import Linear

TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 260)
N_QUANTIZED = 8  # quantized linears of the tiny model: Mamba in_proj_{z,x,B,C,dt} and out_proj, MLP up/down_proj


@pytest.fixture(scope="module")
def model() -> nemojax.Model:
    # Mamba and MLP, hidden 64: K in (64, 128), multiples of 32; in_proj's N = 328 spans several N blocks.
    # No attention layer: with the fp8 recipe's FP8 KV cache, a 1-ulp difference in a k/v projection can flip one
    # E4M3 rounding of K or V downstream and move a logit by ~1e-2 (seen at the first position), which would
    # measure the cache quantizer, not the kernels. Attention projections use the same Linear.
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M-")
    return nemojax.Model.init(config, 0)


def _with_impl(m: nemojax.Model, impl: str, dtype: str | None = None) -> nemojax.Model:
    config = m.config.replace(runtime={"matmul_impl": impl, **({"dtype": dtype} if dtype else {})})
    return nemojax.Model(config, m.params)


def _count_kernels(fn, *args) -> int:
    """Number of Pallas calls in fn's jaxpr, nested ones included (the kernel path really ran, or did not)."""

    def count(eqns) -> int:
        n = 0
        for e in eqns:
            n += e.primitive.name == "pallas_call"
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                n += count(sub.eqns)
        return n

    return count(jax.make_jaxpr(fn)(*args).jaxpr.eqns)


def _n_kernels(m: nemojax.Model) -> int:
    return _count_kernels(lambda p: nemojax.Model(m.config, p)(TOKENS), m.params)


def _logits(m: nemojax.Model) -> jax.Array:
    return jax.jit(lambda p: nemojax.Model(m.config, p)(TOKENS))(m.params)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4_w4a16", "nvfp4"])
def test_logits_and_grads_match_fake_path(model, recipe):
    q = quant.apply(model, recipe)
    kern, fake = _with_impl(q, "pallas"), _with_impl(q, "xla")
    assert _n_kernels(kern) == N_QUANTIZED and _n_kernels(fake) == 0

    def loss_and_grads(config):
        def loss(params):
            y = nemojax.Model(config, params)(TOKENS)
            return jnp.mean(jax.nn.log_softmax(y)[..., 0]), y

        (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(q.params)
        return y, flatten_dict(g)

    if recipe != "nvfp4":  # the backward is the fake path's whatever the kernel: gradients checked once (W4A4)
        y_k, y_f = _logits(kern), _logits(fake)
        assert _rel(y_k, y_f) < 1e-5 and _rel(y_f, _logits(model)) > 1e-3
        return
    (y_k, g_k), (y_f, g_f) = loss_and_grads(kern.config), loss_and_grads(fake.config)
    assert _rel(y_k, y_f) < 1e-5  # f32: summation order and scale placement only; measured <= 3.5e-7
    assert _rel(y_f, _logits(model)) > 1e-3  # and quantization changed the logits
    for path in g_f:
        if is_state(path[-1]):  # frozen quantization state: zero gradient on both paths
            assert not np.any(g_k[path]) and not np.any(g_f[path]), path
        else:
            assert _rel(g_k[path], g_f[path]) < 1e-4, path  # measured <= 1.7e-6 (the same STE backward)


@pytest.mark.parametrize("recipe", ["nvfp4_w4a16"])
def test_bf16_logits_match_fake_path(model, recipe):
    q = quant.apply(model, recipe)
    kern, fake = _with_impl(q, "pallas", "bfloat16"), _with_impl(q, "xla", "bfloat16")
    assert _n_kernels(kern) == N_QUANTIZED
    y_k, y_f = _logits(kern), _logits(fake)
    # the kernel applies the scales to the f32 accumulator, the fake path to operands rounded to bf16, and the next
    # layer's quantizer can turn such a bf16 ulp into a whole E4M3 / E2M1 step: measured 1.9e-2 (fp8), 6.5e-3
    # (nvfp4_w4a16), 4.2e-2 for W4A4 nvfp4 (only W4A16 is tested here, for suite time)
    assert _rel(y_k, y_f) < 5e-2


def test_calibrated_state_is_used_by_the_kernels(model):
    """Static amaxes and static NVFP4 block scales, set by hand: the kernel path reads the same state."""
    t = dict(static=True, ste="clipped")
    recipe = QuantRecipe("calibrated", rules=(("lm_head", None),
                                              ("*_proj*", LinearQuant(weight=TensorQuant("nvfp4", block_scales="static",
                                                                                        **t),
                                                                     input=TensorQuant("fp8_e4m3", **t)))))
    q = quant.apply(model, recipe)
    flat = dict(flatten_dict(q.params))
    for path in [p for p in flat if p[-1] == "kernel_block_scale"]:
        w = flat[(*path[:-1], "kernel")]
        amax = 0.6 * jnp.max(jnp.abs(w))  # clips the largest weights
        flat[(*path[:-1], "kernel_amax")] = amax
        flat[(*path[:-1], "kernel_input_amax")] = jnp.float32(1.5)
        # block scales of a tensor 1.5x larger than W: valid E4M3 values that differ from the dynamic ones
        flat[path] = quantize(1.5 * w, "nvfp4", axis=0, amax=amax).scale.astype(jnp.float32)
    cal = nemojax.Model(q.config, unflatten_dict(flat))
    kern, fake = _with_impl(cal, "pallas"), _with_impl(cal, "xla")
    assert _n_kernels(kern) == N_QUANTIZED
    y_k, y_f = _logits(kern), _logits(fake)
    assert _rel(y_k, y_f) < 1e-5  # the bound of the uncalibrated case
    assert _rel(y_f, _logits(_with_impl(q, "xla"))) > 1e-3  # the state changed the logits


def test_uncovered_layers_fall_back(model):
    # K = 48 is not a multiple of 32: NVFP4 falls back to the fake path, bit-identical to "xla"
    nv = quant.named_recipes.nvfp4_w4a16().default
    config = model.config.replace(runtime={"quant": QuantRecipe("w4", default=nv), "matmul_impl": "pallas"})
    x = jax.random.normal(jax.random.key(2), (2, 3, 48))

    def run(config, x):
        layer = Linear(config, 40, ("embed", "mlp"), name="up_proj")
        params = layer.init(jax.random.key(0), x)
        f = lambda x: layer.apply(params, x)
        return f(x), _count_kernels(f, x)

    y_k, n_k = run(config, x)
    y_f, _ = run(config.replace(runtime={"matmul_impl": "xla"}), x)
    assert n_k == 0
    np.testing.assert_array_equal(np.asarray(y_k), np.asarray(y_f))
    x64 = jax.random.normal(jax.random.key(2), (2, 3, 64))
    assert run(config, x64)[1] == 1  # the same layer with K = 64 does run the kernel
    # "auto" stays on XLA until the kernel is device-validated; MX formats have no kernel
    q = quant.apply(model, "nvfp4")
    assert _n_kernels(_with_impl(q, "auto")) == 0
    assert _n_kernels(_with_impl(quant.apply(model, "mxfp8"), "pallas")) == 0


def test_native_fp4_path_for_w4a4(model, monkeypatch):
    """On hardware with block-scaled FP4 MMAs (forced here: has_native_fp4 -> True) a W4A4 NVFP4 layer runs
    nvfp4_block_scaled_matmul on both operands' codes, not the W4A16 kernel; off GPU that function computes its
    documented formula, so this checks the operand layouts and the global-scale epilogue against the fake path."""
    from nemojax.nn import pallas_quant_linear
    from pallas_kernels import quant_matmul

    calls = []
    native = pallas_quant_linear.nvfp4_block_scaled_matmul
    monkeypatch.setattr(quant_matmul, "has_native_fp4", lambda device=None: True)
    monkeypatch.setattr(pallas_quant_linear, "nvfp4_block_scaled_matmul",
                        lambda *a, **k: calls.append(1) or native(*a, **k))
    # the model's jitted forward caches traces by config: drop them before (an earlier test traced this config on
    # the W4A16 path) and after (so later tests do not reuse a trace made under the patch)
    jax.clear_caches()
    try:
        q = quant.apply(model, "nvfp4")
        kern, fake = _with_impl(q, "pallas"), _with_impl(q, "xla")
        assert _n_kernels(kern) == 0 and len(calls) == N_QUANTIZED  # no Pallas call: the library path
        assert _rel(_logits(kern), _logits(fake)) < 1e-5
    finally:
        jax.clear_caches()
