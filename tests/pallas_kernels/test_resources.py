"""pallas_kernels/resources.py: the device-limit table and the CPU-host measurement of a Pallas Triton kernel's
shared memory (Triton IR from the CUDA lowering, compiled by the triton package for a target GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import resources

S = jax.ShapeDtypeStruct



def test_table_sm90_matches_the_h200_report():
    # the H200's XLA error: "Shared memory size limit exceeded: requested 301056, available: 232448"
    limits = resources.device_limits(compute_capability=(9, 0))
    assert limits.max_shared_bytes_per_block == 232448
    assert limits.shared_bytes_per_sm == 228 * 1024
    assert resources.device_limits(compute_capability="8.0").max_shared_bytes_per_block == 163 * 1024
    assert resources.device_limits(compute_capability=89).max_shared_bytes_per_block == 99 * 1024
    assert resources.device_limits(compute_capability=(12, 0)).max_shared_bytes_per_block == 99 * 1024


def test_table_rejects_unknown_capability():
    with pytest.raises(ValueError, match="compute_capability"):
        resources.device_limits(compute_capability=(6, 1))
    with pytest.raises(ValueError, match="compute_capability"):
        resources.device_limits(compute_capability="hopper")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the off-GPU default")
def test_default_limits_off_gpu_are_sm90():
    assert resources.device_limits() == resources.device_limits(compute_capability=(9, 0))


def _scale_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0


def _dot_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)


def _two_kernels(x, y):
    a = pl.pallas_call(_scale_kernel, out_shape=S(x.shape, x.dtype), grid=(2,),
                       in_specs=[pl.BlockSpec((32, 64), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((32, 64), lambda i: (i, 0)),
                       compiler_params=pltriton.CompilerParams(num_warps=2, num_stages=1))(x)
    b = pl.pallas_call(_dot_kernel, out_shape=S((x.shape[0], y.shape[1]), jnp.float32),
                       compiler_params=pltriton.CompilerParams(num_warps=4))(x, y)
    return a, b


def test_kernels_are_extracted_with_their_launch_parameters():
    """No triton needed: the IR and launch parameters come from the CUDA lowering."""
    k1, k2 = resources.triton_kernels(_two_kernels, S((64, 64), jnp.bfloat16), S((64, 64), jnp.bfloat16))
    assert (k1.name, k1.num_warps, k1.num_stages, k1.grid) == ("_scale_kernel", 2, 1, (2, 1, 1))
    assert (k2.name, k2.num_warps, k2.num_stages, k2.grid) == ("_dot_kernel", 4, 3, (1, 1, 1))
    assert "tt.func public @_dot_kernel" in k2.ir and "tt.dot" in k2.ir


@pytest.fixture(scope="module")
def measured():
    if not resources.triton_available():
        pytest.skip("the triton package (the [test] extras) compiles the kernels")
    return resources.triton_kernel_resources(_two_kernels, S((64, 64), jnp.bfloat16), S((64, 64), jnp.bfloat16))


def test_elementwise_kernel_needs_no_shared_memory(measured):
    scale = measured[0]
    assert scale.name == "_scale_kernel" and scale.shared_bytes == 0 and scale.arch == "sm_90a"
    assert scale.registers is not None and 0 < scale.registers <= 255 and scale.spill_store_bytes == 0


def test_dot_stages_both_operands_in_shared_memory(measured):
    """A single [64, 64] x [64, 64] bf16 dot (no K loop, nothing to pipeline): the tensor-core MMA reads both
    operands from shared memory, 2 * 64 * 64 * 2 bytes."""
    dot = measured[1]
    assert dot.shared_bytes == 2 * 64 * 64 * 2
    assert dot.fits(resources.device_limits(compute_capability=(9, 0)))


def test_shared_memory_limit_is_enforced_by_fits():
    if not resources.triton_available():
        pytest.skip("the triton package (the [test] extras) compiles the kernels")
    n = 128  # 2 * 128 * 128 * 2 = 64 KiB of operands: fits sm_90's 227 KiB, not a 48 KiB budget
    f = lambda x, y: pl.pallas_call(_dot_kernel, out_shape=S((n, n), jnp.float32),  # noqa: E731
                                    compiler_params=pltriton.CompilerParams(num_warps=4))(x, y)
    [k] = resources.triton_kernel_resources(f, S((n, n), jnp.bfloat16), S((n, n), jnp.bfloat16),
                                            compute_capability=(8, 0), ptxas=False)
    assert (k.shared_bytes, k.arch, k.registers) == (2 * n * n * 2, "sm_80", None)
    assert k.fits(resources.device_limits(compute_capability=(8, 0)))
    tight = resources.DeviceLimits((8, 0), max_shared_bytes_per_block=48 * 1024, shared_bytes_per_sm=48 * 1024)
    assert not k.fits(tight)
