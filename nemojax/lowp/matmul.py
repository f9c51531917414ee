"""Quantized linear-layer GEMMs: FP8 / MXFP8 / NVFP4 "quantized training" and QAT fake quantization
(docs/formats.md 4-6).

One entry point for a linear layer y = x @ W (our kernels are [in, out] = [K, N]):

    y = matmul(x, w, spec, key=key, input_amax=a_x, weight_amax=a_w, weight_block_scale=s_w)

- `spec is None`: a plain high-precision dot (float32 accumulation).
- `spec.grad is None` (QAT / QAD, `fake_matmul`): x and W are fake-quantized with their straight-through
  estimators and the backward is the plain high-precision backward of that dot.
- `spec.grad` set (quantized training, `quantized_matmul`): all three GEMMs of the layer run on quantized operands,
  emulated as dequantize-then-dot with float32 accumulation, through a `jax.custom_vjp`:

      fprop  y  = DQ(Q(x, along K))           @ DQ(Q(W, along K))
      dgrad  dx = DQ(Q(dy, along N; SR))      @ DQ(Q(W))^T          (the same quantized W for 2D formats;
                                                                      1D formats quantize W columnwise, along N)
      wgrad  dW = DQ(Q(R x, along T))^T       @ DQ(Q(R dy, along T; SR))

  with T the flattened token axis (the wgrad contraction), R the random Hadamard transform along T when `spec.rht`
  (applied before the per-tensor amax is taken; R is orthonormal so (R x)^T (R dy) = x^T dy), and SR stochastic
  rounding when `spec.grad.rounding == "stochastic"` (two independent keys split from `key`). Tokens are padded
  with zeros along T to a multiple of the block size (and of 16 for the RHT); zero rows change no product.
  The FP8 "hybrid" recipe (E4M3 forward operands, E5M2 gradients, per-tensor current scaling) and MXFP8 use the
  same code with other format strings; per-tensor formats have no blocks, so "along" an axis changes nothing.

Residuals: the custom_vjp saves the high-precision x and W (not the dequantized operands) and re-quantizes W in the
backward. Operand quantization is round-to-nearest-even and therefore deterministic, so the backward sees the bit-same
quantized W as the forward; this keeps the residuals at the size of the unquantized layer.

Calibrated (static) amaxes: `input_amax` / `weight_amax`, when given, replace the current per-tensor amax wherever
they are > 0 (an amax of 0 means "not calibrated", nemojax.lowp.recipe). In quantized training the static input
amax also scales the wgrad quantization of x when there is no RHT; with the RHT the amax is always that of R x.
Gradients with respect to `key` and the amaxes are zero (None cotangents).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.formats import check_format
from nemojax.lowp.hadamard import rht
from nemojax.lowp.qarray import quantize
from nemojax.lowp.recipe import LinearQuant, TensorQuant

HIGHEST = jax.lax.Precision.HIGHEST
RHT_BLOCK = 16


# ------------------------------------------------------------------------------------------------ helpers


def _dot(a: jax.Array, b: jax.Array, eq: str) -> jax.Array:
    """einsum in float32 with float32 accumulation (full-precision passes, so GPUs do not drop to TF32)."""
    return jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32), preferred_element_type=jnp.float32,
                      precision=HIGHEST)


def _block(fmt: str) -> int:
    """Elements per scale block along the blocked axis (1 for per-tensor formats)."""
    return check_format(fmt).block or 1


def _current_amax(x: jax.Array) -> jax.Array:
    """max |x| over the finite values, in float32 (what `quantize` takes when no amax is given)."""
    xf = x.astype(jnp.float32)
    return jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))


def effective_amax(x: jax.Array, static: jax.Array | None, fmt: str) -> jax.Array | None:
    """The calibrated amax where it is > 0, else the current amax of x; None (current amax) if not given.

    MX formats have no per-tensor scale, so an amax is not used with them (None).
    """
    if static is None or check_format(fmt).scale_kind == "e8m0_block":
        return None
    static = jnp.asarray(static, jnp.float32)
    if static.ndim:
        raise ValueError(f"amax must be a scalar per-tensor amax, got shape {static.shape}; vmap over stacked "
                         "experts so that each sees its own amax")
    return jnp.where(static > 0, static, _current_amax(x))


def _dq(x: jax.Array, fmt: str, axis: int, amax: jax.Array | None = None, rounding: str = "rne",
        key: jax.Array | None = None, block_scale: jax.Array | None = None) -> jax.Array:
    """quantize(x, fmt, along `axis`).dequantize() as float32."""
    q = quantize(x.astype(jnp.float32), fmt, axis=axis, amax=amax, block_scale=block_scale, rounding=rounding,
                 key=key)
    return q.dequantize().astype(jnp.float32)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    pad = -a.shape[0] % multiple
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _token_multiple(spec: LinearQuant) -> int:
    """Rows (tokens) of the wgrad operands must be a multiple of this: the blocks along T, and 16 for the RHT."""
    sizes = [_block(spec.input.fmt), _block(spec.grad.fmt)]
    if spec.rht:
        sizes.append(RHT_BLOCK)
    return math.lcm(*sizes)


def _split(key: jax.Array | None, n: int) -> tuple[jax.Array | None, ...]:
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


def _check_ranks(x: jax.Array, w: jax.Array) -> tuple[int, int]:
    if w.ndim != 2:
        raise ValueError(f"w must be a [K, N] kernel, got shape {w.shape}; vmap over stacked experts")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: [..., K] with K={w.shape[0]} (from w {w.shape}) expected, got shape {x.shape}")
    return w.shape


# ------------------------------------------------------------------------------------------------ fake (QAT)


def fake_quant_operand(a: jax.Array, t: TensorQuant, *, axis: int, amax: jax.Array | None,
                       block_scale: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """One GEMM operand fake-quantized in the format, STE and rounding of `t`, blocked along `axis` (its
    contraction axis); same shape and dtype as `a`.

    amax: the resolved per-tensor amax (a scalar, or an array left-aligned with a's leading dims, one "tensor"
    each, e.g. [rows] for token rows of several experts), or None for the current max |a|; MX formats have no
    per-tensor scale and ignore it. key: used only when `t.rounding == "stochastic"`.
    """
    if check_format(t.fmt).scale_kind == "e8m0_block":
        amax = None
    return fake_quant(a, t.fmt, axis=axis, amax=amax, block_scale=block_scale, ste=t.ste, rounding=t.rounding,
                      key=key if t.rounding == "stochastic" else None)


def fake_matmul(x: jax.Array, w: jax.Array, spec: LinearQuant | None, *, key: jax.Array | None = None,
                input_amax: jax.Array | None = None, weight_amax: jax.Array | None = None,
                weight_block_scale: jax.Array | None = None) -> jax.Array:
    """QAT linear layer: y = fq(x) @ fq(W), x: [..., K], w: [K, N] -> y: [..., N] in x's dtype.

    fq = fake_quant along K (the contraction axis) with each operand's format, STE and rounding; a None operand
    spec keeps that operand in high precision. The backward is the ordinary backward of the dot through the STEs.
    key: needed only when an operand uses stochastic rounding (split into one key per operand).
    weight_block_scale: the frozen NVFP4 block scales of W (W's shape with K divided by 16), required exactly
    when `spec.weight.block_scales == "static"`.
    """
    K, N = _check_ranks(x, w)
    if spec is not None and spec.grad is not None:
        raise ValueError(f"spec.grad={spec.grad.fmt!r}: quantized gradients need quantized_matmul (or matmul)")
    wspec = None if spec is None else spec.weight
    ispec = None if spec is None else spec.input
    static_bs = wspec is not None and wspec.block_scales == "static"
    if weight_block_scale is not None and not static_bs:
        raise ValueError("weight_block_scale was given but spec.weight.block_scales is not 'static' "
                         f"(spec.weight={wspec!r})")
    if static_bs and weight_block_scale is None:
        raise ValueError("spec.weight.block_scales='static' needs weight_block_scale (the calibrated block scales)")
    for name, t in (("input", ispec), ("weight", wspec)):
        if t is not None and t.rounding == "stochastic" and key is None:
            raise ValueError(f"spec.{name}.rounding='stochastic' needs a PRNG key, got key=None")
    kx, kw = _split(key, 2)
    xq = x
    if ispec is not None:
        xq = fake_quant_operand(x, ispec, axis=-1, amax=effective_amax(x, input_amax, ispec.fmt), key=kx)
    wq = w
    if wspec is not None:
        wq = fake_quant_operand(w, wspec, axis=0, amax=effective_amax(w, weight_amax, wspec.fmt),
                                block_scale=weight_block_scale, key=kw)
    # y[..., n] = sum_k xq[..., k] wq[k, n]
    return _dot(xq, wq, "...k,kn->...n").astype(x.dtype)


# ------------------------------------------------------------------------------------------------ quantized training


def _fwd_operands(spec: LinearQuant, x2: jax.Array, w: jax.Array, input_amax, weight_amax):
    """(DQ(Q(x along K)) [T, K], DQ(Q(W along K)) [K, N]) in float32."""
    dqx = _dq(x2, spec.input.fmt, axis=-1, amax=effective_amax(x2, input_amax, spec.input.fmt))
    dqw = _dq(w, spec.weight.fmt, axis=0, amax=effective_amax(w, weight_amax, spec.weight.fmt))
    return dqx, dqw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmm(spec: LinearQuant, x2, w, key, input_amax, weight_amax):
    dqx, dqw = _fwd_operands(spec, x2, w, input_amax, weight_amax)
    return _dot(dqx, dqw, "tk,kn->tn").astype(x2.dtype)  # y[t, n] = sum_k x[t, k] w[k, n]


def _qmm_fwd(spec, x2, w, key, input_amax, weight_amax):
    return _qmm(spec, x2, w, key, input_amax, weight_amax), (x2, w, key, input_amax, weight_amax)


def _qmm_bwd(spec, res, dy):
    x2, w, key, input_amax, weight_amax = res
    g = spec.grad
    sr = g.rounding == "stochastic"
    k_dgrad, k_wgrad = _split(key, 2) if sr else (None, None)

    # dgrad: dx[t, k] = sum_n DQ(Q(dy along N))[t, n] DQ(QW)[k, n]. A 2D-quantized W is the forward's QW (tiles are
    # symmetric); 1D formats quantize W columnwise, i.e. along N, the contraction axis of this GEMM.
    w_amax = effective_amax(w, weight_amax, spec.weight.fmt)
    w_axis = 0 if check_format(spec.weight.fmt).two_d else 1
    dqw = _dq(w, spec.weight.fmt, axis=w_axis, amax=w_amax)
    dqdy_r = _dq(dy, g.fmt, axis=-1, rounding=g.rounding, key=k_dgrad)
    dx = _dot(dqdy_r, dqw, "tn,kn->tk").astype(x2.dtype)

    # wgrad: dW[k, n] = sum_t DQ(Q(R x along T))[t, k] DQ(Q(R dy along T))[t, n]; zero-padded tokens add nothing.
    mult = _token_multiple(spec)
    xc = _pad_rows(x2.astype(jnp.float32), mult)
    dyc = _pad_rows(dy.astype(jnp.float32), mult)
    x_amax = effective_amax(x2, input_amax, spec.input.fmt)
    if spec.rht:
        xc, dyc, x_amax = rht(xc, 0), rht(dyc, 0), None  # amaxes of the transformed operands
    dqx_c = _dq(xc, spec.input.fmt, axis=0, amax=x_amax)
    dqdy_c = _dq(dyc, g.fmt, axis=0, rounding=g.rounding, key=k_wgrad)
    dw = _dot(dqx_c, dqdy_c, "tk,tn->kn").astype(w.dtype)
    return dx, dw, None, None, None


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x: jax.Array, w: jax.Array, spec: LinearQuant, *, key: jax.Array | None = None,
                     input_amax: jax.Array | None = None, weight_amax: jax.Array | None = None) -> jax.Array:
    """Quantized-training linear layer (fprop, dgrad and wgrad on quantized operands; see the module docstring).

    x: [..., K] (leading dims are flattened to tokens T), w: [K, N], spec: a LinearQuant with weight, input and
    grad formats -> y: [..., N] in x's dtype (float32 accumulation). dx has x's dtype, dW w's dtype.
    key: PRNG key for stochastic rounding of the gradients (required when spec.grad.rounding == "stochastic").
    input_amax / weight_amax: calibrated scalar amaxes (used where > 0), else the current ones.
    Dims that are not a multiple of a block size are zero-padded inside the quantizers.
    """
    K, N = _check_ranks(x, w)
    if not isinstance(spec, LinearQuant) or spec.grad is None:
        raise ValueError(f"spec={spec!r}: quantized_matmul needs a LinearQuant with spec.grad set")
    for name in ("input", "weight"):
        t: TensorQuant = getattr(spec, name)
        if t.rounding != "rne":
            raise ValueError(f"spec.{name}.rounding={t.rounding!r}: forward operands of quantized training are "
                             "rounded to nearest even ('rne'); only spec.grad may be 'stochastic'")
    if spec.weight.block_scales != "dynamic":
        raise ValueError("spec.weight.block_scales='static' is for fake quantization (QAT); quantized training "
                         "computes the weight's block scales from its current values")
    if spec.grad.rounding == "stochastic" and key is None:
        raise ValueError("spec.grad.rounding='stochastic' needs a PRNG key, got key=None")
    x2 = x.reshape(-1, K)
    y = _qmm(spec, x2, w, key, input_amax, weight_amax)
    return y.reshape(*x.shape[:-1], N)


def matmul(x: jax.Array, w: jax.Array, spec: LinearQuant | None, *, key: jax.Array | None = None,
           input_amax: jax.Array | None = None, weight_amax: jax.Array | None = None,
           weight_block_scale: jax.Array | None = None) -> jax.Array:
    """A linear layer's GEMM under its quantization spec: x: [..., K], w: [K, N] -> y: [..., N] in x's dtype.

    `spec` is None: plain dot; `spec.grad` is None: `fake_matmul` (QAT); else `quantized_matmul` (quantized training,
    where weight_block_scale must be None).
    """
    if spec is None:
        _check_ranks(x, w)
        return _dot(x, w, "...k,kn->...n").astype(x.dtype)
    if spec.grad is None:
        return fake_matmul(x, w, spec, key=key, input_amax=input_amax, weight_amax=weight_amax,
                           weight_block_scale=weight_block_scale)
    if weight_block_scale is not None:
        raise ValueError("weight_block_scale is only used by fake quantization (spec.grad is None); quantized "
                         f"training (spec.grad={spec.grad.fmt!r}) computes block scales from the current weight")
    return quantized_matmul(x, w, spec, key=key, input_amax=input_amax, weight_amax=weight_amax)
