"""Quantized-training GEMMs (docs/formats.md 4-5): forward, dgrad and wgrad against oracles
composed by hand from `quantize(...).dequantize()`, the RHT's effect on the weight gradient, stochastic-rounding
unbiasedness, a tiny network that learns, and jit / vmap over stacked experts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.formats import e2m1_neighbours
from nemojax.lowp.matmul import fake_matmul, matmul, quantized_matmul
from nemojax.lowp.qarray import expand_block_scale, quantize
from nemojax.lowp.recipe import LinearQuant, TensorQuant
from nemojax.quant import named_recipes

FP8 = named_recipes.fp8_training().default  # E4M3 x and W, E5M2 grads, per-tensor current scaling
NVFP4 = named_recipes.nvfp4_training().default  # 1x16 x, 16x16 W, 1x16 SR grads, RHT on wgrad
MXFP8 = LinearQuant(weight=TensorQuant("mxfp8"), input=TensorQuant("mxfp8"), grad=TensorQuant("mxfp8"))
NVFP4_1D = LinearQuant(weight=TensorQuant("nvfp4"), input=TensorQuant("nvfp4"), grad=TensorQuant("nvfp4"))
SPECS = {"fp8_hybrid": FP8, "nvfp4": NVFP4, "mxfp8": MXFP8, "nvfp4_1d_weight": NVFP4_1D}

# T = 2 * 20 = 40 tokens: not a multiple of 16 or 32, so the wgrad padding is exercised.
LEAD, K, N = (2, 20), 32, 48


def _data(seed=0, lead=LEAD, k=K, n=N):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    # Row-varying magnitudes so that block scales differ.
    x = jax.random.normal(kx, (*lead, k)) * jnp.exp(jax.random.normal(kx, (*lead, 1)))
    w = jax.random.normal(kw, (k, n)) / np.sqrt(k)
    dy = jax.random.normal(kd, (*lead, n)) * 1e-3
    return x, w, dy


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "rounding"))
def _dq_jit(a, fmt, axis, amax=None, block_scale=None, rounding="rne", key=None):
    q = quantize(a, fmt, axis=axis, amax=amax, block_scale=block_scale, rounding=rounding, key=key)
    return q.dequantize(jnp.float32)


def _dq(a, fmt, axis, **kw):
    """quantize(a, fmt, along axis).dequantize() as float64 numpy (jitted: eager quantize is slow on CPU)."""
    return np.asarray(_dq_jit(jnp.asarray(a, jnp.float32), fmt, axis, **kw), np.float64)


def _pad_rows(a, multiple):
    return np.pad(a, ((0, -a.shape[0] % multiple), (0, 0)))


def _rht_ref(a, axis=0):
    """Spec 4.2: groups of 16 along `axis`, each right-multiplied by R = D H16 / 4 (numpy float64)."""
    h = np.ones((1, 1))
    for _ in range(4):
        h = np.block([[h, h], [h, -h]])
    d = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], np.float64)
    r = d[:, None] * h / 4
    am = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    out = (am.reshape(*am.shape[:-1], -1, 16) @ r).reshape(am.shape)
    return np.moveaxis(out, -1, axis)


@functools.partial(jax.jit, static_argnums=0)
def _grads_jit(spec, x, w, dy, key, input_amax):
    y, vjp = jax.vjp(lambda x, w: quantized_matmul(x, w, spec, key=key, input_amax=input_amax), x, w)
    return (y, *vjp(dy))


def _grads(spec, x, w, dy, key=None, input_amax=0.0):
    """(y, dx, dw) of quantized_matmul as numpy arrays (input_amax 0: the current amax)."""
    return tuple(np.asarray(a) for a in _grads_jit(spec, x, w, dy, key, jnp.float32(input_amax)))


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_equals_dot_of_fake_quantized_operands(name):
    spec = SPECS[name]
    x, w, _ = _data()
    y = jax.jit(lambda x, w: quantized_matmul(x, w, spec, key=jax.random.key(1)))(x, w)

    @jax.jit
    def oracle(x, w):
        xq = fake_quant(x, spec.input.fmt, axis=-1)
        wq = fake_quant(w, spec.weight.fmt, axis=0)
        return jnp.einsum("btk,kn->btn", xq, wq, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)

    want = oracle(x, w)
    assert y.shape == (*LEAD, N) and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    # ... and the quantization is real: the result is not the high-precision product.
    exact = np.einsum("btk,kn->btn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    rel = np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact)
    assert (1e-3 if "fp8" in name else 1e-2) < rel < 0.2


def test_forward_bfloat16_output_dtype_and_float32_accumulation():
    x, w, _ = _data()
    xb = x.astype(jnp.bfloat16)
    y = quantized_matmul(xb, w, FP8)
    assert y.dtype == jnp.bfloat16
    want = np.einsum("btk,kn->btn", _dq(xb, "fp8_e4m3", -1), _dq(w, "fp8_e4m3", 0))
    # One bfloat16 rounding of an f32-accumulated result: relative error <= 2^-8.
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-8, atol=1e-6)


def test_static_amax_replaces_current_where_positive():
    x, w, _ = _data()
    cur_x = float(jnp.max(jnp.abs(x)))
    cur_w = float(jnp.max(jnp.abs(w)))
    spec = NVFP4
    key = jax.random.key(0)
    # A calibrated amax of half the current one clips the largest values: the result must follow it.
    qmm = jax.jit(lambda x, w, ax, aw: quantized_matmul(x, w, spec, key=key, input_amax=ax, weight_amax=aw))
    y = qmm(x, w, jnp.float32(cur_x / 2), jnp.float32(cur_w / 2))
    want = np.einsum("btk,kn->btn", _dq(x, "nvfp4", -1, amax=cur_x / 2), _dq(w, "nvfp4_2d", 0, amax=cur_w / 2))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    dynamic = np.asarray(jax.jit(lambda x, w: quantized_matmul(x, w, spec, key=key))(x, w))
    assert np.abs(np.asarray(y) - dynamic).max() > 1e-2
    # amax 0 means "not calibrated": the current amax is used.
    y0 = qmm(x, w, jnp.float32(0), jnp.float32(0))
    np.testing.assert_array_equal(np.asarray(y0), dynamic)


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("name", list(SPECS))
def test_backward_equals_hand_composed_oracle(name):
    spec = SPECS[name]
    x, w, dy = _data(1)
    key = jax.random.key(7)
    _, dx, dw = _grads(spec, x, w, dy, key=key)

    sr = spec.grad.rounding == "stochastic"
    k_dgrad, k_wgrad = jax.random.split(key) if sr else (None, None)
    g = dict(rounding="stochastic") if sr else {}
    x2, dy2 = np.asarray(x).reshape(-1, K), np.asarray(dy).reshape(-1, N)

    # dgrad: dy quantized along N (SR for NVFP4) times W quantized for the N contraction. The 2D weight is the
    # forward's quantized W; a 1D weight is quantized columnwise (along N), which differs from the rowwise one.
    w_axis = 0 if spec.weight.fmt == "nvfp4_2d" else 1
    dqw = _dq(w, spec.weight.fmt, w_axis)
    dx_want = _dq(dy2, spec.grad.fmt, -1, key=k_dgrad, **g) @ dqw.T
    np.testing.assert_allclose(dx.reshape(-1, K), dx_want, rtol=1e-5, atol=1e-6 * np.abs(dx_want).max())
    if name == "nvfp4_1d_weight":
        assert np.abs(dqw - _dq(w, "nvfp4", 0)).max() > 0  # Q(W^T) != Q(W)^T in 1D (docs/formats.md 4)

    # wgrad: both operands along tokens (zero-padded to a block multiple), RHT first for NVFP4.
    mult = 32 if spec.grad.fmt.startswith("mx") else 16
    xc, dyc = _pad_rows(x2, mult), _pad_rows(dy2, mult)
    if spec.rht:
        from nemojax.lowp.hadamard import rht

        xc, dyc = np.asarray(rht(jnp.asarray(xc), 0)), np.asarray(rht(jnp.asarray(dyc), 0))
    dw_want = _dq(xc, spec.input.fmt, 0).T @ _dq(dyc, spec.grad.fmt, 0, key=k_wgrad, **g)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-5, atol=1e-6 * np.abs(dw_want).max())
    # Quantized, not the exact gradients.
    exact_dw = x2.astype(np.float64).T @ dy2
    assert np.abs(dw - exact_dw).max() > 1e-4 * np.abs(exact_dw).max()


def test_fp8_hybrid_gradients_use_e5m2():
    """The E5M2 gradient quantization is visible: dy on the E5M2 grid gives the same dx, on E4M3 it would not."""
    x, w, dy = _data(2)
    _, dx, _ = _grads(FP8, x, w, dy)
    dqw = _dq(w, "fp8_e4m3", 1)
    dy2 = np.asarray(dy).reshape(-1, N)
    e5 = _dq(dy2, "fp8_e5m2", -1) @ dqw.T
    e4 = _dq(dy2, "fp8_e4m3", -1) @ dqw.T
    np.testing.assert_allclose(dx.reshape(-1, K), e5, rtol=1e-5, atol=1e-9)
    assert np.abs(e5 - e4).max() > 1e-3 * np.abs(e5).max()


def test_rht_wgrad_is_orthonormal_without_quantization(monkeypatch):
    """With the quantizers replaced by the identity, the RHT'd wgrad is x^T dy (R orthonormal, zero padding)."""
    from nemojax.lowp import matmul as lowp_matmul

    x, w, dy = _data(3)
    monkeypatch.setattr(lowp_matmul, "_dq", lambda a, *args, **kw: a.astype(jnp.float32))
    # Not through the jitted _grads: a cached trace would not see the patch.
    _, vjp = jax.vjp(lambda x, w: quantized_matmul(x, w, NVFP4, key=jax.random.key(0)), x, w)
    dx, dw = (np.asarray(a) for a in vjp(dy))
    x2, dy2 = np.asarray(x, np.float64).reshape(-1, K), np.asarray(dy, np.float64).reshape(-1, N)
    exact = x2.T @ dy2
    np.testing.assert_allclose(dw, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_allclose(dx.reshape(-1, K), dy2 @ np.asarray(w, np.float64).T, rtol=1e-5, atol=1e-10)
    # The transform did happen: the RHT'd operands are not the raw ones.
    assert np.abs(_rht_ref(_pad_rows(x2, 16)) - _pad_rows(x2, 16)).max() > 0.1


def test_rht_matches_spec_matrix_and_wgrad_differs_only_by_quantization():
    from nemojax.lowp.hadamard import rht

    x, w, dy = _data(4)
    x2, dy2 = np.asarray(x, np.float64).reshape(-1, K), np.asarray(dy, np.float64).reshape(-1, N)
    # The library's RHT is arXiv 2509.25149's R = D H16 / 4, right-multiplied on groups of 16 along the token axis.
    xp = _pad_rows(x2, 16)
    np.testing.assert_allclose(np.asarray(rht(jnp.asarray(xp, jnp.float32), 0)), _rht_ref(xp), rtol=1e-5, atol=1e-5)
    exact = x2.T @ dy2
    no_rht = LinearQuant(weight=NVFP4.weight, input=NVFP4.input, grad=NVFP4.grad, rht=False)
    key = jax.random.key(5)
    _, _, dw_rht = _grads(NVFP4, x, w, dy, key=key)
    _, _, dw_plain = _grads(no_rht, x, w, dy, key=key)
    err_rht = np.linalg.norm(dw_rht - exact) / np.linalg.norm(exact)
    err_plain = np.linalg.norm(dw_plain - exact) / np.linalg.norm(exact)
    assert np.abs(dw_rht - dw_plain).max() > 0  # a different quantization ...
    assert 0 < err_rht < 0.25 and 0 < err_plain < 0.25  # ... of the same product (NVFP4-sized errors)


def test_stochastic_rounding_dgrad_is_unbiased():
    """Mean over M keys of the SR dgrad -> E[DQ_SR(dy)] @ DQ(QW)^T within 5 standard errors (per element)."""
    x, w, dy = _data(5, lead=(32,))
    M = 512

    @jax.jit
    def dgrad(key):
        _, vjp = jax.vjp(lambda x: quantized_matmul(x, w, NVFP4, key=key), x)
        return vjp(dy)[0]

    keys = jax.random.split(jax.random.key(11), M)
    dxs = np.asarray(jax.lax.map(dgrad, keys), np.float64)
    mean = dxs.mean(0)

    # E[DQ_SR(dy)] = clip(dy / s, -6, 6) * s with s = d_b * S_dec per element; Var = (hi - lo)^2 p (1 - p) s^2.
    q = quantize(dy, "nvfp4", axis=-1)
    s = np.asarray(expand_block_scale(q.scale.astype(jnp.float32), "nvfp4", 1, dy.shape) * q.global_scale,
                   np.float64)
    v = np.clip(np.asarray(dy, np.float64) / s, -6, 6)
    lo, hi = (np.asarray(a, np.float64) for a in e2m1_neighbours(jnp.asarray(v, jnp.float32)))
    p = np.where(hi > lo, (np.abs(v) - lo) / np.where(hi > lo, hi - lo, 1), 0)
    var_dy = (hi - lo) ** 2 * p * (1 - p) * s**2
    dqw = _dq(w, "nvfp4_2d", 0)
    expect = (v * s) @ dqw.T
    se = np.sqrt(var_dy @ (dqw.T**2) / M)
    z = np.abs(mean - expect) / (se + 1e-30)
    assert z.max() < 5.0, z.max()
    # One RNE draw is far off by comparison (bias), and the SR mean beats it.
    rne = _dq(dy, "nvfp4", -1) @ dqw.T
    err_mean = np.linalg.norm(mean - expect)
    err_rne = np.linalg.norm(rne - expect)
    assert err_mean < 0.2 * err_rne, (err_mean, err_rne)


def test_stochastic_rounding_key_handling():
    x, w, dy = _data(6)
    with pytest.raises(ValueError, match="key"):
        quantized_matmul(x, w, NVFP4)
    a = _grads(NVFP4, x, w, dy, key=jax.random.key(1))
    b = _grads(NVFP4, x, w, dy, key=jax.random.key(1))
    c = _grads(NVFP4, x, w, dy, key=jax.random.key(2))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[0], c[0])  # the forward does not depend on the key
    assert np.abs(a[1] - c[1]).max() > 0 and np.abs(a[2] - c[2]).max() > 0


