"""fp8_matmul / nvfp4_matmul (pallas_kernels/quant_matmul.py) in interpret mode against f32 oracles.

Oracles: fp8 -> f32 dot of the decoded operands times the two scales; nvfp4 -> x @ nemojax.quant's dequantized W.T.
Tolerances are relative to |x| @ |W|.T (the scale of the summands), so they measure rounding, not cancellation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp.qarray import pack_fp4, quantize
from pallas_kernels.quant_matmul import (
    DECODE_M,
    FP8_IMPLS,
    SMEM_BUDGET,
    _e2m1_decode,
    _e2m1_pair_as_e4m3,
    fp8_matmul,
    nvfp4_default_config,
    nvfp4_matmul,
    nvfp4_smem_bytes,
)

HI = jax.lax.Precision.HIGHEST


def _rng(seed):
    return np.random.default_rng(seed)


def _fp8(shape, seed):
    return jnp.asarray(_rng(seed).standard_normal(shape).astype(np.float32) * 3).astype(jnp.float8_e4m3fn)


def _rel_err(y, ref, mag):
    """max |y - ref| / max(|a| @ |b|): the error in units of the summands' scale."""
    return float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(mag))


# ------------------------------------------------------------------------------------------------------- fp8


@pytest.mark.parametrize(("M", "K", "N"), [(1, 64, 48), (37, 96, 48), (20, 200, 33)])
def test_fp8_matmul_matches_f32_oracle(M, K, N):
    a, b = _fp8((M, K), 0), _fp8((K, N), 1)
    sa, sb = jnp.float32(0.37), jnp.float32(2.5)
    af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
    ref = jnp.dot(af, bf, precision=HI) * (sa * sb)
    mag = jnp.dot(jnp.abs(af), jnp.abs(bf), precision=HI) * (sa * sb)
    kw = dict(block_m=16, block_n=16, block_k=32, interpret=True)  # several blocks along every axis
    y32 = fp8_matmul(a, b, sa, sb, out_dtype=jnp.float32, **kw)
    assert y32.shape == (M, N) and y32.dtype == jnp.float32
    assert _rel_err(y32, ref, mag) < 1e-6  # only the f32 summation order differs
    y = fp8_matmul(a, b, sa, sb, **kw)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32),
        np.asarray(ref.astype(jnp.bfloat16), np.float32),
        rtol=2**-7,
        atol=1e-6 * float(jnp.max(mag)),
    )


def test_fp8_matmul_default_blocks_and_scale_matter():
    a, b = _fp8((5, 64), 2), _fp8((64, 48), 3)
    y1 = fp8_matmul(a, b, 1.0, 1.0, out_dtype=jnp.float32, interpret=True)
    y3 = fp8_matmul(a, b, 0.5, 6.0, out_dtype=jnp.float32, interpret=True)
    ref = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=HI)
    np.testing.assert_allclose(y1, ref, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(y3, 3.0 * ref, rtol=1e-6, atol=1e-4)


def test_fp8_matmul_rejects_bad_inputs():
    a = _fp8((4, 32), 0)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_matmul(a.astype(jnp.bfloat16), a.T, 1.0, 1.0, interpret=True)
    with pytest.raises(ValueError, match="contraction"):
        fp8_matmul(a, a, 1.0, 1.0, interpret=True)
    with pytest.raises(ValueError, match="scalar"):
        fp8_matmul(a, a.T, jnp.ones(2), 1.0, interpret=True)


# ----------------------------------------------------------------------------------------------------- nvfp4


def test_e2m1_decode_all_codes():
    codes = jnp.arange(16, dtype=jnp.uint8)
    table = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    ml = jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(ml), table)  # the documented table (docs/formats.md 1) is ml_dtypes'
    got = _e2m1_decode(codes)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), table)


def _nvfp4_weight(N, K, seed):
    w = jnp.asarray(_rng(seed).standard_normal((N, K)).astype(np.float32))
    w = w * jnp.asarray(_rng(seed + 1).uniform(0.1, 4.0, (N, 1)).astype(np.float32))  # row-varying block scales
    q = quantize(w, "nvfp4", axis=-1)
    return q, pack_fp4(q.data), q.scale, q.global_scale


