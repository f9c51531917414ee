"""Dense projections with logical sharding names, low-precision formats from `config.runtime.quant`, and the dtype
helpers every block shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.lowp import matmul as lowp_matmul
from nemojax.lowp.qarray import quantize
from nemojax.lowp.recipe import CALIBRATION, LinearQuant
from nemojax.nn import pallas_quant_linear

f32 = jnp.float32
BLOCK = 16  # NVFP4 block length (static block scales are only NVFP4)


def dtypes(config: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, param dtype) of a config's runtime."""
    return jnp.dtype(config.runtime.dtype), jnp.dtype(config.runtime.param_dtype)


def logical_param(module: nn.Module, name: str, init: Callable, axes: Sequence[str | None],
                  shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """`module.param` with logical axis names (one per dimension of `shape`) attached for the sharding rules."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


# ---------------------------------------------------------------------------------------------- quantization


def quant_spec(module: nn.Module, weight: str = "") -> LinearQuant | None:
    """The recipe's formats for the linear layer `module` (or its stacked weight `weight`), None if unquantized."""
    cfg = module.config
    if cfg.runtime.quant is None:
        return None
    path = "/".join((*module.path, weight)) if weight else "/".join(module.path)
    return cfg.runtime.quant.linear(path, cfg.pattern)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def quant_state(module: nn.Module, weight: str, spec: LinearQuant, shape: tuple[int, ...], contract: int,
                axes: Sequence[str | None]) -> dict[str, jax.Array | None]:
    """The frozen quantization state of weight `weight` (`shape`, contraction axis `contract`, logical `axes`)
    that `spec` asks for, declared as params beside it (see nemojax.lowp.recipe): amaxes are scalars, or [E]
    for stacked experts (`shape` of rank 3, per-expert amaxes)."""
    lead, lead_axes = shape[:-2], tuple(axes[:-2])
    zeros = nn.initializers.zeros_init()
    state: dict[str, jax.Array | None] = {"input_amax": None, "weight_amax": None, "weight_block_scale": None}
    if spec.input is not None and spec.input.static:
        state["input_amax"] = logical_param(module, f"{weight}_input_amax", zeros, lead_axes, lead, f32)
    if spec.weight is not None and spec.weight.static:
        state["weight_amax"] = logical_param(module, f"{weight}_amax", zeros, lead_axes, lead, f32)
    if spec.weight is not None and spec.weight.block_scales == "static":
        scale_shape = list(shape)
        scale_axes = list(axes)
        scale_shape[contract], scale_axes[contract] = _blocks(shape[contract]), None
        if spec.weight.fmt == "nvfp4_2d":
            other = len(shape) - 1 if contract == len(shape) - 2 else len(shape) - 2
            scale_shape[other], scale_axes[other] = _blocks(shape[other]), None
        state["weight_block_scale"] = logical_param(module, f"{weight}_block_scale", zeros, scale_axes,
                                                    tuple(scale_shape), f32)
    return state


def calibrated(static: jax.Array | None, current: Callable[[], jax.Array]) -> jax.Array | None:
    """A calibrated amax where it is set (> 0), else the current one; None when the spec has no static amax."""
    if static is None:
        return None
    return jnp.where(static > 0, static, current())


def calibrating(module: nn.Module) -> bool:
    """Whether this forward collects calibration statistics (then quantized layers run in high precision)."""
    return module.is_mutable_collection(CALIBRATION)


def record_amax(module: nn.Module, name: str, amax: jax.Array) -> None:
    """Sows `amax` (a scalar, or [E] per expert) as the calibration statistic `name`, keeping the running max."""
    module.sow(CALIBRATION, name, amax.astype(f32), init_fn=lambda: jnp.zeros(amax.shape, f32),
               reduce_fn=jnp.maximum)


def quant_key(module: nn.Module, spec: LinearQuant) -> jax.Array | None:
    """The rng of stochastic rounding (the "quant" rng stream; a fixed key when the caller passes none, which
    only matters for gradients, i.e. in training, where the train step always passes one)."""
    if spec.grad is None or spec.grad.rounding != "stochastic":
        return None
    return module.make_rng("quant") if module.has_rng("quant") else jax.random.key(0)


def weight_quant_state(kernel: jax.Array, spec: LinearQuant, state: dict[str, jax.Array | None]
                       ) -> tuple[jax.Array | None, jax.Array | None]:
    """(weight amax, NVFP4 block scales) that quantize `kernel` [in, out]: the calibrated ones where set, else
    those of the current weight (an amax of 0, or block scales all 0, mean "not calibrated"); None where the
    spec has no static state."""
    weight_amax = calibrated(state["weight_amax"], lambda: jnp.max(jnp.abs(kernel)).astype(f32))
    block_scale = state["weight_block_scale"]
    if block_scale is not None:
        current = quantize(kernel.astype(f32), spec.weight.fmt, axis=0, amax=weight_amax).scale.astype(f32)
        block_scale = jnp.where(jnp.any(block_scale > 0), block_scale, current)
    return weight_amax, block_scale


def quantized_dot(x: jax.Array, kernel: jax.Array, spec: LinearQuant, state: dict[str, jax.Array | None],
                  key: jax.Array | None, matmul_impl: str = "xla") -> jax.Array:
    """x: [..., in] @ kernel: [in, out] with the operands in the formats of `spec` -> [..., out] (x's dtype).

    QAT / QAD (spec.grad None): fake-quantized operands, straight-through backward; when `matmul_impl`
    (config.runtime.matmul_impl) resolves to "pallas" and the formats have a kernel, the forward runs the FP8 / NVFP4
    Pallas matmul with the same amaxes and block scales (nemojax.nn.pallas_quant_linear). Quantized training
    (spec.grad set): the forward and both backward GEMMs quantized (nemojax.lowp.matmul).
    """
    input_amax = calibrated(state["input_amax"], lambda: jnp.max(jnp.abs(x)).astype(f32))
    weight_amax, block_scale = weight_quant_state(kernel, spec, state)
    op = pallas_quant_linear.kernel_op(spec, kernel.shape[0], x.dtype, matmul_impl)
    if op is not None:
        return pallas_quant_linear.kernel_matmul(op, x, kernel, spec, input_amax=input_amax, weight_amax=weight_amax,
                                           weight_block_scale=block_scale)
    return lowp_matmul.matmul(x, kernel, spec, key=key, input_amax=input_amax, weight_amax=weight_amax,
                           weight_block_scale=block_scale)


class Linear(nn.Module):
    """x: [..., in] -> [..., out] with a `kernel` [in, out] (and `bias` [out]) named like its checkpoint tensor.

    `names` are the kernel's logical axes. The layer runs in the config's compute dtype, or in the formats
    `config.runtime.quant` gives its path (fake-quantized operands for QAT/QAD/PTQ, on the FP8 / NVFP4 Pallas kernels
    when `config.runtime.matmul_impl` selects them; quantized GEMMs for training).
    """

    config: ModelConfig
    features: int
    names: tuple[str | None, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        shape = (x.shape[-1], self.features)
        kernel = logical_param(self, "kernel", nn.initializers.normal(cfg.initializer_range), self.names, shape,
                               param_dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        spec = quant_spec(self)
        state = None if spec is None else quant_state(self, "kernel", spec, shape, 0, self.names)
        if spec is None or calibrating(self):
            if spec is not None and spec.input is not None:
                record_amax(self, "kernel_input_amax", jnp.max(jnp.abs(x)))
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        else:
            y = quantized_dot(x, kernel, spec, state, quant_key(self, spec), cfg.runtime.matmul_impl)
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros_init(), (self.names[-1],), (self.features,),
                                 param_dtype)
            y = y + bias.astype(dtype)
        return y


def dense(config: ModelConfig, features: int, names: Sequence[str | None], *, name: str | None,
          use_bias: bool = False) -> Linear:
    """A `[in, out]` linear layer named like its checkpoint tensor, with logical axis `names` on its kernel."""
    return Linear(config, features, tuple(names), use_bias, name=name)
