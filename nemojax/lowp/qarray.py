"""Quantized arrays: `quantize`, `dequantize`, FP4 packing (docs/formats.md 1-4).

A `QArray` holds the element codes unpacked (same shape as the input), the block or tensor *decode* scales and, for
NVFP4, the f32 global decode scale, so that x_hat = data * scale (* global_scale) with the scales broadcast back
over their blocks.

Blocks are contiguous runs of 16 (NVFP4) or 32 (MX) elements along `axis`, the contraction axis of the GEMM the
tensor feeds. "nvfp4_2d" uses 16x16 tiles over the last two dims (weights, docs/formats.md 4), so its scales have shape
x.shape with both of those dims divided by 16 and Q2D(W^T) == Q2D(W)^T. Dims that do not divide are zero-padded
internally (zeros never change an amax); outputs have the input's shape.

Per-tensor amax: the max |x| over the whole tensor, or the static `amax` argument, which is a scalar or an array
aligned with the *leading* dims of x (e.g. [E] for stacked experts [E, D, F]: one "tensor" per expert). The
blocked axes must lie after the dims that `amax` covers.

NaN / inf policy (the same for every format):
- amaxes (per tensor and per block) are taken over finite values only, so a NaN or inf never poisons a scale;
- a +-inf element saturates to the largest magnitude its block can represent (elem_max * block decode scale; for
  the per-tensor FP8 formats +-amax); the output is finite;
- a NaN element makes its own block dequantize to NaN and nothing else: the block scale is stored as NaN (E4M3
  NaN, E8M0 code 255); the element code is +0 (fp4 has no NaN). Per-tensor FP8 keeps NaN in the element itself
  (E4M3/E5M2 have NaN), so only that element is NaN.

XLA:CPU flushes fp32 subnormals. No computation here divides by a subnormal scale, but inputs in the fp32
subnormal range read as zero, and a tensor with amax < 2688/FLT_MAX (~7.9e-36) gets a global decode scale
1/FLT_MAX that is itself flushed to 0 on CPU, so it dequantizes to zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.lowp.formats import (
    E4M3_MAX,
    FLT_MAX,
    FormatSpec,
    cast_e2m1,
    cast_e4m3,
    cast_elements,
    check_format,
    e8m0_code,
    e8m0_from_code,
    e8m0_mul,
    e8m0_to_code,
    mul_pow2,
    stochastic_round_e2m1,
)

ROUNDINGS = ("rne", "stochastic")
NVFP4_GLOBAL = E4M3_MAX * 6.0  # 2688: the largest representable |x| / S_dec


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["data", "scale", "global_scale"],
    meta_fields=["fmt", "axis", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized tensor (a pytree; the arrays are leaves, fmt/axis/dtype are static).

    data: element codes, same shape as the input x [..], dtype float8_e4m3fn / float8_e5m2 / float4_e2m1fn.
    scale: decode scales.
      fp8_*: float32, shape () or amax.shape + (1,) * (x.ndim - amax.ndim) (broadcasts against data).
      nvfp4: float8_e4m3fn, x.shape with dim `axis` -> ceil(n / 16).
      nvfp4_2d: float8_e4m3fn, x.shape with the last two dims -> ceil(n / 16).
      mx*: float8_e8m0fnu, x.shape with dim `axis` -> ceil(n / 32).
    global_scale: nvfp4*: float32 decode scale S_dec = 1/S_enc (~ amax/2688), same shape rule as the fp8 scale;
      None for the other formats.
    fmt: one of FORMATS. axis: the blocked axis, non-negative. dtype: the input dtype's name.
    """

    data: jax.Array
    scale: jax.Array
    global_scale: jax.Array | None
    fmt: str
    axis: int
    dtype: str

    def __post_init__(self) -> None:
        # Only the static fields: the array fields are tracers under jit, or placeholders when jax rebuilds the
        # pytree, so they are not inspected here.
        spec = check_format(self.fmt)
        if isinstance(self.axis, bool) or not isinstance(self.axis, int) or (spec.block is not None and self.axis < 0):
            raise ValueError(f"axis={self.axis!r} is invalid; allowed: a non-negative int (the blocked axis)")
        if not isinstance(self.dtype, str) or not _is_float_dtype_name(self.dtype):
            raise ValueError(f"dtype={self.dtype!r} is invalid; allowed: the name of a floating dtype, e.g. 'float32'")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def spec(self) -> FormatSpec:
        return check_format(self.fmt)

    def dequantize(self, dtype: jnp.dtype | str | None = None) -> jax.Array:
        """x_hat [same shape as data], computed in f32 and returned in `dtype` (default: the input dtype)."""
        return dequantize(self, dtype)

    def packed(self) -> dict[str, jax.Array | None]:
        """Storage arrays: {"data", "scale", "global_scale"}.

        For fp4 formats "data" is uint8 with two codes per byte along `axis` (first element in the low nibble,
        the dim becomes ceil(n / 2)); for fp8 formats it is the codes as they are.
        """
        data = self.data
        if self.spec.is_fp4:
            data = jnp.moveaxis(pack_fp4(jnp.moveaxis(data, self.axis, -1), pad=True), -1, self.axis)
        return {"data": data, "scale": self.scale, "global_scale": self.global_scale}


