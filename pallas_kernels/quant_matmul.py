"""Low-precision matmul kernels (Pallas): per-tensor-scaled FP8 and W4A16 NVFP4 (docs/formats.md 1, 4).

* `fp8_matmul(a, b, a_scale_inv, b_scale_inv)`: a [M, K] and b [K, N] (or [N, K], `b_layout="nk"`) in
  float8_e4m3fn, per-tensor f32 decode scales. FP8 x FP8 dot with f32 accumulation over K; the epilogue multiplies
  by a_scale_inv * b_scale_inv. `impl` picks who runs it: "pallas" (the Triton kernel below; Pallas' Triton
  lowering cannot issue Hopper's wgmma, so it trails cuBLAS), or XLA's own FP8 GEMM, written in the two forms
  XLA's GPU gemm rewriter turns into a cuBLASLt FP8 matmul (custom call `__cublas$lt$matmul$f8`, operand scales
  passed to cuBLASLt) on Hopper/Ada (openxla/xla xla/service/gpu/transforms/gemm_rewriter_fp8_test.cc,
  ScaledABUnscaledDF8 and ScaledABUnscaledDColMajorLhsF8): "xla" dequantize-then-dot (convert the E4M3 codes to
  f32, multiply by the scale, dot, then cast to out_dtype; flax.linen.fp8_ops' dq-dot form), "xla_out"
  the same with the dot emitting out_dtype itself (the cast left to cuBLASLt's D type), and "xla_dot" a dot on
  the E4M3 operands themselves with an f32 result, then the scale and the cast. cuBLASLt's FP8 GEMM wants the
  "TN" layout (both operands K-minor): a [K, N] b costs XLA a transpose of b per call, which b_layout="nk"
  (a weight stored [N, K], as PyTorch and ModelOpt keep it) avoids. Which form wins is measured by
  experiments/bench_kernels.py --sweep.
* `nvfp4_block_scaled_matmul(x_codes, x_scale, x_global, w_codes, w_scale, w_global)`: W4A4, both operands NVFP4,
  on the hardware's block-scaled MMA where it has one (Blackwell, `has_native_fp4`): `jax.nn.scaled_matmul`, i.e.
  XLA's block_scaled_dot, which cuDNN runs natively there (and XLA rewrites into dequantize + dot on older GPUs).
  Not a Pallas kernel: the issue asks for the native path where the hardware has it, and that path is a library
  call. Off GPU the same contract is computed by its documented formula in plain JAX, so the layouts and the
  global-scale epilogue are testable on CPU.
* `nvfp4_matmul(x, w_packed, w_scale, w_global)`: W4A16 as NVIDIA ships NVFP4 checkpoints on Hopper (no FP4 MMA
  there). x [M, K] activations; the weight in the ModelOpt/PyTorch layout [N, K]: w_packed uint8 [N, K/2]
  (two E2M1 codes per byte along K, first element in the low nibble), w_scale float8_e4m3fn [N, K/16] (one decode
  scale per 16 elements along K), w_global the f32 per-tensor decode scale S_dec. y = x @ dequant(W).T -> [M, N].
  In the kernel the nibbles are unpacked with bit ops, decoded without a gather (by default moved into E4M3
  bit positions and converted by the hardware, `_e2m1_pair_as_e4m3`) and multiplied by the block scale in the
  dot dtype: bf16 (exact: E2M1 x E4M3 has at most 6 significant bits), or f32 when x is f32
  (an f32 model gets f32 numerics, not a silent bf16 cast); the dot accumulates in f32 and the epilogue
  multiplies by S_dec.

  The low nibbles hold the even K columns and the high nibbles the odd ones, so the wrapper splits x into its even
  and odd columns once and the kernel runs two dots (x_even @ W_lo.T + x_odd @ W_hi.T); no in-kernel interleave.
  Both elements of a byte share a block scale (16 is even), so each scale covers 8 bytes.

Both kernels use the grid (M/bm, N/bn) and no K grid axis: each program owns one output block and its refs hold
full-K slabs of the operands ((bm, K) and (K, bn) for fp8; (bm, K/2), (bn, K/2), (bn, K/16) for nvfp4). A
`lax.fori_loop` walks K in blocks of bk (`ref[:, pl.ds(k * bk, bk)]`), carrying an f32 accumulator; the epilogue
scale and the cast to out_dtype follow the loop and the output block is stored once. A K grid axis accumulating
into a resident output block would be a data race under the GPU (Triton) backend, where grid programs run in
parallel (it is only sequential on TPU and in interpret mode); this is the pattern of JAX's own GPU kernels
(jax.experimental.pallas.ops.gpu.attention). Shapes that are not multiples of the blocks are zero-padded in the
wrapper (zero codes and zero scales decode to 0) and the padding is sliced off. f32 dots ask for
Precision.HIGHEST, which the Triton lowering maps to IEEE (the default would be TF32); bf16 and fp8 dots keep the
default. On GPU the kernels pass Triton compiler params (`dispatch.compiler_params`): a pallas_call without them
would be lowered by Mosaic GPU.
Depends on JAX alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch

__all__ = ["FP8_IMPLS", "fp8_matmul", "has_native_fp4", "nvfp4_block_scaled_matmul", "nvfp4_default_config",
           "nvfp4_matmul", "nvfp4_smem_bytes"]

FP8_IMPLS = ("pallas", "xla", "xla_out", "xla_dot")
B_LAYOUTS = ("kn", "nk")

_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]
_HI = jax.lax.Precision.HIGHEST  # IEEE f32 dots under Triton (DEFAULT would be TF32); f32 operands only


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


def _triton_params(backend: str | None, num_warps: int | None, num_stages: int | None):
    """Triton compiler params with the launch options that were given (None: Triton's defaults, 4 warps and, in
    JAX's params, 3 pipeline stages)."""
    for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and v <= 0:
            raise ValueError(f"{name}={v}; allowed: None or a positive integer")
    opts = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    return dispatch.compiler_params(backend, **opts)


# ------------------------------------------------------------------------------------------------------- fp8


def _k_slice(k: jax.Array, size: int):
    """The k-th block of `size` along a full-K slab (start aligned to `size`, which the Triton lowering uses)."""
    return pl.ds(pl.multiple_of(k * size, size), size)


def _fp8_kernel(a_ref, b_ref, s_ref, o_ref, *, bk: int, nk: bool):
    # a_ref [bm, Kp], b_ref [Kp, bn] (or [bn, Kp] when nk): full-K slabs; one program per output block, K walked
    # in-kernel
    bm, bn = o_ref.shape

    def body(k, acc):
        a = a_ref[:, _k_slice(k, bk)]  # [bm, bk] e4m3
        if nk:
            b = b_ref[:, _k_slice(k, bk)]  # [bn, bk] e4m3
            return acc + jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
        b = b_ref[_k_slice(k, bk), :]  # [bk, bn] e4m3
        return acc + jax.lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, a_ref.shape[1] // bk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[0, 0]).astype(o_ref.dtype)


def fp8_matmul(
    a: jax.Array,
    b: jax.Array,
    a_scale_inv,
    b_scale_inv,
    *,
    out_dtype=jnp.bfloat16,
    impl: str = "pallas",
    b_layout: str = "kn",
    block_m: int = 128,
    block_n: int = 128,
    block_k: int = 128,
    num_warps: int | None = 8,
    num_stages: int | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """(a * a_scale_inv) @ (b * b_scale_inv) for float8_e4m3fn a [M, K], b [K, N] -> [M, N] in out_dtype.

    b_layout: "kn" (b is [K, N]) or "nk" (b is [N, K], the product then being a @ b.T). a_scale_inv /
    b_scale_inv: per-tensor f32 decode scales (x_hat = code * scale_inv). f32 accumulation; the scales are applied
    in f32 and the result cast to out_dtype. impl (module docstring): "pallas" (the Triton kernel; block_m/n/k,
    num_warps, num_stages tune it and are ignored by the others; 8 warps by default: with Triton's 4 the 128 x 128
    f32 accumulator spills at 255 registers, measured with pallas_kernels.resources for sm_90a), "xla"
    (dequantize then dot), "xla_out" (the same, the dot emitting out_dtype) or "xla_dot" (a dot on the E4M3
    operands, then the scale). The XLA forms are plain jnp and run on any backend (interpret does not apply).
    """
    if impl not in FP8_IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {FP8_IMPLS}")
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"b_layout={b_layout!r}; allowed: {B_LAYOUTS}")
    for name, t in (("a", a), ("b", b)):
        if t.ndim != 2 or t.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} has shape {t.shape} dtype {t.dtype}; allowed: 2-D float8_e4m3fn")
    nk = b_layout == "nk"
    (M, K), (K2, N) = a.shape, (b.shape[::-1] if nk else b.shape)
    if K != K2:
        raise ValueError(f"a.shape[1]={K} != the contraction dim of b={K2} (b {b.shape}, b_layout={b_layout!r}); "
                         "the contraction dims must agree")
    _check_blocks(block_m=block_m, block_n=block_n, block_k=block_k)
    sa, sb = _scalar(a_scale_inv, "a_scale_inv")[0, 0], _scalar(b_scale_inv, "b_scale_inv")[0, 0]
    dims = _NT if nk else _NN
    if impl == "xla":  # convert -> scale -> dot (f32) -> cast: the gemm rewriter's scaled-operand FP8 pattern
        y = jax.lax.dot_general(a.astype(jnp.float32) * sa, b.astype(jnp.float32) * sb, dims,
                                preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    if impl == "xla_out":  # the same, the dot itself producing out_dtype (cuBLASLt's D type)
        return jax.lax.dot_general(a.astype(jnp.float32) * sa, b.astype(jnp.float32) * sb, dims,
                                   preferred_element_type=out_dtype)
    if impl == "xla_dot":  # FP8 operands straight into the dot, the product of the scales on the f32 result
        y = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
        return (y * (sa * sb)).astype(out_dtype)
    s = (sa * sb).reshape(1, 1)
    bm, bn, bk = _pow2_block(M, block_m, 16), _pow2_block(N, block_n, 16), _pow2_block(K, block_k, 32)
    ap, bp = _pad_to(a, (bm, bk)), _pad_to(b, (bn, bk) if nk else (bk, bn))
    Mp, Kp = ap.shape
    Np = bp.shape[0] if nk else bp.shape[1]
    b_spec = (pl.BlockSpec((bn, Kp), lambda i, j: (j, 0)) if nk else pl.BlockSpec((Kp, bn), lambda i, j: (0, j)))
    out = pl.pallas_call(
        functools.partial(_fp8_kernel, bk=bk, nk=nk),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, Np // bn),
        in_specs=[
            pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
            b_spec,
            pl.BlockSpec((1, 1), lambda i, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(backend, num_warps, num_stages),
        name="fp8_matmul",
    )(ap, bp, s)
    return out[:M, :N]


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


def _e2m1_pair_as_e4m3(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed bytes (uint8, two E2M1 codes each, element 2i in the low nibble) -> the two codes as float8_e4m3fn
    numbers equal to e2m1(code) * 2**-6, exactly: the code's magnitude bits (e1 e0 m) become E4M3's exponent
    0 0 e1 e0 and mantissa m 0 0, which is 2**(e-7) * (1 + m/2) for e >= 1 and, as an E4M3 subnormal,
    2**-6 * m/2 for e == 0; the sign bit moves to bit 7. A handful of integer ops per byte and one hardware
    conversion per element afterwards (instead of `_e2m1_decode`'s compare/select chain), which matters for the
    decode GEMV, where every weight element is decoded once per output row block."""
    lo = ((w << 2) & 0x1C) | ((w << 4) & 0x80)
    hi = ((w >> 2) & 0x1C) | (w & 0x80)
    f8 = jnp.float8_e4m3fn
    return jax.lax.bitcast_convert_type(lo, f8), jax.lax.bitcast_convert_type(hi, f8)


NVFP4_DECODES = ("e4m3", "arith")


def _nvfp4_kernel(xe_ref, xo_ref, w_ref, s_ref, g_ref, o_ref, *, bk: int, decode: str):
    # xe/xo [bm, Kp/2], w [bn, Kp/2], s [bn, Kp/16]: full-K slabs; K walked in-kernel, bk/2 bytes per step
    bm, bn = o_ref.shape
    half, nsc = bk // 2, bk // 16
    dt = xe_ref.dtype  # the dot dtype: bf16, or f32 for an f32 x
    precision = _HI if dt == jnp.float32 else None

    def body(k, acc):
        w = w_ref[:, _k_slice(k, half)]  # uint8 [bn, bk/2]
        s = s_ref[:, _k_slice(k, nsc)].astype(dt)  # [bn, bk/16]: each scale covers 8 bytes
        if decode == "e4m3":
            s = s * 64.0  # undoes the 2**-6 of the E4M3 view of the codes (exact)
            c_lo, c_hi = (c.astype(dt) for c in _e2m1_pair_as_e4m3(w))
        else:
            c_lo, c_hi = _e2m1_decode(w & 0xF, dt), _e2m1_decode(w >> 4, dt)
        s = jnp.broadcast_to(s[:, :, None], (bn, nsc, 8)).reshape(bn, half)
        w_lo = c_lo * s  # even K columns; exact in bf16 (2 x 4 significant bits)
        w_hi = c_hi * s  # odd K columns
        xe, xo = xe_ref[:, _k_slice(k, half)], xo_ref[:, _k_slice(k, half)]
        acc += jax.lax.dot_general(xe, w_lo, _NT, precision=precision, preferred_element_type=jnp.float32)
        return acc + jax.lax.dot_general(xo, w_hi, _NT, precision=precision, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, w_ref.shape[1] // half, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * g_ref[0, 0]).astype(o_ref.dtype)


DECODE_M = 64  # M up to this is decode-shaped: the W4A16 matmul is a GEMV bound by streaming the weight
SMEM_BUDGET = 150 * 1024  # what the default configs stay under (H100/H200 allow 227 KB per block)


def nvfp4_smem_bytes(block_m: int, block_n: int, block_k: int, num_stages: int = 3, x_bytes: int = 2) -> int:
    """An estimate of the shared memory of one nvfp4_matmul program: Triton's pipeliner keeps `num_stages` copies
    of the tiles one K step loads (x even + odd [bm, bk/2] each, x_bytes per element; the packed weight
    [bn, bk/2] bytes; its scales [bn, bk/16] bytes), plus the decoded weight operands of the two dots
    ([bn, bk/2] each in the dot dtype) staged for the MMA. An over-estimate rather than an under-: the H200 run
    of (128, 128, 256, 3 stages) asked Triton for 266240 bytes and this gives 317440."""
    per_stage = block_m * block_k * x_bytes + block_n * block_k // 2 + block_n * block_k // 16
    return num_stages * per_stage + block_n * block_k * x_bytes


def nvfp4_default_config(M: int, x_dtype=jnp.bfloat16) -> dict:
    """The (block_m, block_n, block_k, num_warps, num_stages) nvfp4_matmul uses for M rows of x in x_dtype.

    Decode-sized M (<= DECODE_M): a GEMV bound by reading the weight, so a 16-row block (the smallest MMA tile)
    and narrow N blocks (32 columns: N / 32 programs, 256 at N = 8192, about two per SM on an H200) that each
    stream a long K step (512, or 128 for f32 x) so every program keeps several weight tiles in flight.
    Prefill-sized M: a GEMM tiling (128 x 128 output blocks, 64 x 128 for f32 x, K steps of 64, 8 warps). All stay
    under SMEM_BUDGET by `nvfp4_smem_bytes` at Triton's 3 stages. Checked with pallas_kernels.resources (Triton
    3.9 compiling the kernels' IR for sm_90a, K = N = 8192): the bf16 configs take 51 KB (decode, 109 registers)
    and 74 KB (prefill, 167 registers) of shared memory without spills, where 4 warps spilled at 255 registers in
    the prefill tile; the f32 ones spill a little (the f32 dot is an IEEE FMA loop, not an MMA)."""
    f32x = jnp.dtype(x_dtype) == jnp.float32
    if M <= DECODE_M:
        return dict(block_m=16, block_n=32, block_k=128 if f32x else 512, num_warps=4, num_stages=3)
    return dict(block_m=64 if f32x else 128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def nvfp4_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scale: jax.Array,
    w_global,
    *,
    out_dtype=jnp.bfloat16,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    decode: str = "e4m3",
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """W4A16 NVFP4 matmul: x [M, K] @ dequant(W).T -> [M, N] in out_dtype, W [N, K] stored packed.

    w_packed uint8 [N, K/2] (element 2i of a row in the low nibble of byte i), w_scale float8_e4m3fn [N, K/16]
    (block decode scales along K), w_global f32 scalar S_dec; dequant(W)[n, k] = e2m1(code) * w_scale[n, k // 16]
    * w_global. The dot runs in f32 when x is f32, else in bf16 (x cast to bf16), with f32 accumulation; the output
    block is cast to out_dtype in the kernel. K must be a multiple of 32; block_k (rounded to the data) a multiple
    of 32. Blocks and the Triton launch options (num_warps, num_stages: the loads of each K step are pipelined
    over that many buffers) default per M and x dtype to `nvfp4_default_config`; each one given overrides its
    default. decode: how the kernel turns codes into values, "e4m3" (bit moves into an E4M3 view and a hardware
    conversion, `_e2m1_pair_as_e4m3`) or "arith" (`_e2m1_decode`'s compare/select arithmetic); equal results.
    """
    if decode not in NVFP4_DECODES:
        raise ValueError(f"decode={decode!r}; allowed: {NVFP4_DECODES}")
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
    cfg = nvfp4_default_config(M, x.dtype)
    block_m, block_n, block_k = (cfg[k] if v is None else v for k, v in
                                 (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)))
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    _check_blocks(block_m=block_m, block_n=block_n, block_k=block_k)
    if block_k % 32:
        raise ValueError(f"block_k={block_k}; allowed: a multiple of 32")
    g = _scalar(w_global, "w_global")
    bm, bn, bk = _pow2_block(M, block_m, 16), _pow2_block(N, block_n, 16), _pow2_block(K, block_k, 32)
    xb = x.astype(jnp.float32 if x.dtype == jnp.float32 else jnp.bfloat16)
    xe, xo = _pad_to(xb[:, 0::2], (bm, bk // 2)), _pad_to(xb[:, 1::2], (bm, bk // 2))
    wp, ws = _pad_to(w_packed, (bn, bk // 2)), _pad_to(w_scale, (bn, bk // 16))
    Mp, Kh = xe.shape
    Np = wp.shape[0]
    out = pl.pallas_call(
        functools.partial(_nvfp4_kernel, bk=bk, decode=decode),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // bm, Np // bn),
        in_specs=[
            pl.BlockSpec((bm, Kh), lambda i, j: (i, 0)),
            pl.BlockSpec((bm, Kh), lambda i, j: (i, 0)),
            pl.BlockSpec((bn, Kh), lambda i, j: (j, 0)),
            pl.BlockSpec((bn, Kh // 8), lambda i, j: (j, 0)),
            pl.BlockSpec((1, 1), lambda i, j: (0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(backend, num_warps, num_stages),
        name="nvfp4_matmul",
    )(xe, xo, wp, ws, g)
    return out[:M, :N]


# ------------------------------------------------------------------------------------- native block-scaled FP4


def has_native_fp4(device: jax.Device | None = None) -> bool:
    """Whether `device` (default: the first) has block-scaled FP4 tensor cores: an NVIDIA GPU of compute capability
    10 or newer (Blackwell). Hopper (9.0) has none, hence the W4A16 kernel there."""
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and float(capability) >= 10.0


def nvfp4_block_scaled_matmul(x_codes: jax.Array, x_scale: jax.Array, x_global, w_codes: jax.Array,
                              w_scale: jax.Array, w_global, *, out_dtype=jnp.bfloat16,
                              backend: str | None = None) -> jax.Array:
    """W4A4 NVFP4: dequant(x) @ dequant(W).T -> [M, N] in out_dtype, both operands blocked along K.

    x_codes float4_e2m1fn [M, K], x_scale float8_e4m3fn [M, K/16], x_global f32 scalar S_dec of x; the weight in
    the [N, K] layout: w_codes [N, K], w_scale [N, K/16], w_global. dequant(t)[r, k] = code * scale[r, k // 16] *
    global. The block-scaled product accumulates in f32; the two global scales multiply the result once. On GPU
    this is `jax.nn.scaled_matmul` (cuDNN's native NVFP4 GEMM on Blackwell); elsewhere its documented formula.
    """
    (M, K), (N, K2) = x_codes.shape, w_codes.shape
    if K != K2 or K % 16:
        raise ValueError(f"x_codes {x_codes.shape}, w_codes {w_codes.shape}; allowed: [M, K] and [N, K] with K a "
                         "multiple of 16")
    for name, t in (("x", x_codes), ("w", w_codes)):
        if t.dtype != jnp.float4_e2m1fn:
            raise ValueError(f"{name}_codes dtype {t.dtype}; allowed: float4_e2m1fn")
    for name, t, rows in (("x_scale", x_scale, M), ("w_scale", w_scale, N)):
        if t.shape != (rows, K // 16) or t.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} has shape {t.shape} dtype {t.dtype}; allowed: float8_e4m3fn [{rows}, {K // 16}]")
    g = _scalar(x_global, "x_global")[0, 0] * _scalar(w_global, "w_global")[0, 0]
    if (backend or jax.default_backend()) == "gpu":
        y = jax.nn.scaled_matmul(x_codes[None], w_codes[None], x_scale[None], w_scale[None],
                                 preferred_element_type=jnp.float32)[0]
    else:
        a = x_codes.astype(jnp.float32) * jnp.repeat(x_scale.astype(jnp.float32), 16, axis=1)
        b = w_codes.astype(jnp.float32) * jnp.repeat(w_scale.astype(jnp.float32), 16, axis=1)
        y = jax.lax.dot_general(a, b, _NT, precision=_HI, preferred_element_type=jnp.float32)
    return (y * g).astype(out_dtype)