def test_no_gradient_to_amaxes_or_key():
    x, w, _ = _data(7)

    def loss(x, w, ax, aw):
        return jnp.sum(quantized_matmul(x, w, FP8, input_amax=ax, weight_amax=aw) ** 2)

    gx, gw, gax, gaw = jax.grad(loss, argnums=(0, 1, 2, 3))(x, w, jnp.float32(3.0), jnp.float32(0.5))
    assert float(gax) == 0.0 and float(gaw) == 0.0
    assert np.abs(np.asarray(gx)).max() > 0 and np.abs(np.asarray(gw)).max() > 0


def test_bad_arguments_raise():
    x, w, _ = _data()
    with pytest.raises(ValueError, match="spec.grad"):
        quantized_matmul(x, w, LinearQuant(weight=TensorQuant("nvfp4"), input=TensorQuant("nvfp4")))
    with pytest.raises(ValueError, match="K="):
        quantized_matmul(x[..., :16], w, FP8)
    with pytest.raises(ValueError, match="weight_block_scale"):
        matmul(x, w, FP8, weight_block_scale=jnp.ones((2, N)))
    with pytest.raises(ValueError, match="rounding"):
        bad = LinearQuant(weight=TensorQuant("nvfp4", rounding="stochastic"), input=TensorQuant("nvfp4"),
                          grad=TensorQuant("nvfp4"))
        quantized_matmul(x, w, bad, key=jax.random.key(0))


