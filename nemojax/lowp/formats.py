"""Low-precision number formats: the format table and the element/scale casts (docs/formats.md 1-4).

Everything here is a pure function over arrays (float32 math unless stated). The casts exist because the plain
`astype` casts are unsafe for quantization (docs/formats.md 1, all checked on XLA:CPU):

- f32 -> float8_e4m3fn does not saturate: |x| > 464 and +-inf become NaN. `cast_e4m3` clips first.
- f32 -> float8_e5m2 overflows to +-inf. `cast_e5m2` clips to +-57344 first.
- f32 -> float4_e2m1fn saturates, but NaN becomes -0.0. `cast_e2m1` returns a NaN mask next to the codes so the
  caller can propagate it (the quantizers put NaN in the block scale).
- f32 -> float8_e8m0fnu rounds to nearest with ties up; MX scales need round-up, so `e8m0_code` builds the exponent
  from the fp32 bits (NVIDIA rule, docs/formats.md 3).
- XLA:CPU flushes fp32 subnormals (inputs and results), so no function here multiplies or divides by a subnormal
  power of two: `mul_pow2` splits 2^k into two normal factors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("fp8_e4m3", "fp8_e5m2", "nvfp4", "nvfp4_2d", "mxfp8", "mxfp4")
SCALE_KINDS = ("tensor", "e4m3_block", "e8m0_block")

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0
FLT_MAX = float(np.finfo(np.float32).max)
# Positive E2M1 grid, index = code & 7 (docs/formats.md 1).
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """One quantization format.

    name: key in FORMATS. elem_dtype: the JAX dtype of the element codes. elem_max: largest finite element magnitude.
    block: elements per scale block along the blocked axis (None = one per-tensor scale). two_d: blocks are
    block x block tiles over the last two dims. scale_kind: "tensor" (f32 decode scale), "e4m3_block" (NVFP4:
    E4M3 block decode scale + f32 global decode scale) or "e8m0_block" (MX: power-of-two E8M0 block scale).
    """

    name: str
    elem_dtype: jnp.dtype
    elem_max: float
    block: int | None
    scale_kind: str
    two_d: bool = False

    @property
    def is_fp4(self) -> bool:
        return self.elem_dtype == jnp.float4_e2m1fn


FORMAT_SPECS: dict[str, FormatSpec] = {
    "fp8_e4m3": FormatSpec("fp8_e4m3", jnp.dtype(jnp.float8_e4m3fn), E4M3_MAX, None, "tensor"),
    "fp8_e5m2": FormatSpec("fp8_e5m2", jnp.dtype(jnp.float8_e5m2), E5M2_MAX, None, "tensor"),
    "nvfp4": FormatSpec("nvfp4", jnp.dtype(jnp.float4_e2m1fn), E2M1_MAX, 16, "e4m3_block"),
    "nvfp4_2d": FormatSpec("nvfp4_2d", jnp.dtype(jnp.float4_e2m1fn), E2M1_MAX, 16, "e4m3_block", two_d=True),
    "mxfp8": FormatSpec("mxfp8", jnp.dtype(jnp.float8_e4m3fn), E4M3_MAX, 32, "e8m0_block"),
    "mxfp4": FormatSpec("mxfp4", jnp.dtype(jnp.float4_e2m1fn), E2M1_MAX, 32, "e8m0_block"),
}


def check_format(fmt: str, field: str = "fmt") -> FormatSpec:
    """Return the FormatSpec of `fmt`; ValueError naming `field`, the value and FORMATS if unknown."""
    if not isinstance(fmt, str) or fmt not in FORMAT_SPECS:
        raise ValueError(f"{field}={fmt!r} is not a known quantization format; allowed: {FORMATS}")
    return FORMAT_SPECS[fmt]


def get_format(fmt: str) -> FormatSpec:
    """Alias of check_format(fmt)."""
    return check_format(fmt)


# ----------------------------------------------------------------------------------------------- element casts


def cast_e4m3(x: jax.Array) -> jax.Array:
    """f32 [...] -> float8_e4m3fn [...], RNE, saturating at +-448 (inf -> +-448); NaN stays NaN."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def cast_e5m2(x: jax.Array) -> jax.Array:
    """f32 [...] -> float8_e5m2 [...], RNE, saturating at +-57344 instead of overflowing to inf; NaN stays NaN."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip(x, -E5M2_MAX, E5M2_MAX).astype(jnp.float8_e5m2)


def cast_e2m1(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 [...] -> (float4_e2m1fn codes [...], bool NaN mask [...]).

    RNE with the tie table of docs/formats.md 1, saturating at +-6. A NaN input gives code +0 and True in the mask;
    the cast alone would give -0 and lose the NaN, so the caller must route the mask into a NaN scale.
    """
    x = jnp.asarray(x, jnp.float32)
    nan = jnp.isnan(x)
    codes = jnp.where(nan, 0.0, jnp.clip(x, -E2M1_MAX, E2M1_MAX)).astype(jnp.float4_e2m1fn)
    return codes, nan


def cast_elements(x: jax.Array, fmt: str) -> jax.Array:
    """Scaled f32 values [...] -> element codes of `fmt` [...] (safe RNE cast; NaN -> +0 for fp4, see cast_e2m1)."""
    spec = check_format(fmt)
    if spec.elem_dtype == jnp.float8_e4m3fn:
        return cast_e4m3(x)
    if spec.elem_dtype == jnp.float8_e5m2:
        return cast_e5m2(x)
    return cast_e2m1(x)[0]


