"""quantize / dequantize / packing (docs/formats.md 1-4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemojax.lowp import reference as R
from nemojax.lowp.formats import FORMATS, e8m0_to_code
from nemojax.lowp.qarray import QArray, dequantize, expand_block_scale, pack_fp4, quantize, unpack_fp4


def _x(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_shapes_and_zero_tensor(fmt):
    x = _x((3, 40))
    q = quantize(x, fmt)
    assert q.data.shape == x.shape
    xh = q.dequantize()
    assert xh.dtype == x.dtype and xh.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(xh)))
    # a coarse accuracy check: every format keeps the relative RMSE below its element precision
    rel = float(jnp.sqrt(jnp.mean((x - xh) ** 2)) / jnp.sqrt(jnp.mean(x**2)))
    assert rel < {"fp8_e4m3": 0.05, "fp8_e5m2": 0.1, "mxfp8": 0.06}.get(fmt, 0.3)
    z = quantize(jnp.zeros((2, 32)), fmt).dequantize()
    np.testing.assert_array_equal(np.asarray(z), 0.0)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(xh))


def test_qarray_is_pytree_and_jit():
    x = _x((4, 32))
    q = jax.jit(lambda x: quantize(x, "nvfp4"))(x)
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(q2, QArray) and q2.fmt == "nvfp4" and q2.axis == 1 and q2.dtype == "float32"


def test_pack_matches_bitcast():
    codes = quantize(_x((3, 32)), "nvfp4").data
    p = pack_fp4(codes)
    ref = jax.lax.bitcast_convert_type(codes.reshape(3, 16, 2), jnp.uint8)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(ref))
    assert bool(jnp.all(unpack_fp4(p) == codes))


# --------------------------------------- NVFP4 scales, error bound, idempotence, exactness, symmetry, 2D blocks


def _np(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _mixed(shape=(16, 64), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 2, (shape[0], 1))).astype(np.float32)


def test_nvfp4_scales_and_flush_rule():
    x = _mixed()
    q = quantize(jnp.asarray(x), "nvfp4")
    d = _np(q.scale)
    A = np.max(np.abs(x))
    s_enc = np.float32(np.float32(2688.0) / np.float32(A))
    assert np.all(np.isfinite(d)) and np.all(d >= 0) and np.all(d <= 448)
    a_b = np.max(np.abs(x.reshape(16, 4, 16)), axis=-1)
    # d_b = 0 iff a_b * S_enc / 6 rounds to zero in E4M3, i.e. a_b * 448 / A <= 2^-10 (fp32 rounding aside)
    ratio = a_b * np.float32(448.0) / A
    clear = np.abs(np.log2(np.maximum(ratio, 1e-30)) + 10) > 1e-4
    np.testing.assert_array_equal((d == 0)[clear], (ratio <= 2.0**-10)[clear])
    assert (d == 0).any() and (d > 0).any()  # the test data really has flushed blocks
    gs = float(q.global_scale)
    assert np.isfinite(gs) and gs > 0 and gs == np.float32(1) / s_enc
    assert np.all(np.isfinite(_np(q.dequantize())))
    z = quantize(jnp.zeros((2, 32)), "nvfp4")
    assert np.all(_np(z.scale) == 0) and np.all(_np(z.dequantize()) == 0)
    assert np.isfinite(float(z.global_scale))


def test_nvfp4_amax_block_maps_to_448_and_6():
    x = _mixed(seed=1)
    i, j = np.unravel_index(np.argmax(np.abs(x)), x.shape)
    q = quantize(jnp.asarray(x), "nvfp4")
    assert _np(q.scale)[i, j // 16] == 448.0
    assert abs(_np(q.data)[i, j]) == 6.0
    q2 = quantize(jnp.asarray(x), "nvfp4_2d")
    assert _np(q2.scale)[i // 16, j // 16] == 448.0 and abs(_np(q2.data)[i, j]) == 6.0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["nvfp4", "nvfp4_2d"]))
def test_nvfp4_error_bound(seed, fmt):
    x = _mixed((32, 32), seed)
    q = quantize(jnp.asarray(x), fmt)
    d = np.asarray(expand_block_scale(q.scale.astype(jnp.float32), fmt, q.axis, q.shape))
    step = d * float(q.global_scale)
    xh = _np(q.dequantize())
    err = np.abs(x - xh)
    normal = d >= 2.0**-6  # E4M3-subnormal block scales round too coarsely for the bound (docs/formats.md 4)
    assert np.all((err <= step * (1 + 1e-6))[normal])
    assert np.all(xh[d == 0] == 0)  # flushed blocks dequantize to zero
    # with a normal-range scale the step is at most (17/16) a_b / 6, so |x - x_hat| <= 0.1771 a_b
    if fmt == "nvfp4":
        a_b = np.repeat(np.max(np.abs(x.reshape(32, 2, 16)), -1), 16, -1)
        assert np.all((err <= 0.1771 * a_b)[normal])


def test_nvfp4_gaussian_rmse_golden():
    x = np.random.default_rng(123).standard_normal((256, 256)).astype(np.float32)
    rmse = float(np.sqrt(np.mean((x - _np(quantize(jnp.asarray(x), "nvfp4").dequantize())) ** 2)))
    assert 0.08 < rmse < 0.11, rmse  # golden ~0.095 (TE order, 1x16 blocks, N(0,1))


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_2d", "mxfp4", "mxfp8", "fp8_e4m3"])
def test_idempotence(fmt):
    x = jnp.asarray(_mixed((32, 64), 3))
    a = None if fmt.startswith("mx") else jnp.max(jnp.abs(x))
    q = quantize(x, fmt, amax=a)
    xh = q.dequantize()
    q2 = quantize(xh, fmt, amax=a)
    np.testing.assert_array_equal(_np(q2.dequantize()), _np(xh))  # QDQ(QDQ(x)) == QDQ(x) bit-exactly
    if fmt.startswith("mx"):
        return  # MX: a rounded-down block max can lower the E8M0 exponent; values are equal, codes x2 apart
    # codes are equal too, except in flushed NVFP4 blocks (d_b = 0), whose codes are don't-cares: TE's order
    # gives them +-6 (x * FLT_MAX clipped) on the first pass and 0 on the second
    live = _np(expand_block_scale(q.scale, fmt, q.axis, q.shape)) > 0 if fmt.startswith("nvfp4") else True
    np.testing.assert_array_equal(np.where(live, _np(q2.data), 0), np.where(live, _np(q.data), 0))
    # recomputed amax: the codes are still equal in blocks with a normal-range scale (at the E4M3-subnormal end a
    # block whose max rounded down can cross the flush threshold)
    if fmt.startswith("nvfp4"):
        live = _np(expand_block_scale(q.scale, fmt, q.axis, q.shape)) >= 2.0**-6
    np.testing.assert_array_equal(np.where(live, _np(quantize(xh, fmt).data), 0), np.where(live, _np(q.data), 0))


def test_exact_grid_times_scale_times_pow2():
    rng = np.random.default_rng(4)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    codes = rng.choice(grid, (8, 64)) * rng.choice([-1, 1], (8, 64))
    codes[:, ::16] = 6.0  # every block reaches 6 so its scale is determined
    e4m3_vals = np.arange(8, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)  # normal scales
    d = rng.choice(e4m3_vals, (8, 4))
    d[0, 0] = 448.0
    for s_dec in [2.0**-3, 2.0**5, 0.37]:
        x = (codes * np.repeat(d, 16, -1) * np.float32(s_dec)).astype(np.float32)
        q = quantize(jnp.asarray(x), "nvfp4", amax=np.float32(2688 * s_dec))
        np.testing.assert_array_equal(_np(q.data), codes)
        np.testing.assert_array_equal(_np(q.scale), d)
        xh = _np(q.dequantize())
        if s_dec != 0.37:
            np.testing.assert_array_equal(xh, x)
        else:  # S_dec = 1/S_enc is not exact: within 1 fp32 ulp
            assert np.all(np.abs(xh - x) <= np.spacing(np.abs(x)))


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_2d", "mxfp4", "mxfp8"])
def test_sign_scale_permutation_equivariance(fmt):
    x = np.random.default_rng(5).standard_normal((32, 64)).astype(np.float32)
    q = _np(quantize(jnp.asarray(x), fmt).dequantize())
    np.testing.assert_array_equal(_np(quantize(jnp.asarray(-x), fmt).dequantize()), -q)
    for k in (-3, 4):
        np.testing.assert_array_equal(_np(quantize(jnp.asarray(x * 2.0**k), fmt).dequantize()), q * 2.0**k)
    B = 32 if fmt.startswith("mx") else 16
    perm = np.concatenate([np.random.default_rng(6).permutation(B) + i for i in range(0, 64, B)])
    if fmt == "nvfp4_2d":
        np.testing.assert_array_equal(_np(quantize(jnp.asarray(x[:, perm]), fmt).dequantize()), q[:, perm])
    else:
        np.testing.assert_array_equal(_np(quantize(jnp.asarray(x[:, perm]), fmt).dequantize()), q[:, perm])


def test_2d_transpose_equality_and_1d_differs():
    w = np.random.default_rng(7).standard_normal((48, 80)).astype(np.float32)
    a = quantize(jnp.asarray(w), "nvfp4_2d")
    b = quantize(jnp.asarray(w.T), "nvfp4_2d")
    np.testing.assert_array_equal(_np(b.data), _np(a.data).T)
    np.testing.assert_array_equal(_np(b.scale), _np(a.scale).T)
    np.testing.assert_array_equal(_np(b.dequantize()), _np(a.dequantize()).T)
    # documented: 1D blocks along different axes give different quantizations, Q(W^T) != Q(W)^T
    c = _np(quantize(jnp.asarray(w.T), "nvfp4").dequantize())
    assert not np.array_equal(c, _np(quantize(jnp.asarray(w), "nvfp4").dequantize()).T)
    # the 1D quantizer along axis 0 of W is the transpose of the one along axis 1 of W^T
    np.testing.assert_array_equal(_np(quantize(jnp.asarray(w), "nvfp4", axis=0).dequantize()), c.T)


# ----------------------------------------------------------------------------------------------- FP4 packing


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=40).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_roundtrip(nibbles):
    n = np.asarray(nibbles, np.uint8)
    codes = jax.lax.bitcast_convert_type(jnp.asarray(n).astype(jnp.uint4), jnp.float4_e2m1fn)
    p = np.asarray(pack_fp4(codes))
    np.testing.assert_array_equal(p, n[0::2] | (n[1::2] << 4))  # even index in the low nibble
    np.testing.assert_array_equal(p, np.asarray(jax.lax.bitcast_convert_type(codes.reshape(-1, 2), jnp.uint8)))
    back = jax.lax.bitcast_convert_type(unpack_fp4(jnp.asarray(p)), jnp.uint4).astype(jnp.uint8)
    np.testing.assert_array_equal(np.asarray(back), n)


def test_packed_storage():
    q = quantize(_x((4, 33)), "nvfp4")
    st_ = q.packed()
    assert st_["data"].dtype == jnp.uint8 and st_["data"].shape == (4, 17)
    np.testing.assert_array_equal(np.asarray(unpack_fp4(st_["data"])[:, :33].astype(jnp.float32)), _np(q.data))
    q0 = quantize(_x((32, 4)), "mxfp4", axis=0)
    assert q0.packed()["data"].shape == (16, 4)
    f = quantize(_x((4, 8)), "fp8_e4m3").packed()
    assert f["data"].dtype == jnp.float8_e4m3fn and f["global_scale"] is None


# ----------------------------------------------------------------------------------------- MX vs numpy oracle


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_matches_numpy_reference(fmt):
    x = _mixed((16, 96), 8)
    x[3, :32] = 0.0
    ref = R.mx_reference(x, 448.0 if fmt == "mxfp8" else 6.0, ml_dtypes.float8_e4m3fn if fmt == "mxfp8" else "e2m1")
    q = quantize(jnp.asarray(x), fmt)
    np.testing.assert_array_equal(np.asarray(e8m0_to_code(q.scale)), ref["code"])
    np.testing.assert_array_equal(_np(q.dequantize()), ref["xhat"])


# ------------------------------------------------------------------------------------------- NaN / inf policy


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_inf_policy(fmt):
    x = np.random.default_rng(9).standard_normal((32, 64)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 40] = np.inf
    x[2, 41] = -np.inf
    clean = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    xh = _np(quantize(jnp.asarray(x), fmt).dequantize())
    # NaN: exactly the NaN's own block (the element itself for per-tensor FP8) is NaN
    rows, cols = {"nvfp4": (slice(1, 2), slice(0, 16)), "nvfp4_2d": (slice(0, 16), slice(0, 16)),
                  "mxfp8": (slice(1, 2), slice(0, 32)), "mxfp4": (slice(1, 2), slice(0, 32))}.get(
        fmt, (slice(1, 2), slice(5, 6)))
    expect = np.zeros(x.shape, bool)
    expect[rows, cols] = True
    np.testing.assert_array_equal(np.isnan(xh), expect)
    # +-inf: finite, saturated to the largest magnitude the block can represent (+-elem_max * block scale)
    assert np.isfinite(xh[2, 40]) and xh[2, 40] > 0 and xh[2, 41] == -xh[2, 40]
    q = quantize(jnp.asarray(x), fmt)
    assert abs(_np(q.data)[2, 40]) == q.spec.elem_max
    # everything outside the NaN block equals the quantization of the tensor with NaN/inf replaced by 0
    # (amaxes are over finite values only), except the two saturated elements
    ref = _np(quantize(jnp.asarray(clean), fmt).dequantize())
    other = ~expect
    other[2, 40:42] = False
    np.testing.assert_array_equal(xh[other], ref[other])


# ---------------------------------------------------------------------------------------------- static amax etc.


def test_padding_never_changes_amax_and_batched_amax():
    x = np.random.default_rng(10).standard_normal((3, 20, 40)).astype(np.float32)
    for fmt in ("nvfp4", "nvfp4_2d", "mxfp4"):
        q = quantize(jnp.asarray(x), fmt, axis=1)
        assert q.data.shape == x.shape
        xp = np.pad(x, [(0, 0), (0, 12), (0, 8)])
        qp = quantize(jnp.asarray(xp), fmt, axis=1)
        np.testing.assert_array_equal(_np(qp.dequantize())[:, :20, :40], _np(q.dequantize()))
    amax = np.array([1.0, 2.0, 4.0], np.float32)
    qb = quantize(jnp.asarray(x), "nvfp4_2d", axis=1, amax=amax)
    assert qb.global_scale.shape == (3, 1, 1) and qb.scale.shape == (3, 2, 3)
    for e in range(3):
        qe = quantize(jnp.asarray(x[e]), "nvfp4_2d", axis=0, amax=amax[e])
        np.testing.assert_array_equal(_np(qb.dequantize())[e], _np(qe.dequantize()))
    qf = quantize(jnp.asarray(x), "fp8_e4m3", amax=amax)
    np.testing.assert_array_equal(_np(qf.scale).ravel(), np.float32(1) / (np.float32(448) / amax))
    # vmap over experts with a per-expert amax is the same thing
    qv = jax.vmap(lambda w, a: quantize(w, "nvfp4_2d", axis=0, amax=a).dequantize())(jnp.asarray(x), amax)
    np.testing.assert_array_equal(np.asarray(qv), _np(qb.dequantize()))


def test_validation_errors():
    x = _x((4, 32))
    with pytest.raises(ValueError, match="fmt='int4'"):
        quantize(x, "int4")
    with pytest.raises(ValueError, match="rounding"):
        quantize(x, "nvfp4", rounding="floor")
    with pytest.raises(ValueError, match="key"):
        quantize(x, "nvfp4", rounding="stochastic")
    with pytest.raises(ValueError, match="stochastic"):
        quantize(x, "fp8_e4m3", rounding="stochastic", key=jax.random.key(0))
    with pytest.raises(ValueError, match="block_scale"):
        quantize(x, "mxfp8", block_scale=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match="block_scale has shape"):
        quantize(x, "nvfp4", block_scale=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="axis"):
        quantize(_x((2, 32, 32)), "nvfp4_2d", axis=0)
    with pytest.raises(ValueError, match="axis"):
        quantize(x, "nvfp4", axis=2)
    with pytest.raises(ValueError, match="amax"):
        quantize(x, "nvfp4", amax=jnp.ones((5,)))


# -------------------------------------------------------------------------------------------- GEMM emulation


@pytest.mark.parametrize("fa,fb", [("nvfp4", "nvfp4_2d"), ("mxfp8", "mxfp8"), ("fp8_e4m3", "fp8_e4m3")])
def test_gemm_emulation_vs_f64_oracle(fa, fb):
    rng = np.random.default_rng(11)
    A = rng.standard_normal((32, 64)).astype(np.float32)
    B = rng.standard_normal((48, 64)).astype(np.float32)  # [N, K], contraction over the last axis of both
    qa, qb = quantize(jnp.asarray(A), fa), quantize(jnp.asarray(B), fb)
    y = np.asarray(jnp.dot(qa.dequantize(), qb.dequantize().T, precision=jax.lax.Precision.HIGHEST))
    # oracle: decode codes and scales in numpy float64 and multiply
    def deq(q):
        c = _np(q.data).astype(np.float64)
        if q.fmt.startswith("fp8"):
            return c * float(q.scale)
        if q.fmt.startswith("mx"):
            s = np.ldexp(1.0, np.asarray(e8m0_to_code(q.scale)) - 127)
            return c * np.repeat(s, 32, -1)
        s = _np(q.scale).astype(np.float64)
        s = np.repeat(np.repeat(s, 16, 0), 16, 1) if q.fmt == "nvfp4_2d" else np.repeat(s, 16, -1)
        return c * s * float(q.global_scale)
    ref = deq(qa) @ deq(qb).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))
    # and the quantized GEMM is close to the exact one
    rel = np.linalg.norm(y - A.astype(np.float64) @ B.T.astype(np.float64)) / np.linalg.norm(A @ B.T)
    assert rel < (0.15 if "nvfp4" in fa else 0.05)