# ------------------------------------------------------------------------------------------------ dispatch, QAT


def test_matmul_dispatch_and_fake_path_gradients():
    x, w, dy = _data(8)
    # no spec: the plain product.
    plain = np.einsum("btk,kn->btn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(matmul(x, w, None)), plain, rtol=1e-5, atol=1e-5)
    # QAT spec: fake-quantized forward, straight-through (high-precision) backward.
    qat = named_recipes.nvfp4().default  # static amaxes, clipped STE
    ax = jnp.float32(float(jnp.max(jnp.abs(x))) / 2)
    y, vjp = jax.vjp(lambda x, w: matmul(x, w, qat, input_amax=ax), x, w)
    xq = _dq(x, "nvfp4", -1, amax=float(ax))
    wq = _dq(w, "nvfp4", 0)
    np.testing.assert_allclose(np.asarray(y), np.einsum("btk,kn->btn", xq, wq), rtol=1e-5, atol=1e-6)
    dx, dw = vjp(dy)
    inside = np.abs(np.asarray(x)) <= float(ax)  # clipped STE on x (amax half the max: some are clipped)
    assert 0 < (~inside).sum()
    dy64 = np.asarray(dy, np.float64)
    np.testing.assert_allclose(np.asarray(dx), (dy64 @ wq.T) * inside, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btk,btn->kn", xq, dy64), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(fake_matmul(x, w, qat, input_amax=ax)), np.asarray(y))


def test_fake_path_static_block_scales():
    x, w, _ = _data(9)
    spec = LinearQuant(weight=TensorQuant("nvfp4", static=True, block_scales="static"))
    bs = quantize(w, "nvfp4", axis=0).scale.astype(jnp.float32) * 2  # coarser scales than the dynamic ones
    y = matmul(x, w, spec, weight_block_scale=bs)
    want = np.einsum("btk,kn->btn", np.asarray(x, np.float64), _dq(w, "nvfp4", 0, block_scale=bs))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - np.einsum("btk,kn->btn", np.asarray(x, np.float64), _dq(w, "nvfp4", 0))).max() > 1e-3
    with pytest.raises(ValueError, match="weight_block_scale"):
        matmul(x, w, spec)


# ------------------------------------------------------------------------------------------------ training, vmap


@functools.cache
def _train(spec, steps=30, lr=0.5):
    kx, k1, k2, kt = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (64, 32))
    teacher = jax.random.normal(kt, (32, 16)) / np.sqrt(32)
    target = jnp.tanh(x @ teacher)
    params = {"w1": jax.random.normal(k1, (32, 64)) / np.sqrt(32), "w2": jax.random.normal(k2, (64, 16)) / 8}

    def loss(p, key):
        ka, kb = jax.random.split(key)
        h = jnp.tanh(matmul(x, p["w1"], spec, key=ka))
        return jnp.mean((matmul(h, p["w2"], spec, key=kb) - target) ** 2)

    @jax.jit
    def step(p, key):
        val, g = jax.value_and_grad(loss)(p, key)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), val

    losses = []
    for i in range(steps):
        params, val = step(params, jax.random.key(100 + i))
        losses.append(float(val))
    return tuple(losses)