# ------------------------------------------------------------------------------------------------ powers of two


def pow2(k: jax.Array) -> jax.Array:
    """int [...] in [-126, 127] -> float32 2^k [...], built from the exponent bits (exact, no transcendental)."""
    k = jnp.asarray(k, jnp.int32)
    bits = ((k + 127) << 23).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def mul_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
    """x * 2^k for int k in [-254, 254], f32; 2^k is split into two normal factors so no subnormal constant appears.

    (Results that are themselves subnormal are still flushed by XLA:CPU.)
    """
    k = jnp.asarray(k, jnp.int32)
    k1 = k // 2
    return jnp.asarray(x, jnp.float32) * pow2(k1) * pow2(k - k1)


# ------------------------------------------------------------------------------------------------ E8M0 scales


def e8m0_code(amax: jax.Array, elem_max: float) -> jax.Array:
    """Round-up E8M0 code of the MX block scale 2^ceil(log2(amax/elem_max)) (NVIDIA rule, docs/formats.md 3).

    amax: finite f32 >= 0 [...]; returns int32 [...] in [0, 254] (scale = 2^(code-127)). Built from the fp32 bits of
    r = amax/elem_max: the biased exponent e, +1 if the mantissa is non-zero, except e = 254 (saturated); for a
    subnormal r (e = 0) only r > 2^-127 (mantissa > 0x400000) rounds up to code 1. XLA:CPU would flush a subnormal
    r to 0, so that case is decided on r * 2^64, which is normal. amax = 0 gives code 0 (2^-127).
    """
    amax = jnp.asarray(amax, jnp.float32)
    r = amax / jnp.float32(elem_max)
    bits = jax.lax.bitcast_convert_type(r, jnp.uint32)
    e = ((bits >> 23) & 0xFF).astype(jnp.int32)
    m = bits & 0x7FFFFF
    normal_code = jnp.where((m != 0) & (e < 254), e + 1, e)
    # Subnormal r: r < 2^-126 <=> amax < elem_max * 2^-126; decide "r > 2^-127" on the rescaled, normal value.
    r_big = (amax * jnp.float32(2.0**64)) / jnp.float32(elem_max)
    sub_code = jnp.where(r_big > jnp.float32(2.0**-63), 1, 0)
    is_sub = r_big < jnp.float32(2.0**-62)
    return jnp.where(is_sub, sub_code, normal_code).astype(jnp.int32)


def e8m0_from_code(code: jax.Array) -> jax.Array:
    """int [...] in [0, 255] -> float8_e8m0fnu [...] with that bit pattern (255 = NaN)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(code).astype(jnp.uint8), jnp.float8_e8m0fnu)


def e8m0_to_code(scale: jax.Array) -> jax.Array:
    """float8_e8m0fnu [...] -> int32 code [...] (bit pattern; 255 = NaN)."""
    return jax.lax.bitcast_convert_type(scale, jnp.uint8).astype(jnp.int32)


def e8m0_mul(x: jax.Array, scale: jax.Array, inverse: bool = False) -> jax.Array:
    """x * scale (or x / scale if `inverse`) for E8M0 `scale`, exact and without subnormal constants.

    x: f32 [...]; scale: float8_e8m0fnu broadcastable to x. A NaN scale (code 255) gives NaN.
    """
    code = e8m0_to_code(scale)
    k = code - 127
    out = mul_pow2(x, -k if inverse else k)
    return jnp.where(code == 255, jnp.nan, out)


# ------------------------------------------------------------------------------------------- stochastic rounding


def e2m1_neighbours(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|v| f32 [...] (<= 6) -> (lo, hi) [...]: largest grid value <= |v| and smallest grid value >= |v|."""
    a = jnp.abs(jnp.asarray(v, jnp.float32))
    grid = jnp.asarray(E2M1_GRID, jnp.float32)
    idx = jnp.clip(jnp.searchsorted(grid, a, side="right") - 1, 0, len(E2M1_GRID) - 1)
    lo = grid[idx]
    hi = jnp.where(lo == a, lo, grid[jnp.minimum(idx + 1, len(E2M1_GRID) - 1)])
    return lo, hi


def stochastic_round_e2m1(v: jax.Array, key: jax.Array) -> jax.Array:
    """Stochastically round scaled values v (f32 [...], |v| <= 6) onto the E2M1 grid; returns f32 grid values [...].

    Rounds |v| up to its upper neighbour hi with probability (|v| - lo) / (hi - lo), else down to lo, so E[q] = v
    (docs/formats.md 5). Grid values are returned unchanged (probability 0 of moving) and the denominator is guarded
    where hi == lo so no 0/0 appears (docs/formats.md 1). The same key gives the same result. NaN stays NaN.
    """
    v = jnp.asarray(v, jnp.float32)
    lo, hi = e2m1_neighbours(v)
    gap = hi - lo
    p = jnp.where(gap > 0, (jnp.abs(v) - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
    u = jax.random.uniform(key, v.shape, jnp.float32)
    mag = jnp.where(u < p, hi, lo)
    return jnp.where(jnp.isnan(v), jnp.nan, jnp.copysign(mag, v))
