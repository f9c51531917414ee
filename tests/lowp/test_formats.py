"""Element casts, E8M0 scales and stochastic rounding (docs/formats.md 1, 3, 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemojax.lowp import reference as R
from nemojax.lowp.formats import (
    E2M1_GRID,
    FORMATS,
    cast_e2m1,
    cast_e4m3,
    cast_e5m2,
    check_format,
    e2m1_neighbours,
    e8m0_code,
    e8m0_from_code,
    e8m0_mul,
    stochastic_round_e2m1,
)

E2M1_TABLE = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def _f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


# ------------------------------------------------------------------------ every code decodes and re-encodes


def test_e2m1_codes_enumerate_and_roundtrip():
    codes = jax.lax.bitcast_convert_type(jnp.arange(16, dtype=jnp.uint8).astype(jnp.uint4), jnp.float4_e2m1fn)
    vals = _f32(codes)
    np.testing.assert_array_equal(vals, E2M1_TABLE)
    np.testing.assert_array_equal(np.signbit(vals), [False] * 8 + [True] * 8)
    back, nan = cast_e2m1(jnp.asarray(vals))
    bits = np.asarray(jax.lax.bitcast_convert_type(back, jnp.uint4).astype(jnp.uint8))
    np.testing.assert_array_equal(bits, np.arange(16))
    assert not bool(nan.any())
    assert len(set(E2M1_TABLE)) == 15  # +0 and -0 collapse


@pytest.mark.parametrize(
    "dtype,cast,fmax", [(jnp.float8_e4m3fn, cast_e4m3, 448.0), (jnp.float8_e5m2, cast_e5m2, 57344.0)]
)
def test_fp8_codes_enumerate_and_roundtrip(dtype, cast, fmax):
    codes = jnp.arange(256, dtype=jnp.uint8)
    vals = _f32(jax.lax.bitcast_convert_type(codes, dtype))
    ref = np.arange(256, dtype=np.uint8).view(getattr(ml_dtypes, jnp.dtype(dtype).name)).astype(np.float32)
    np.testing.assert_array_equal(vals, ref)
    finite = np.isfinite(vals)
    assert np.nanmax(np.abs(vals[finite])) == fmax
    assert finite.sum() == (254 if dtype == jnp.float8_e4m3fn else 256 - 8)
    back = np.asarray(jax.lax.bitcast_convert_type(cast(jnp.asarray(vals[finite])), jnp.uint8))
    np.testing.assert_array_equal(back, np.arange(256)[finite])
    # OCP E4M3: the smallest subnormal 2^-9, smallest normal 2^-6
    if dtype == jnp.float8_e4m3fn:
        assert vals[1] == 2.0**-9 and vals[8] == 2.0**-6


def test_e8m0_codes_enumerate():
    scales = e8m0_from_code(jnp.arange(256))
    vals = _f32(scales)
    np.testing.assert_array_equal(vals[1:255], np.ldexp(np.float32(1), np.arange(1, 255) - 127))
    assert np.isnan(vals[255])
    # e8m0_mul is exact over the whole code range, including 2^-127 (subnormal in f32) and 2^127
    x = jnp.full((256,), 1.5, jnp.float32)
    y = np.asarray(e8m0_mul(x, scales, inverse=True)[:254])  # 1.5 / 2^(c-127) is a normal f32 for c <= 253
    np.testing.assert_array_equal(y, np.ldexp(1.5, 127 - np.arange(0, 254)).astype(np.float32))
    assert float(e8m0_mul(jnp.float32(2.0**120), scales[0])) == 2.0**-7


# -------------------------------------------------------------------------- E2M1 round-to-nearest-even ties


def test_e2m1_rne_tie_table():
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0001, 7.0, np.inf, 0.2500001, 0.7499999, 2.5000002],
                 np.float32)
    want = np.array([0, 1, 1, 2, 2, 4, 4, 6, 6, 6, 0.5, 0.5, 3], np.float32)
    got = _f32(cast_e2m1(jnp.asarray(x))[0])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_f32(cast_e2m1(jnp.asarray(-x))[0]), -want)
    np.testing.assert_array_equal(R.e2m1_values(R.e2m1_codes(x)), want)  # the numpy oracle agrees


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-8, 8, width=32), min_size=1, max_size=64))
def test_e2m1_cast_matches_threshold_table(xs):
    x = np.asarray(xs, np.float32)
    np.testing.assert_array_equal(_f32(cast_e2m1(jnp.asarray(x))[0]), R.e2m1_values(R.e2m1_codes(x)))


# ---------------------------------------------------------------------------------------------- cast guards


def test_cast_guards():
    big = jnp.asarray([449.0, 464.0, 465.0, 1e6, np.inf, -np.inf, -1e30], jnp.float32)
    assert np.all(np.isfinite(_f32(big.astype(jnp.float8_e4m3fn))[[0, 1]]))  # the raw cast: 464 -> 448 ...
    assert np.isnan(_f32(big.astype(jnp.float8_e4m3fn))[2])  # ... but 465 -> NaN
    np.testing.assert_array_equal(_f32(cast_e4m3(big)), [448, 448, 448, 448, 448, -448, -448])
    np.testing.assert_array_equal(_f32(cast_e5m2(jnp.asarray([61440.0, -1e9, np.inf]))), [57344, -57344, 57344])
    assert np.isnan(_f32(cast_e4m3(jnp.asarray([np.nan])))).all()
    codes, nan = cast_e2m1(jnp.asarray([np.nan, 1.0], jnp.float32))
    np.testing.assert_array_equal(np.asarray(nan), [True, False])
    assert not np.signbit(_f32(codes)[0])  # NaN is reported in the mask and becomes +0, not a silent -0
    assert np.signbit(_f32(jnp.asarray([np.nan], jnp.float32).astype(jnp.float4_e2m1fn))[0])  # the raw cast does -0


# ------------------------------------------------------------------------------------- E8M0 round-up scales


def test_e8m0_spec_points():
    got = np.asarray(e8m0_code(jnp.asarray([448.0, 449.0, 896.0, 1.0, 0.0]), 448.0))
    np.testing.assert_array_equal(got, [127, 128, 128, 119, 0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-126, 126), st.floats(1.0, 2.0, exclude_max=True)), min_size=1, max_size=32),
       st.sampled_from([448.0, 6.0]))
def test_e8m0_round_up_is_tight(parts, emax):
    amax = np.array([np.ldexp(np.float32(m), e) for e, m in parts], np.float32)
    code = np.asarray(e8m0_code(jnp.asarray(amax), emax))
    np.testing.assert_array_equal(code, R.e8m0_code(amax, emax))  # bit rule, numpy oracle without FTZ
    scale = np.ldexp(1.0, code.astype(np.int64) - 127)
    r = amax.astype(np.float64) / emax
    assert np.all(amax / scale <= emax)
    # tight: half the scale would overflow the element range, unless the scale is already the smallest (2^-127)
    assert np.all((scale / 2 < r) | (code == 0))


# -------------------------------------------------------------------------------------- stochastic rounding


def test_sr_neighbours_grid_values_and_no_nan():
    grid = np.array(E2M1_GRID + tuple(-g for g in E2M1_GRID[1:]), np.float32)
    v = jnp.asarray(np.repeat(grid, 50))
    with jax.debug_nans(True):
        out = stochastic_round_e2m1(v, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(v))  # grid values never move
    x = jnp.asarray(np.random.default_rng(0).uniform(-6, 6, 4000).astype(np.float32))
    lo, hi = e2m1_neighbours(x)
    out = np.asarray(stochastic_round_e2m1(x, jax.random.key(1)))
    sgn = np.sign(np.asarray(x))
    assert np.all((out == sgn * np.asarray(lo)) | (out == sgn * np.asarray(hi)))


def test_sr_unbiased_and_key_deterministic():
    x = jnp.asarray([0.1, 0.3, 0.7, 1.2, 1.6, 2.2, 2.9, 3.7, 5.5, -0.4, -4.5, 5.99], jnp.float32)
    N = 4000
    draws = jax.vmap(lambda k: stochastic_round_e2m1(x, k))(jax.random.split(jax.random.key(2), N))
    lo, hi = (np.asarray(a) for a in e2m1_neighbours(x))
    p = (np.abs(np.asarray(x)) - lo) / (hi - lo)
    sigma = (hi - lo) * np.sqrt(p * (1 - p))
    err = np.abs(np.asarray(draws).mean(0) - np.asarray(x))
    assert np.all(err <= 4 * sigma / np.sqrt(N) + 1e-7)
    a = stochastic_round_e2m1(x, jax.random.key(5))
    b = stochastic_round_e2m1(x, jax.random.key(5))
    c = stochastic_round_e2m1(jnp.tile(x, 20), jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(jnp.tile(a, 20)), np.asarray(c))
    # the mean of many SR draws is a much better estimate than one RNE rounding (docs/formats.md 5)
    rne = _f32(cast_e2m1(x)[0])
    assert np.sqrt(np.mean(err**2)) < 0.3 * np.sqrt(np.mean((rne - np.asarray(x)) ** 2))


def test_check_format():
    for f in FORMATS:
        assert check_format(f).name == f
    with pytest.raises(ValueError, match=r"weight_fmt='fp16'.*allowed.*nvfp4"):
        check_format("fp16", field="weight_fmt")
