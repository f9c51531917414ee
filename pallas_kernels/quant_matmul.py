"""Low-precision matmul kernels (Pallas): per-tensor-scaled FP8 and W4A16 NVFP4 (spec quant.md 1.1, 1.5, 5.4, 5.5).

* `fp8_matmul(a, b, a_scale_inv, b_scale_inv)`: a [M, K] and b [K, N] in float8_e4m3fn, per-tensor f32 decode
  scales. FP8 x FP8 dot with f32 accumulation over the K grid axis; the epilogue multiplies by
  a_scale_inv * b_scale_inv.
* `nvfp4_matmul(x, w_packed, w_scale, w_global)`: W4A16 as NVIDIA ships NVFP4 checkpoints on Hopper (no FP4 MMA
  there). x [M, K] activations in bf16; the weight in the ModelOpt/PyTorch layout [N, K]: w_packed uint8 [N, K/2]
  (two E2M1 codes per byte along K, first element in the low nibble), w_scale float8_e4m3fn [N, K/16] (one decode
  scale per 16 elements along K), w_global the f32 per-tensor decode scale S_dec. y = x @ dequant(W).T -> [M, N].
  In the kernel the nibbles are unpacked with bit ops, decoded arithmetically (no gather), multiplied by the block
  scale in bf16 (exact: E2M1 x E4M3 has at most 6 significant bits), dotted in bf16 with f32 accumulation; the
  epilogue multiplies by S_dec.

  The low nibbles hold the even K columns and the high nibbles the odd ones, so the wrapper splits x into its even
  and odd columns once and the kernel runs two dots (x_even @ W_lo.T + x_odd @ W_hi.T); no in-kernel interleave.
  Both elements of a byte share a block scale (16 is even), so each scale covers 8 bytes.

Both kernels use the grid (M/bm, N/bn, K/bk) with K innermost and accumulate in the f32 output block (resident across
the K axis, which is sequential on TPU and in interpret mode); the epilogue scale runs in the kernel at the last K
step, and the wrapper casts to out_dtype when it slices off the padding. Shapes that are not multiples of the blocks
are zero-padded in the wrapper (zero codes and zero scales decode to 0). Depends on JAX alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["fp8_matmul", "nvfp4_matmul"]

_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]


def _pow2_block(dim: int, block: int, minimum: int) -> int:
    """The block for a dim: `block`, or the smallest power of two >= dim (at least `minimum`) when that is smaller."""
    return max(minimum, min(block, pl.next_power_of_2(dim)))


def _pad_to(x: jax.Array, mults: tuple[int, ...]) -> jax.Array:
    pads = [(0, -d % m) for d, m in zip(x.shape, mults, strict=True)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _scalar(v, name: str) -> jax.Array:
    v = jnp.asarray(v, jnp.float32)
    if v.size != 1:
        raise ValueError(f"{name} has shape {v.shape}; allowed: a scalar (per-tensor scale)")
    return v.reshape(1, 1)


def _check_blocks(**blocks: int) -> None:
    for name, b in blocks.items():
        if b <= 0:
            raise ValueError(f"{name}={b}; allowed: a positive block size")


# ------------------------------------------------------------------------------------------------------- fp8


def _fp8_kernel(a_ref, b_ref, s_ref, o_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    o_ref[...] += jax.lax.dot_general(a_ref[...], b_ref[...], _NN, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        o_ref[...] = o_ref[...] * s_ref[0, 0]


def fp8_matmul(
    a: jax.Array,
    b: jax.Array,
    a_scale_inv,
    b_scale_inv,
    *,
    out_dtype=jnp.bfloat16,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """(a * a_scale_inv) @ (b * b_scale_inv) for float8_e4m3fn a [M, K], b [K, N] -> [M, N] in out_dtype.

    a_scale_inv / b_scale_inv: per-tensor f32 decode scales (x_hat = code * scale_inv). f32 accumulation; the product
    of the two scales is applied once to the accumulator.
    """
    for name, t in (("a", a), ("b", b)):
        if t.ndim != 2 or t.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} has shape {t.shape} dtype {t.dtype}; allowed: 2-D float8_e4m3fn")
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2:
        raise ValueError(f"a.shape[1]={K} != b.shape[0]={K2}; the contraction dims must agree")
    _check_blocks(block_m=block_m, block_n=block_n, block_k=block_k)
    s = _scalar(a_scale_inv, "a_scale_inv") * _scalar(b_scale_inv, "b_scale_inv")
    bm, bn, bk = _pow2_block(M, block_m, 16), _pow2_block(N, block_n, 16), _pow2_block(K, block_k, 32)
    ap, bp = _pad_to(a, (bm, bk)), _pad_to(b, (bk, bn))
    Mp, Kp = ap.shape
    Np = bp.shape[1]
    out = pl.pallas_call(
        _fp8_kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), jnp.float32),
        grid=(Mp // bm, Np // bn, Kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, 1), lambda i, j, k: (0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        interpret=interpret,
        name="fp8_matmul",
    )(ap, bp, s)
    return out[:M, :N].astype(out_dtype)


# ----------------------------------------------------------------------------------------------------- nvfp4


def _e2m1_decode(code: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """4-bit E2M1 codes (any integer dtype, values 0..15) -> values in `dtype`; arithmetic, no table gather.

    bit 3 = sign, bits 2-1 = exponent e (bias 1), bit 0 = mantissa m: e == 0 -> m/2 (subnormal), else
    (1 + m/2) * 2^(e-1) = (2 + m) * 2^(e-2). All 15 values are exact in bf16.
    """
    c = code.astype(jnp.int32)
    e = (c >> 1) & 3
    m = (c & 1).astype(jnp.float32)
    p = jnp.where(e == 1, 0.5, jnp.where(e == 2, 1.0, 2.0))
    mag = jnp.where(e == 0, 0.5 * m, (2.0 + m) * p)
    return jnp.where(c >= 8, -mag, mag).astype(dtype)


def _nvfp4_kernel(xe_ref, xo_ref, w_ref, s_ref, g_ref, o_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    w = w_ref[...]  # uint8 [bn, bk/2]
    bn, half = w.shape
    s = s_ref[...].astype(jnp.bfloat16)  # [bn, bk/16]: each scale covers 8 bytes
    s = jnp.broadcast_to(s[:, :, None], (bn, half // 8, 8)).reshape(bn, half)
    w_lo = _e2m1_decode(w & 0xF) * s  # even K columns; exact in bf16
    w_hi = _e2m1_decode(w >> 4) * s  # odd K columns
    acc = jax.lax.dot_general(xe_ref[...], w_lo, _NT, preferred_element_type=jnp.float32)
    acc += jax.lax.dot_general(xo_ref[...], w_hi, _NT, preferred_element_type=jnp.float32)
    o_ref[...] += acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _epilogue():
        o_ref[...] = o_ref[...] * g_ref[0, 0]


def nvfp4_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    w_global,
    *,
    out_dtype=jnp.bfloat16,
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """W4A16 NVFP4 matmul: x [M, K] @ dequant(W).T -> [M, N] in out_dtype, W [N, K] stored packed.

    w_packed uint8 [N, K/2] (element 2i of a row in the low nibble of byte i), w_scale float8_e4m3fn [N, K/16]
    (block decode scales along K), w_global f32 scalar S_dec; dequant(W)[n, k] = e2m1(code) * w_scale[n, k // 16]
    * w_global. x is cast to bf16. K must be a multiple of 32; block_k (rounded to the data) a multiple of 32.
    """
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x has shape {x.shape} dtype {x.dtype}; allowed: 2-D floating [M, K]")
    M, K = x.shape
    if K % 32:
        raise ValueError(f"K={K} (x.shape[1]); allowed: a multiple of 32 (two nibbles per byte x 16-element blocks)")
    if w_packed.ndim != 2 or w_packed.dtype != jnp.uint8 or w_packed.shape[1] != K // 2:
        raise ValueError(f"w_packed has shape {w_packed.shape} dtype {w_packed.dtype}; allowed: uint8 [N, {K // 2}]")
    N = w_packed.shape[0]
    if w_scale.shape != (N, K // 16) or w_scale.dtype != jnp.float8_e4m3fn:
        raise ValueError(
            f"w_scale has shape {w_scale.shape} dtype {w_scale.dtype}; allowed: float8_e4m3fn [{N}, {K // 16}]"
        )
    _check_blocks(block_m=block_m, block_n=block_n, block_k=block_k)
    if block_k % 32:
        raise ValueError(f"block_k={block_k}; allowed: a multiple of 32")
    g = _scalar(w_global, "w_global")
    bm, bn, bk = _pow2_block(M, block_m, 16), _pow2_block(N, block_n, 16), _pow2_block(K, block_k, 32)
    xb = x.astype(jnp.bfloat16)
    xe, xo = _pad_to(xb[:, 0::2], (bm, bk // 2)), _pad_to(xb[:, 1::2], (bm, bk // 2))
    wp, ws = _pad_to(w_packed, (bn, bk // 2)), _pad_to(w_scale, (bn, bk // 16))
    Mp, Kh = xe.shape
    Np = wp.shape[0]
    out = pl.pallas_call(
        _nvfp4_kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), jnp.float32),
        grid=(Mp // bm, Np // bn, Kh // (bk // 2)),
        in_specs=[
            pl.BlockSpec((bm, bk // 2), lambda i, j, k: (i, k)),
            pl.BlockSpec((bm, bk // 2), lambda i, j, k: (i, k)),
            pl.BlockSpec((bn, bk // 2), lambda i, j, k: (j, k)),
            pl.BlockSpec((bn, bk // 16), lambda i, j, k: (j, k)),
            pl.BlockSpec((1, 1), lambda i, j, k: (0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        interpret=interpret,
        name="nvfp4_matmul",
    )(xe, xo, wp, ws, g)
    return out[:M, :N].astype(out_dtype)