# ------------------------------------------------------------------------------------------------- validation


def _is_float_dtype_name(name: str) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.dtype(name), jnp.floating))
    except TypeError:
        return False


def _normalize_axis(axis: int, ndim: int, field: str = "axis") -> int:
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"{field}={axis!r} is out of range for an array of rank {ndim}; allowed: [-{ndim}, {ndim})")
    return axis % ndim


def _check_inputs(x, spec: FormatSpec, axis, amax, block_scale, rounding, key) -> tuple[int, jax.Array | None]:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x has dtype {x.dtype}; allowed: a floating dtype")
    if x.ndim == 0:
        raise ValueError("x has shape (); allowed: rank >= 1")
    if x.size == 0:
        raise ValueError(f"x has shape {x.shape} with no elements; allowed: at least one element (an empty tensor "
                         "has no amax to scale by)")
    axis = _normalize_axis(axis, x.ndim)
    if spec.two_d:
        if x.ndim < 2 or axis < x.ndim - 2:
            raise ValueError(
                f"axis={axis} for fmt={spec.name!r} on shape {x.shape}; allowed: one of the last two dims "
                f"({max(x.ndim - 2, 0)}, {x.ndim - 1}); leading dims are batch dims"
            )
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}; allowed: {ROUNDINGS}")
    if rounding == "stochastic":
        if not spec.is_fp4:
            raise ValueError(f"rounding='stochastic' with fmt={spec.name!r}; allowed only for ('nvfp4', 'nvfp4_2d', "
                             "'mxfp4')")
        if key is None:
            raise ValueError("key=None with rounding='stochastic'; allowed: a jax.random key")
    if block_scale is not None and spec.scale_kind != "e4m3_block":
        raise ValueError(f"block_scale given with fmt={spec.name!r}; allowed only for ('nvfp4', 'nvfp4_2d')")
    if amax is not None and spec.scale_kind == "e8m0_block":
        raise ValueError(f"amax given with fmt={spec.name!r}; MX formats have no per-tensor scale, allowed: None")
    if amax is not None:
        _check_static_amax(amax)
        amax = jnp.asarray(amax, jnp.float32)
        lead = x.shape[: amax.ndim]
        ok = amax.ndim <= x.ndim and all(a in (1, d) for a, d in zip(amax.shape, lead, strict=True))
        first_blocked = x.ndim - 2 if spec.two_d else (axis if spec.block is not None else x.ndim)
        if not ok or amax.ndim > first_blocked:
            raise ValueError(
                f"amax has shape {amax.shape} for x of shape {x.shape} (blocked axis {axis}); allowed: () or a shape "
                f"broadcastable to the leading dims x.shape[:k] with k <= {first_blocked} (left-aligned)"
            )
    return axis, amax


