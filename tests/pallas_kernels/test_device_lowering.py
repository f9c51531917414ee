"""Every kernel lowers for the GPU (Pallas -> Triton IR) at the published models' shapes, checked from this CPU host
through `jax.export` with platforms=["cuda"]. Lowering is where Pallas enforces Triton's rules (power-of-two
tensor sizes, supported primitives, block shapes); what only the device compiler sees (registers, shared memory)
and the speed are left to experiments/bench_kernels.py on a GPU. The TPU layouts of the SSD scan and of the
attention wrapper are lowered to Mosaic the same way (platforms=["tpu"])."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

import nemojax
from pallas_kernels.attention import flash_attention
from pallas_kernels.quant_matmul import fp8_matmul, nvfp4_block_scaled_matmul, nvfp4_matmul
from pallas_kernels.ssd_scan import ssd_scan
from pallas_kernels.ssd_update import ssd_update

S = jax.ShapeDtypeStruct
# The Triton call is an XLA custom call without export-compatibility guarantees: fine, nothing is serialised.
UNCHECKED = [export.DisabledSafetyCheck.custom_call(target) for target in
             ("__gpu$xla.gpu.triton", "__op$block_scaled_dot")]
MAMBA_PRESETS = ["nemotron-h-8b", "nemotron-nano-9b-v2", "nemotron-3-nano-4b", "nemotron-h-47b"]



def lowered_module(fn, *args, platform: str = "cuda") -> str:
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=UNCHECKED)(*args).mlir_module()


@pytest.mark.parametrize("preset", MAMBA_PRESETS)
def test_mamba_kernels_lower(preset):
    m = nemojax.presets.get(preset).mamba
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
    b, L = 1, 1000  # L not a multiple of the chunk
    scan = functools.partial(ssd_scan, chunk_size=m.chunk_size, backend="gpu")
    module = lowered_module(scan, S((b, L, H, P), jnp.float32), S((b, L, H), jnp.float32), S((H,), jnp.float32),
                            S((b, L, G, N), jnp.bfloat16), S((b, L, G, N), jnp.bfloat16))
    assert "xla.gpu.triton" in module and "ssd_scan" in module
    scan = functools.partial(ssd_scan, chunk_size=m.chunk_size, backend="tpu")
    module = lowered_module(scan, S((b, L, H, P), jnp.float32), S((b, L, H), jnp.float32), S((H,), jnp.float32),
                            S((b, L, G, N), jnp.bfloat16), S((b, L, G, N), jnp.bfloat16), platform="tpu")
    assert "tpu_custom_call" in module
    b = 3
    module = lowered_module(functools.partial(ssd_update, backend="gpu"), S((b, H, P, N), jnp.float32),
                            S((b, H, P), jnp.bfloat16), S((b, H), jnp.float32), S((H,), jnp.float32),
                            S((b, G, N), jnp.bfloat16), S((b, G, N), jnp.bfloat16), S((H,), jnp.float32))
    assert "xla.gpu.triton" in module and "ssd_update" in module


@pytest.mark.parametrize("backend,platform,marker", [("gpu", "cuda", "xla.gpu.triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_attention_lowers(backend, platform, marker):
    a = nemojax.presets.get("nemotron-h-8b").attention
    b, L = 1, 1000
    q, kv = S((b, L, a.num_heads, a.head_dim), jnp.bfloat16), S((b, L, a.num_kv_heads, a.head_dim), jnp.bfloat16)
    fn = functools.partial(flash_attention, scale=a.head_dim ** -0.5, backend=backend, interpret=False)
    assert marker in lowered_module(fn, q, kv, kv, platform=platform)


@pytest.mark.parametrize("backend,platform,marker", [("gpu", "cuda", "xla.gpu.triton"),
                                                     ("tpu", "tpu", "tpu_custom_call")])
def test_quantized_matmuls_lower(backend, platform, marker):
    """FP8 x FP8 and W4A16 NVFP4 (bf16 and f32 activations) at an 8B projection shape, M not a multiple of the
    block (K a multiple of 32, as NVFP4 needs)."""
    M, K, N = 1000, 4096, 8192
    e4m3, scalar = jnp.float8_e4m3fn, S((), jnp.float32)
    fp8 = functools.partial(fp8_matmul, backend=backend)
    assert marker in lowered_module(fp8, S((M, K), e4m3), S((K, N), e4m3), scalar, scalar, platform=platform)
    nvfp4 = functools.partial(nvfp4_matmul, backend=backend)
    for x_dtype in (jnp.bfloat16, jnp.float32):
        module = lowered_module(nvfp4, S((M, K), x_dtype), S((N, K // 2), jnp.uint8), S((N, K // 16), e4m3), scalar,
                                platform=platform)
        assert marker in module


def test_native_fp4_lowers_to_block_scaled_dot():
    """W4A4 NVFP4 on GPU is XLA's block_scaled_dot (cuDNN's native FP4 GEMM on Blackwell)."""
    M, K, N = 256, 4096, 1024
    fp4, e4m3, scalar = jnp.float4_e2m1fn, jnp.float8_e4m3fn, S((), jnp.float32)
    fn = functools.partial(nvfp4_block_scaled_matmul, backend="gpu")
    module = lowered_module(fn, S((M, K), fp4), S((M, K // 16), e4m3), scalar, S((N, K), fp4),
                            S((N, K // 16), e4m3), scalar)
    assert "block_scaled_dot" in module


def _dot_line(module: str) -> str:
    (line,) = [ln for ln in module.splitlines() if "stablehlo.dot_general" in ln]
    return line


@pytest.mark.parametrize("b_layout", ["kn", "nk"])
def test_fp8_xla_impls_lower_to_the_cublaslt_fp8_patterns(b_layout):
    """The XLA forms of fp8_matmul, lowered for CUDA, are the HLO XLA's gemm rewriter turns into a cuBLASLt FP8
    GEMM: "xla_dot" feeds the E4M3 operands themselves into the dot (no upcast before it) and scales its f32
    result; "xla" / "xla_out" convert each E4M3 operand to f32 and multiply it by its broadcast scalar scale right
    before the dot. b_layout "nk" contracts b's minor dim (no transpose anywhere: cuBLASLt's TN layout)."""
    M, K, N = 1000, 4096, 8192
    e4m3, scalar = jnp.float8_e4m3fn, S((), jnp.float32)
    b_shape = (K, N) if b_layout == "kn" else (N, K)
    contract = "contracting_dims = [1] x [0]" if b_layout == "kn" else "contracting_dims = [1] x [1]"
    modules = {impl: lowered_module(functools.partial(fp8_matmul, impl=impl, b_layout=b_layout, backend="gpu"),
                                    S((M, K), e4m3), S(b_shape, e4m3), scalar, scalar)
               for impl in ("xla", "xla_out", "xla_dot")}
    for impl, module in modules.items():
        dot = _dot_line(module)
        assert contract in dot and "transpose" not in module and "xla.gpu.triton" not in module
        if impl == "xla_dot":
            assert f"(tensor<{M}x{K}xf8E4M3FN>, tensor<{b_shape[0]}x{b_shape[1]}xf8E4M3FN>) -> tensor<{M}x{N}xf32>" \
                in dot
            assert "stablehlo.convert %arg0" not in module and "stablehlo.convert %arg1" not in module
        else:
            out = "f32" if impl == "xla" else "bf16"
            assert f"-> tensor<{M}x{N}x{out}>" in dot
            for arg, shape in (("%arg0", (M, K)), ("%arg1", b_shape)):
                assert f"stablehlo.convert {arg} : (tensor<{shape[0]}x{shape[1]}xf8E4M3FN>) -> " \
                       f"tensor<{shape[0]}x{shape[1]}xf32>" in module
            assert module.count("stablehlo.multiply") == 2  # one scale per operand, before the dot


def test_pallas_launch_options_reach_triton():
    """num_warps / num_stages given to the kernels reach the Triton custom call (the bench's sweep hooks)."""
    e4m3, scalar = jnp.float8_e4m3fn, S((), jnp.float32)
    fp8 = functools.partial(fp8_matmul, b_layout="nk", num_warps=8, num_stages=4, backend="gpu")
    module = lowered_module(fp8, S((256, 512), e4m3), S((256, 512), e4m3), scalar, scalar)
    assert "num_warps = 8" in module and "num_stages = 4" in module
    nvfp4 = functools.partial(nvfp4_matmul, backend="gpu")  # decode defaults: 4 warps, 3 stages
    module = lowered_module(nvfp4, S((16, 8192), jnp.bfloat16), S((8192, 4096), jnp.uint8),
                            S((8192, 512), e4m3), scalar)
    assert "num_warps = 4" in module and "num_stages = 3" in module
    m = nemojax.presets.get("nemotron-nano-9b-v2").mamba
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
    upd = functools.partial(ssd_update, block_p=64, num_warps=2, backend="gpu")
    module = lowered_module(upd, S((2, H, P, N), jnp.float32), S((2, H, P), jnp.bfloat16), S((2, H), jnp.float32),
                            S((H,), jnp.float32), S((2, G, N), jnp.bfloat16), S((2, G, N), jnp.bfloat16),
                            S((H,), jnp.float32))
    assert "num_warps = 2" in module


def _nvfp4_args(M: int, K: int = 8192, N: int = 8192) -> tuple:
    return (S((M, K), jnp.bfloat16), S((N, K // 2), jnp.uint8), S((N, K // 16), jnp.float8_e4m3fn),
            S((), jnp.float32))


@pytest.mark.parametrize("name", ["nvfp4 decode", "nvfp4 prefill", "fp8", "ssd_update"])
def test_default_configs_fit_hopper(name):
    """The default blocks and launch options, compiled for sm_90a by the triton package from the kernels' Triton IR
    (pallas_kernels.resources), fit an H200's shared memory (227 KB per block; nvfp4 defaults under the 150 KB
    budget) and spill no registers, at the 8B model's shapes. The nvfp4 config that failed on the H200
    (128 x 128 x 256, 3 stages) is over the limit here too."""
    from pallas_kernels import resources

    if not resources.triton_available():
        pytest.skip("the triton package (the [test] extras) compiles the kernels")

    limit = resources.device_limits(compute_capability=(9, 0)).max_shared_bytes_per_block
    e4m3, scalar = jnp.float8_e4m3fn, S((), jnp.float32)
    m = nemojax.presets.get("nemotron-h-8b").mamba
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
    fn, args, cap = {
        "nvfp4 decode": (functools.partial(nvfp4_matmul, backend="gpu"), _nvfp4_args(16), 150 * 1024),
        "nvfp4 prefill": (functools.partial(nvfp4_matmul, backend="gpu"), _nvfp4_args(8192), 150 * 1024),
        "fp8": (functools.partial(fp8_matmul, backend="gpu"), (S((8192, 8192), e4m3), S((8192, 8192), e4m3),
                                                               scalar, scalar), limit),
        "ssd_update": (functools.partial(ssd_update, backend="gpu"),
                       (S((64, H, P, N), jnp.float32), S((64, H, P), jnp.bfloat16), S((64, H), jnp.float32),
                        S((H,), jnp.float32), S((64, G, N), jnp.bfloat16), S((64, G, N), jnp.bfloat16),
                        S((H,), jnp.float32)), limit),
    }[name]
    [k] = resources.triton_kernel_resources(fn, *args, compute_capability=(9, 0))
    assert k.shared_bytes <= cap, k
    assert not k.spill_store_bytes, k
    if name == "nvfp4 prefill":
        old = functools.partial(nvfp4_matmul, block_m=128, block_n=128, block_k=256, num_warps=4, backend="gpu")
        [k_old] = resources.triton_kernel_resources(old, *args, compute_capability=(9, 0), ptxas=False)
        assert k_old.shared_bytes > limit, k_old