@pytest.mark.parametrize(("M", "K", "N"), [(1, 64, 48), (37, 96, 48), (20, 64, 33)])
def test_nvfp4_matmul_matches_dequant_oracle(M, K, N):
    q, wp, ws, wg = _nvfp4_weight(N, K, 10)
    assert wp.shape == (N, K // 2) and ws.shape == (N, K // 16) and ws.dtype == jnp.float8_e4m3fn
    w_hat = q.dequantize(jnp.float32)
    x = jnp.asarray(_rng(11).standard_normal((M, K)).astype(np.float32)).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)
    ref = jnp.dot(xf, w_hat.T, precision=HI)
    mag = jnp.dot(jnp.abs(xf), jnp.abs(w_hat).T, precision=HI)
    kw = dict(block_m=16, block_n=16, block_k=32, interpret=True)
    y32 = nvfp4_matmul(x, wp, ws, wg, out_dtype=jnp.float32, **kw)
    assert y32.shape == (M, N) and y32.dtype == jnp.float32
    # x is exact in bf16 and q*d_b is exact in bf16: only f32 summation order and the S_dec placement differ
    assert _rel_err(y32, ref, mag) < 1e-6  # measured ~1e-7
    y = nvfp4_matmul(x, wp, ws, wg, **kw)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2 * float(jnp.max(mag)))
    # default (large) blocks: a single block per axis
    y_def = nvfp4_matmul(x, wp, ws, wg, out_dtype=jnp.float32, interpret=True)
    assert _rel_err(y_def, ref, mag) < 1e-6