def _check_static_amax(amax) -> None:
    """A host-side amax (Python number, numpy scalar or array) must be finite and >= 0: a NaN, inf or negative amax
    gives NaN, zero or sign-flipped scales. jax arrays (tracers inside jit, or device values) are not read back,
    since quantize runs traced in training and a check there would cost a host sync."""
    if isinstance(amax, bool | np.bool_) or (isinstance(amax, np.ndarray) and amax.dtype == bool):
        raise ValueError(f"amax={amax!r} is a bool; allowed: a finite float >= 0 (or an array of them)")
    if not isinstance(amax, int | float | np.generic | np.ndarray):
        return
    values = np.asarray(amax, np.float64)
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        raise ValueError(f"amax={amax!r} is invalid; allowed: finite values >= 0 (a calibrated max |x|)")


def _lead(a: jax.Array, ndim: int) -> jax.Array:
    """Left-aligned per-tensor array a [k dims] -> a.shape + (1,) * (ndim - k); a scalar stays ()."""
    if a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


# ----------------------------------------------------------------------------------------------------- blocks


def _blockify(x: jax.Array, spec: FormatSpec, axis: int) -> jax.Array:
    """x [...] -> blocks [..., nblocks..., B]: 1D: axis moved last and split (n -> nb, B); 2D: [..., R/16, C/16, 256].

    Zero-pads the blocked dims to a multiple of the block size.
    """
    B = spec.block
    if spec.two_d:
        pads = [(0, 0)] * (x.ndim - 2) + [(0, -x.shape[-2] % B), (0, -x.shape[-1] % B)]
        xp = jnp.pad(x, pads)
        *lead, R, C = xp.shape
        xb = xp.reshape(*lead, R // B, B, C // B, B)
        xb = jnp.swapaxes(xb, -3, -2)
        return xb.reshape(*lead, R // B, C // B, B * B)
    xm = jnp.moveaxis(x, axis, -1)
    xp = jnp.pad(xm, [(0, 0)] * (xm.ndim - 1) + [(0, -xm.shape[-1] % B)])
    return xp.reshape(*xp.shape[:-1], xp.shape[-1] // B, B)


def _unblockify(yb: jax.Array, spec: FormatSpec, axis: int, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of _blockify: blocks [..., nblocks..., B] -> [*shape] (padding cropped)."""
    B = spec.block
    if spec.two_d:
        *lead, nr, nc, _ = yb.shape
        y = jnp.swapaxes(yb.reshape(*lead, nr, nc, B, B), -3, -2).reshape(*lead, nr * B, nc * B)
        return y[..., : shape[-2], : shape[-1]]
    y = yb.reshape(*yb.shape[:-2], yb.shape[-2] * B)[..., : shape[axis]]
    return jnp.moveaxis(y, -1, axis)


def _scale_to_public(s: jax.Array, spec: FormatSpec, axis: int) -> jax.Array:
    """Block-layout scales [..., nblocks...] -> public layout (1D: the block dim back at `axis`)."""
    return s if spec.two_d else jnp.moveaxis(s, -1, axis)


def _scale_to_blocks(s: jax.Array, spec: FormatSpec, axis: int) -> jax.Array:
    return s if spec.two_d else jnp.moveaxis(s, axis, -1)


def block_scale_shape(shape: tuple[int, ...], fmt: str, axis: int = -1) -> tuple[int, ...]:
    """Shape of the block scales of a tensor of `shape` quantized with `fmt` along `axis` (() for fp8 formats)."""
    spec = check_format(fmt)
    if spec.block is None:
        return ()
    shape = tuple(shape)
    axis = _normalize_axis(axis, len(shape))
    out = list(shape)
    dims = [len(shape) - 2, len(shape) - 1] if spec.two_d else [axis]
    for d in dims:
        out[d] = -(-shape[d] // spec.block)
    return tuple(out)


def _finite_abs(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


# --------------------------------------------------------------------------------------------------- quantize


def nvfp4_global_scales(amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """TE steps 2-3: amax f32 [...] -> (S_enc, S_dec): S_enc = min(2688/amax, FLT_MAX), 0 -> 1, S_dec = 1/S_enc."""
    s_enc = jnp.minimum(jnp.float32(NVFP4_GLOBAL) / amax, jnp.float32(FLT_MAX))
    s_enc = jnp.where(s_enc == 0, jnp.float32(1.0), s_enc)
    return s_enc, jnp.float32(1.0) / s_enc


def quantize(
    x: jax.Array,
    fmt: str,
    *,
    axis: int = -1,
    amax: jax.Array | float | None = None,
    block_scale: jax.Array | None = None,
    rounding: str = "rne",
    key: jax.Array | None = None,
) -> QArray:
    """Quantize x [...] to `fmt` with blocks along `axis`; returns a QArray with data of x's shape.

    amax: static per-tensor amax, () or left-aligned with x's leading dims (e.g. [E]); None = max |x| (finite).
      Used by the fp8 formats and for the NVFP4 global scale.
    block_scale: static NVFP4 block decode scales (E4M3 values, e.g. from MSE calibration), shape
      block_scale_shape(x.shape, fmt, axis); replaces the dynamic d_b.
    rounding: "rne" or "stochastic" (fp4 formats only; needs `key`).
    """
    spec = check_format(fmt)
    x = jnp.asarray(x)
    axis, amax = _check_inputs(x, spec, axis, amax, block_scale, rounding, key)
    dtype_name = jnp.dtype(x.dtype).name
    xf = x.astype(jnp.float32)

    if spec.scale_kind == "tensor":
        A = jnp.max(_finite_abs(xf)) if amax is None else amax
        s = jnp.minimum(jnp.float32(spec.elem_max) / A, jnp.float32(FLT_MAX))
        s = jnp.where((A > 0) & jnp.isfinite(A), s, jnp.float32(1.0))
        s = _lead(s, x.ndim)
        q = cast_elements(xf * s, fmt)  # cast_elements clips to +-elem_max first
        return QArray(q, jnp.float32(1.0) / s, None, fmt, axis, dtype_name)

    xb = _blockify(xf, spec, axis)
    a_b = jnp.max(_finite_abs(xb), axis=-1, keepdims=True)
    has_nan = jnp.any(jnp.isnan(xb), axis=-1, keepdims=True)

    if spec.scale_kind == "e8m0_block":
        code = e8m0_code(a_b, spec.elem_max)
        v = jnp.clip(mul_pow2(xb, 127 - code), -spec.elem_max, spec.elem_max)
        q = _round_elements(v, spec, rounding, key)
        scale = e8m0_from_code(jnp.where(has_nan, 255, code)[..., 0])
        data = _unblockify(q, spec, axis, x.shape)
        return QArray(data, _scale_to_public(scale, spec, axis), None, fmt, axis, dtype_name)

    # NVFP4, TE order of operations (docs/formats.md 4; TE folds 1/6 into the global multiplier).
    A = jnp.max(_finite_abs(xf)) if amax is None else amax
    s_enc, s_dec = nvfp4_global_scales(A)
    s_enc_b = _lead(s_enc, xb.ndim)
    s_dec_b = _lead(s_dec, xb.ndim)
    if block_scale is None:
        mult = s_enc_b * jnp.float32(1.0 / 6.0)
        d = cast_e4m3(jnp.minimum(a_b * mult, jnp.float32(FLT_MAX)))
    else:
        want = block_scale_shape(x.shape, fmt, axis)
        if tuple(jnp.shape(block_scale)) != want:
            raise ValueError(f"block_scale has shape {tuple(jnp.shape(block_scale))}; allowed: {want} "
                             f"(x {x.shape}, fmt={fmt!r}, axis={axis})")
        bs = jnp.asarray(block_scale).astype(jnp.float32)
        d = cast_e4m3(jnp.abs(_scale_to_blocks(bs, spec, axis)))[..., None]
    df = d.astype(jnp.float32)
    e_b = jnp.minimum(jnp.float32(1.0) / (df * s_dec_b), jnp.float32(FLT_MAX))
    v = jnp.clip(xb * e_b, -spec.elem_max, spec.elem_max)
    q = _round_elements(v, spec, rounding, key)
    d = jnp.where(has_nan, jnp.float32(jnp.nan), df).astype(jnp.float8_e4m3fn)[..., 0]
    data = _unblockify(q, spec, axis, x.shape)
    return QArray(data, _scale_to_public(d, spec, axis), _lead(s_dec, x.ndim), fmt, axis, dtype_name)


def _round_elements(v: jax.Array, spec: FormatSpec, rounding: str, key: jax.Array | None) -> jax.Array:
    """Scaled, clipped f32 values -> element codes (RNE cast, or stochastic rounding for fp4); NaN -> code +0."""
    if rounding == "stochastic":
        v = stochastic_round_e2m1(v, key)
    if spec.is_fp4:
        return cast_e2m1(v)[0]
    return cast_elements(v, spec.name)


# ------------------------------------------------------------------------------------------------- dequantize


def expand_block_scale(scale: jax.Array, fmt: str, axis: int, shape: tuple[int, ...]) -> jax.Array:
    """Block scales (public layout) -> per-element array of `shape` (each scale repeated over its block)."""
    spec = check_format(fmt)
    B = spec.block
    if spec.two_d:
        s = jnp.repeat(jnp.repeat(scale, B, axis=-2), B, axis=-1)
        return s[..., : shape[-2], : shape[-1]]
    s = jnp.repeat(scale, B, axis=axis)
    return jax.lax.slice_in_dim(s, 0, shape[axis], axis=axis)


def dequantize(q: QArray, dtype: jnp.dtype | str | None = None) -> jax.Array:
    """QArray -> x_hat [q.shape] in `dtype` (default: the dtype q was quantized from); math in f32.

    fp8: data * scale. nvfp4: (data * d_b) * S_dec (TE step 7). mx: data * 2^(code - 127), exact.
    """
    spec = q.spec
    out_dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    data = q.data.astype(jnp.float32)
    if spec.scale_kind == "tensor":
        y = data * q.scale
    elif spec.scale_kind == "e4m3_block":
        d = expand_block_scale(q.scale.astype(jnp.float32), q.fmt, q.axis, q.shape)
        y = (data * d) * q.global_scale
    else:
        code = expand_block_scale(e8m0_to_code(q.scale), q.fmt, q.axis, q.shape)
        y = e8m0_mul(data, e8m0_from_code(code))
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------- packing


def pack_fp4(codes: jax.Array, pad: bool = False) -> jax.Array:
    """float4_e2m1fn [..., n] -> uint8 [..., n/2]; element 2i in the low nibble, 2i+1 in the high nibble.

    Same convention as TE / ModelOpt / cuBLAS and as lax.bitcast_convert_type(codes.reshape(..., n//2, 2), uint8).
    n must be even unless `pad`, which appends a zero code (output [..., ceil(n/2)]).
    """
    if codes.dtype != jnp.float4_e2m1fn:
        raise ValueError(f"codes has dtype {codes.dtype}; allowed: float4_e2m1fn")
    n = codes.shape[-1]
    if n % 2:
        if not pad:
            raise ValueError(f"codes.shape[-1]={n}; allowed: an even length (or pad=True)")
        codes = jnp.concatenate([codes, jnp.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    nib = jax.lax.bitcast_convert_type(codes, jnp.uint4).astype(jnp.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """uint8 [..., m] -> float4_e2m1fn [..., 2m] (low nibble first); inverse of pack_fp4."""
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed has dtype {packed.dtype}; allowed: uint8")
    lo = (packed & 0xF).astype(jnp.uint4)
    hi = (packed >> 4).astype(jnp.uint4)
    nib = jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return jax.lax.bitcast_convert_type(nib, jnp.float4_e2m1fn)