@pytest.mark.parametrize("name", ["fp8_hybrid", "nvfp4"])
def test_tiny_network_learns(name):
    losses = _train(SPECS[name])
    ref = _train(None)
    assert losses[-1] < 0.5 * losses[0], losses
    # Quantized training tracks high-precision training.
    assert losses[-1] < 1.5 * ref[-1] + 1e-3, (losses[-1], ref[-1])


def test_jit_vmap_over_experts_equals_loop():
    """NVFP4 (SR keys per expert, RHT, 2D weights, a per-expert amax); FP8 runs the same code with other formats."""
    spec, E = NVFP4, 3
    data = [_data(20 + e) for e in range(E)]
    x, w, dy = (jnp.stack([d[i] for d in data]) for i in range(3))  # [E, 2, 20, K], [E, K, N], [E, 2, 20, N]
    keys = jax.random.split(jax.random.key(13), E)
    amax = jnp.array([0.0, 2.0, 0.0], jnp.float32)  # expert 1 has a calibrated input amax (< its max |x|)
    got = jax.jit(jax.vmap(lambda *a: _grads_jit.__wrapped__(spec, *a)))(x, w, dy, keys, amax)
    for e in range(E):
        want = _grads(spec, x[e], w[e], dy[e], keys[e], amax[e])
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g[e]), r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
    # Expert 1's calibrated amax changes its output relative to the dynamic amax.
    dyn = _grads(spec, x[1], w[1], dy[1], keys[1])[0]
    assert np.abs(np.asarray(got[0][1]) - dyn).max() > 1e-3