def test_nvfp4_matmul_hand_built_byte():
    # one row of W: byte 0x21 -> [0.5, 1.0] (low nibble first), the rest zero; block scale 2, global 0.25
    K, N = 32, 1
    wp = jnp.zeros((N, K // 2), jnp.uint8).at[0, 0].set(0x21)
    ws = jnp.full((N, K // 16), 2.0, jnp.float8_e4m3fn)
    x = jnp.zeros((1, K), jnp.bfloat16).at[0, 0].set(3.0).at[0, 1].set(5.0).at[0, 2].set(7.0)
    y = nvfp4_matmul(x, wp, ws, 0.25, out_dtype=jnp.float32, interpret=True)
    assert float(y[0, 0]) == (3.0 * 0.5 + 5.0 * 1.0) * 2.0 * 0.25  # 3.25; swapping the nibbles would give 2.0
    # a negative code in the high nibble of the second-block byte: 0xF0 -> [0, -6] at columns 16, 17
    wp2 = wp.at[0, 8].set(0xF0)
    x2 = x.at[0, 17].set(1.0)
    y2 = nvfp4_matmul(x2, wp2, ws.at[0, 1].set(0.5), 1.0, out_dtype=jnp.float32, interpret=True)
    assert float(y2[0, 0]) == (1.5 + 5.0) * 2.0 + (-6.0) * 0.5


def test_nvfp4_matmul_rejects_bad_k():
    x = jnp.zeros((2, 48), jnp.bfloat16)
    with pytest.raises(ValueError, match="K=48"):
        nvfp4_matmul(x, jnp.zeros((4, 24), jnp.uint8), jnp.zeros((4, 3), jnp.float8_e4m3fn), 1.0, interpret=True)
    x = jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="w_scale"):
        nvfp4_matmul(x, jnp.zeros((4, 32), jnp.uint8), jnp.zeros((4, 2), jnp.float8_e4m3fn), 1.0, interpret=True)
    with pytest.raises(ValueError, match="w_packed"):
        nvfp4_matmul(x, jnp.zeros((4, 64), jnp.uint8), jnp.zeros((4, 4), jnp.float8_e4m3fn), 1.0, interpret=True)


# ------------------------------------------------------------------------------------------ the in-kernel K loop


def _grids(fn, *args) -> list[tuple[int, ...]]:
    """The grid of every pallas_call in fn's jaxpr."""
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.params["grid_mapping"].grid for e in eqns if e.primitive.name == "pallas_call"]


# (M, K, N, block_k): M=1, odd N, several K blocks, K not a multiple of block_k (zero-padded tail block)
LOOP_SHAPES = [(1, 160, 17, 32), (3, 100, 33, 64), (18, 224, 5, 32)]


@pytest.mark.parametrize(("M", "K", "N", "bk"), LOOP_SHAPES)
def test_fp8_matmul_k_loop(M, K, N, bk):
    a, b = _fp8((M, K), 20), _fp8((K, N), 21)
    af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
    ref = jnp.dot(af, bf, precision=HI) * 0.75
    mag = jnp.dot(jnp.abs(af), jnp.abs(bf), precision=HI) * 0.75
    fn = lambda a, b: fp8_matmul(a, b, 0.5, 1.5, out_dtype=jnp.float32, block_m=16, block_n=16, block_k=bk,
                                 interpret=True)
    y = fn(a, b)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    assert _rel_err(y, ref, mag) < 1e-6
    # grid over output blocks only: K is a loop inside each program (a K grid axis races on GPU)
    assert _grids(fn, a, b) == [(-(-M // 16), -(-N // 16))]


@pytest.mark.parametrize(("M", "K", "N", "bk"), [(1, 96, 17, 64), (3, 160, 7, 32), (18, 224, 5, 64)])
def test_nvfp4_matmul_k_loop(M, K, N, bk):
    q, wp, ws, wg = _nvfp4_weight(N, K, 30)
    w_hat = q.dequantize(jnp.float32)
    x32 = jnp.asarray(_rng(31).standard_normal((M, K)).astype(np.float32))
    kw = dict(block_m=16, block_n=16, block_k=bk, interpret=True)
    for x, tol in ((x32.astype(jnp.bfloat16), 1e-6), (x32, 1e-6)):  # bf16 dot, and the f32 dot for an f32 x
        xf = x.astype(jnp.float32)
        ref = jnp.dot(xf, w_hat.T, precision=HI)
        mag = jnp.dot(jnp.abs(xf), jnp.abs(w_hat).T, precision=HI)
        fn = lambda x: nvfp4_matmul(x, wp, ws, wg, out_dtype=jnp.float32, **kw)
        y = fn(x)
        assert y.shape == (M, N) and y.dtype == jnp.float32
        assert _rel_err(y, ref, mag) < tol
        assert _grids(fn, x) == [(-(-M // 16), -(-N // 16))]
    # an f32 x is not rounded to bf16: the bf16 run differs from the f32 oracle by far more than 1e-6
    ref32 = jnp.dot(x32, w_hat.T, precision=HI)
    y_bf = nvfp4_matmul(x32.astype(jnp.bfloat16), wp, ws, wg, out_dtype=jnp.float32, **kw)
    assert _rel_err(y_bf, ref32, jnp.dot(jnp.abs(x32), jnp.abs(w_hat).T, precision=HI)) > 1e-4


def test_nvfp4_block_scaled_matmul_equals_dequantized_product():
    """W4A4 (both operands NVFP4, [M, K] and [N, K]) = dequant(x) @ dequant(W).T in f32; bad operands are named."""
    from nemojax.lowp.qarray import dequantize
    from pallas_kernels.quant_matmul import nvfp4_block_scaled_matmul

    x = jnp.asarray(_rng(3).standard_normal((9, 96)), jnp.float32)
    w = jnp.asarray(_rng(4).standard_normal((40, 96)), jnp.float32)
    qx, qw = quantize(x, "nvfp4", axis=1), quantize(w, "nvfp4", axis=1)
    y = nvfp4_block_scaled_matmul(qx.data, qx.scale, qx.global_scale, qw.data, qw.scale, qw.global_scale,
                                  out_dtype=jnp.float32)
    dx, dw = dequantize(qx, jnp.float32), dequantize(qw, jnp.float32)
    ref = jnp.dot(dx, dw.T, precision=HI)
    assert _rel_err(y, ref, jnp.dot(jnp.abs(dx), jnp.abs(dw).T, precision=HI)) < 1e-6
    with pytest.raises(ValueError, match="x_scale has shape"):
        nvfp4_block_scaled_matmul(qx.data, qx.scale[:, :2], qx.global_scale, qw.data, qw.scale, qw.global_scale)
    with pytest.raises(ValueError, match="w_codes dtype"):
        nvfp4_block_scaled_matmul(qx.data, qx.scale, qx.global_scale, w, qw.scale, qw.global_scale)


# ------------------------------------------------------------------- fp8 implementations, layouts, launch options


@pytest.mark.parametrize("impl", FP8_IMPLS)
@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_fp8_matmul_every_impl_and_layout_matches_oracle(impl, b_layout):
    """Every implementation (the Pallas kernel and XLA's FP8 GEMM forms) on a [K, N] or [N, K] b equals the f32
    oracle: only the f32 summation order differs (f32 out), and bf16 out is that rounded once."""
    M, K, N = 19, 96, 40
    a, b = _fp8((M, K), 40), _fp8((K, N), 41)
    sa, sb = jnp.float32(0.37), jnp.float32(2.5)
    af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
    ref = jnp.dot(af, bf, precision=HI) * (sa * sb)
    mag = jnp.dot(jnp.abs(af), jnp.abs(bf), precision=HI) * (sa * sb)
    b_in = b if b_layout == "kn" else b.T
    kw = dict(impl=impl, b_layout=b_layout, block_m=16, block_n=16, block_k=32, num_warps=8, num_stages=2,
              interpret=True)
    y32 = jax.jit(lambda a, b: fp8_matmul(a, b, sa, sb, out_dtype=jnp.float32, **kw))(a, b_in)
    assert y32.shape == (M, N) and y32.dtype == jnp.float32
    assert _rel_err(y32, ref, mag) < 1e-6
    y = jax.jit(lambda a, b: fp8_matmul(a, b, sa, sb, **kw))(a, b_in)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32),
                               rtol=2**-7, atol=1e-6 * float(jnp.max(mag)))


def test_fp8_matmul_rejects_bad_impl_layout_and_launch_options():
    a, b = _fp8((4, 64), 42), _fp8((64, 16), 43)
    with pytest.raises(ValueError, match="impl='cublas'"):
        fp8_matmul(a, b, 1.0, 1.0, impl="cublas")
    with pytest.raises(ValueError, match="b_layout='tn'"):
        fp8_matmul(a, b, 1.0, 1.0, b_layout="tn")
    with pytest.raises(ValueError, match="contraction"):
        fp8_matmul(a, b, 1.0, 1.0, b_layout="nk")  # a [4, 64] against b [16, 64] read as [N, K] = K 16
    with pytest.raises(ValueError, match="num_stages=0"):
        fp8_matmul(a, b, 1.0, 1.0, num_stages=0, backend="gpu")


# ---------------------------------------------------------------------- nvfp4 configurations (decode / prefill)


def test_nvfp4_default_configs_by_m_fit_shared_memory():
    """Decode-sized M gets a 16-row block and narrow N blocks; prefill M a GEMM tiling; every default is under the
    budget by the estimate, which puts the config that failed on the H200 (requested 266240 > 232448 available)
    over the device's limit."""
    for x_dtype in (jnp.bfloat16, jnp.float32):
        dec, pre = nvfp4_default_config(16, x_dtype), nvfp4_default_config(8192, x_dtype)
        assert dec["block_m"] == 16 and dec["block_n"] <= 64 and pre["block_m"] >= 64
        assert nvfp4_default_config(DECODE_M + 1, x_dtype) == pre
        for cfg in (dec, pre):
            est = nvfp4_smem_bytes(cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["num_stages"],
                                   jnp.dtype(x_dtype).itemsize)
            assert est <= SMEM_BUDGET
    assert nvfp4_smem_bytes(128, 128, 256, 3) > 232448
    # the estimate by hand: 3 stages x (x 16*512*2 + w 32*256 + scales 32*32) + decoded w 32*512*2
    assert nvfp4_smem_bytes(16, 32, 512, 3) == 3 * (16384 + 8192 + 1024) + 32768


@pytest.mark.parametrize("M", [16, 80])
def test_nvfp4_matmul_default_configs_match_oracle(M):
    """The decode (M 16: bm 16, bn 32, bk 512 on K 1024 -> two K steps) and prefill (M 80) defaults, and explicit
    launch options, compute x @ dequant(W).T."""
    K, N = 1024, 48
    q, wp, ws, wg = _nvfp4_weight(N, K, 44)
    w_hat = q.dequantize(jnp.float32)
    x = jnp.asarray(_rng(45).standard_normal((M, K)).astype(np.float32)).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)
    ref = jnp.dot(xf, w_hat.T, precision=HI)
    mag = jnp.dot(jnp.abs(xf), jnp.abs(w_hat).T, precision=HI)
    for kw in ({}, dict(num_warps=8, num_stages=2, block_n=16)):
        y = jax.jit(functools.partial(nvfp4_matmul, out_dtype=jnp.float32, interpret=True, **kw))(x, wp, ws, wg)
        assert y.shape == (M, N)
        assert _rel_err(y, ref, mag) < 1e-6


def test_e2m1_pair_as_e4m3_every_byte():
    """All 256 bytes: the E4M3 view of each nibble is exactly e2m1(code) * 2**-6 (subnormal codes and -0 included),
    low nibble = element 2i, high nibble = element 2i + 1."""
    table = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    b = np.arange(256, dtype=np.uint8)
    lo, hi = _e2m1_pair_as_e4m3(jnp.asarray(b))
    assert lo.dtype == hi.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(lo, np.float32) * 64, table[b & 0xF])
    np.testing.assert_array_equal(np.asarray(hi, np.float32) * 64, table[b >> 4])
    assert np.array_equal(np.signbit(np.asarray(lo, np.float32)), np.signbit(table[b & 0xF]))


def test_nvfp4_matmul_decodes_agree():
    """decode="e4m3" (the default) and "arith" give the same product bit for bit; a bad name is rejected."""
    q, wp, ws, wg = _nvfp4_weight(24, 64, 46)
    x = jnp.asarray(_rng(47).standard_normal((5, 64)).astype(np.float32))
    for xd in (jnp.bfloat16, jnp.float32):
        ys = [nvfp4_matmul(x.astype(xd), wp, ws, wg, out_dtype=jnp.float32, decode=d, interpret=True)
              for d in ("e4m3", "arith")]
        np.testing.assert_array_equal(np.asarray(ys[0]), np.asarray(ys[1]))
    with pytest.raises(ValueError, match="decode='lut'"):
        nvfp4_matmul(x, wp, ws, wg, decode="lut", interpret=True)
