"""The fake-quantized linear layer on the low-precision Pallas matmul kernels (pallas_kernels.quant_matmul).

`Linear` calls `kernel_op` to ask whether a layer can run a kernel, and `kernel_matmul` to run it; everything else
keeps the fake path (`nemojax.lowp.matmul.fake_matmul`). Covered, when `spec.grad is None` (PTQ / QAT / QAD),
round-to-nearest operands, a float32 or bfloat16 compute dtype and `dispatch.resolve(op, config.runtime.matmul_impl)`
== "pallas":

- "fp8_matmul": weight and input both per-tensor "fp8_e4m3". x and W are quantized with the amaxes the fake path
  uses (the calibrated amax where > 0, else the current one) and the kernel multiplies the E4M3 codes, applying
  the two decode scales to the f32 accumulator.
- "nvfp4_matmul": weight "nvfp4" (1-D blocks along the contraction dim, dynamic or static block scales) and K a
  multiple of 32; the input unquantized (W4A16) or fake-quantized first in its own format (so W4A4, W4A8 run the
  W4A16 kernel on the dequantized input). W [K, N] is quantized along K and handed over in the kernel's
  [N, K/2] packed layout. ("nvfp4_2d" weights, MX or FP8 weights with other inputs, K % 32 != 0: fake path.)
  Where the hardware has block-scaled FP4 MMAs (`quant_matmul.has_native_fp4`: Blackwell) and the input is NVFP4
  too (W4A4), both operands are quantized and the product runs on them natively
  (`nvfp4_block_scaled_matmul`) instead of dequantizing the input first.

The kernel forward equals the fake forward up to f32 summation order (and, in bfloat16, up to where the scales are
applied before the rounding to bf16). Its backward is the fake path's: a `jax.custom_vjp` whose bwd is `jax.vjp`
of `fake_matmul` at the same operands (the straight-through / clipped STEs, high-precision dot backward), so QAT and
QAD can train through the kernel forward. The residuals are the unquantized x and W (the vjp re-quantizes them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.matmul import effective_amax, fake_matmul
from nemojax.lowp.qarray import pack_fp4, quantize
from nemojax.lowp.recipe import LinearQuant
from pallas_kernels import dispatch, quant_matmul
from pallas_kernels.quant_matmul import fp8_matmul, nvfp4_block_scaled_matmul, nvfp4_matmul

f32 = jnp.float32
COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def kernel_op(spec: LinearQuant, K: int, dtype: jnp.dtype, impl: str) -> str | None:
    """"fp8_matmul" or "nvfp4_matmul" when the layer (contraction dim K, compute `dtype`) runs that kernel under
    the setting `impl` ("xla" | "pallas" | "auto"), else None (the fake path)."""
    w, x = spec.weight, spec.input
    if spec.grad is not None or w is None or jnp.dtype(dtype) not in COMPUTE_DTYPES:
        return None
    if w.rounding != "rne" or (x is not None and x.rounding != "rne"):  # stochastic rounding: fake path's key rules
        return None
    if w.fmt == "fp8_e4m3" and x is not None and x.fmt == "fp8_e4m3":
        op = "fp8_matmul"
    elif w.fmt == "nvfp4" and K % 32 == 0:
        op = "nvfp4_matmul"
    else:
        return None
    return op if dispatch.resolve(op, impl) == "pallas" else None


def _fake(spec, x, w, input_amax, weight_amax, block_scale):
    return fake_matmul(x, w, spec, input_amax=input_amax, weight_amax=weight_amax, weight_block_scale=block_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_matmul(op, spec, x, w, input_amax, weight_amax, block_scale):
    K, N = w.shape
    x2 = x.reshape(-1, K)  # leading dims -> M
    interpret = dispatch.interpret()
    w_amax = effective_amax(w, weight_amax, spec.weight.fmt)
    if op == "fp8_matmul":
        xq = quantize(x2.astype(f32), "fp8_e4m3", axis=-1, amax=effective_amax(x, input_amax, "fp8_e4m3"))
        wq = quantize(w.astype(f32), "fp8_e4m3", axis=0, amax=w_amax)
        y = fp8_matmul(xq.data, wq.data, xq.scale, wq.scale, out_dtype=x.dtype, interpret=interpret)
    elif spec.input is not None and spec.input.fmt == "nvfp4" and quant_matmul.has_native_fp4():
        xq = quantize(x2.astype(f32), "nvfp4", axis=-1, amax=effective_amax(x, input_amax, "nvfp4"))
        wq = quantize(w.astype(f32), "nvfp4", axis=0, amax=w_amax, block_scale=block_scale)  # codes [K, N]
        y = nvfp4_block_scaled_matmul(xq.data, xq.scale, xq.global_scale, wq.data.T, wq.scale.T, wq.global_scale,
                                      out_dtype=x.dtype)
    else:
        if spec.input is not None:  # forward value only; the STE is the backward's (fake path's) business
            t = spec.input
            x2 = fake_quant(x2, t.fmt, axis=-1, amax=effective_amax(x, input_amax, t.fmt), ste=t.ste)
        wq = quantize(w.astype(f32), "nvfp4", axis=0, amax=w_amax, block_scale=block_scale)  # codes [K, N]
        # the kernel takes W as [N, K]: packed codes [N, K/2], block scales [N, K/16], S_dec a scalar
        y = nvfp4_matmul(x2, pack_fp4(wq.data.T), wq.scale.T, wq.global_scale, out_dtype=x.dtype,
                         interpret=interpret)
    return y.reshape(*x.shape[:-1], N)


def _kernel_matmul_fwd(op, spec, x, w, input_amax, weight_amax, block_scale):
    y = _kernel_matmul(op, spec, x, w, input_amax, weight_amax, block_scale)
    return y, (x, w, input_amax, weight_amax, block_scale)


def _kernel_matmul_bwd(op, spec, res, g):
    _, vjp = jax.vjp(functools.partial(_fake, spec), *res)
    return vjp(g)  # zero cotangents for the (stop-gradient) amaxes and block scales


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def kernel_matmul(op: str, x: jax.Array, w: jax.Array, spec: LinearQuant, *, input_amax: jax.Array | None = None,
                  weight_amax: jax.Array | None = None, weight_block_scale: jax.Array | None = None) -> jax.Array:
    """x: [..., K] @ w: [K, N] -> [..., N] in x's dtype on the kernel `op` (from `kernel_op`), forward equal to
    `fake_matmul(x, w, spec, ...)` and its backward that of fake_matmul.

    input_amax / weight_amax: calibrated scalar amaxes (used where > 0, else the current ones) or None;
    weight_block_scale: static NVFP4 block scales [K/16, N] (exactly when spec.weight.block_scales == "static").
    """
    if op not in ("fp8_matmul", "nvfp4_matmul"):
        raise ValueError(f"op={op!r} is invalid: must be 'fp8_matmul' or 'nvfp4_matmul' (see kernel_op)")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x {x.shape} and w {w.shape}: allowed x [..., K] and w [K, N]")
    if (weight_block_scale is not None) != (spec.weight.block_scales == "static"):
        raise ValueError(f"weight_block_scale given: {weight_block_scale is not None}; allowed exactly when "
                         f"spec.weight.block_scales == 'static' (it is {spec.weight.block_scales!r})")
    return _kernel_matmul(op, spec, x, w, input_amax, weight_amax, weight_block_scale)
