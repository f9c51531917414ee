"""What a Pallas (Triton) kernel asks of the GPU, measured from a CPU host, and what the GPU can give.

    limits = device_limits()                                  # the first GPU's, or the sm_90 table row off-GPU
    [k] = triton_kernel_resources(fn, *args, compute_capability=(9, 0))   # args: arrays or ShapeDtypeStructs
    assert k.shared_bytes <= limits.max_shared_bytes_per_block, k

`triton_kernel_resources` lowers `jax.jit(fn)` for CUDA (no GPU needed), takes the Triton IR of every
`__gpu$xla.gpu.triton` custom call it contains (the kernel's name, its IR as MLIR bytecode, and the num_warps /
num_stages it was lowered with: jax/_src/pallas/triton/pallas_call_registration.py), prints that IR with jaxlib's
copy of the Triton dialect and compiles the text with the `triton` pip package for the requested target. Triton's
allocation analysis gives the shared memory (compiled metadata "shared", bytes) that XLA compares with the
device's opt-in limit ("Shared memory size limit exceeded: requested ..., available: ..."); `ptxas -v` (shipped in
the triton wheel) gives registers and spills. XLA compiles the same IR with its own pinned Triton, so a figure
can differ from the device's by what changed between the two Triton versions.

Only JAX is needed at import; `triton` is imported when a kernel is compiled.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import importlib.util
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["DeviceLimits", "KernelResources", "device_limits", "triton_kernel_resources", "triton_kernels"]

_TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """Per-block and per-SM limits of an NVIDIA GPU, bytes and counts.

    max_shared_bytes_per_block: the opt-in dynamic shared memory one block may use
    (cudaDevAttrMaxSharedMemoryPerBlockOptin; what XLA reports as "available"); shared_bytes_per_sm: the SM's
    shared memory (1 KB of it per block is reserved for the system); registers_per_sm / max_registers_per_thread:
    the 32-bit register file and the most one thread may address; sm_count: multiprocessors (None from the
    table)."""

    compute_capability: tuple[int, int]
    max_shared_bytes_per_block: int
    shared_bytes_per_sm: int
    registers_per_sm: int = 64 * 1024
    max_registers_per_thread: int = 255
    sm_count: int | None = None


# NVIDIA CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (Table "Technical
# Specifications per Compute Capability": maximum amount of shared memory per SM / per thread block, number of
# 32-bit registers per SM, maximum number of 32-bit registers per thread), and the per-architecture sections
# ("Compute Capability 8.x / 9.0 / 10.0 / 12.0", Shared Memory: "the maximum shared memory per thread block is
# 227 KB" for 9.0 and 10.0, 163 KB for 8.0/8.7, 99 KB for 8.6/8.9/12.x). The H200's XLA error reports 232448 =
# 227 * 1024 for sm_90. Values are (per block opt-in, per SM) in KiB.
_SHARED_KIB: dict[tuple[int, int], tuple[int, int]] = {
    (7, 0): (96, 96),      # V100
    (7, 5): (64, 64),      # T4, RTX 20xx
    (8, 0): (163, 164),    # A100
    (8, 6): (99, 100),     # A10, RTX 30xx
    (8, 7): (163, 164),    # Jetson Orin
    (8, 9): (99, 100),     # L4, L40, RTX 40xx
    (9, 0): (227, 228),    # H100, H200
    (10, 0): (227, 228),   # B200, GB200
    (10, 3): (227, 228),   # B300, GB300
    (12, 0): (99, 128),    # RTX PRO 6000 Blackwell, RTX 50xx
    (12, 1): (99, 128),    # GB10 (DGX Spark)
}


def _limits_from_table(cc: tuple[int, int], sm_count: int | None = None) -> DeviceLimits:
    if cc not in _SHARED_KIB:
        raise ValueError(f"compute_capability={cc!r} is not in the table; allowed: one of {sorted(_SHARED_KIB)}")
    block_kib, sm_kib = _SHARED_KIB[cc]
    return DeviceLimits(cc, block_kib * 1024, sm_kib * 1024, sm_count=sm_count)


def _parse_cc(cc: Any) -> tuple[int, int]:
    """(major, minor) from (9, 0), "9.0", "90" or 90."""
    if isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(v, int) for v in cc):
        return cc
    text = str(cc)
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return int(major), int(minor)
    if re.fullmatch(r"\d{2,3}", text):
        return int(text[:-1]), int(text[-1])
    raise ValueError(f"compute_capability={cc!r} is invalid; allowed: (major, minor), 'major.minor' or e.g. 90")


def device_limits(device: jax.Device | None = None, *, compute_capability: Any = None) -> DeviceLimits:
    """The limits of `device` (default: the first GPU). JAX exposes a CUDA device's `compute_capability`
    ("9.0") and `core_count` (SMs) but not its shared memory, so the memory figures come from the table above by
    compute capability. Without a GPU (or with `compute_capability` given), the table row of `compute_capability`
    (default sm_90: H100/H200)."""
    if compute_capability is not None:
        return _limits_from_table(_parse_cc(compute_capability))
    if device is None:
        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            return _limits_from_table((9, 0))
    if device.platform != "gpu" or not hasattr(device, "compute_capability"):
        raise ValueError(f"device={device!r} has no CUDA compute capability; allowed: an NVIDIA GPU device")
    return _limits_from_table(_parse_cc(device.compute_capability), getattr(device, "core_count", None))


# ------------------------------------------------------------------------------------------ kernel resources


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Pallas Triton kernel as XLA receives it: name, Triton IR (text) and launch parameters."""

    name: str
    ir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs: shared memory (bytes, Triton's allocation), registers per thread and spill
    bytes (ptxas -v; None if ptxas could not be run), for `num_warps` warps on `arch` (e.g. "sm_90a")."""

    name: str
    shared_bytes: int
    registers: int | None
    spill_store_bytes: int | None
    spill_load_bytes: int | None
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    arch: str

    def fits(self, limits: DeviceLimits) -> bool:
        """Whether it can launch under `limits`: shared memory per block, and the register file holds one block
        (num_warps * 32 threads at `registers` each)."""
        regs_ok = self.registers is None or self.registers * self.num_warps * 32 <= limits.registers_per_sm
        return self.shared_bytes <= limits.max_shared_bytes_per_block and regs_ok


def _custom_calls(op, out: list) -> list:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                child = child.operation
                if child.name == "stablehlo.custom_call":
                    out.append(child)
                _custom_calls(child, out)
    return out


def _attr_int(attr) -> int:
    return int(str(attr).split(":")[0])


def triton_kernels(fn: Callable, *args, **kwargs) -> list[TritonKernel]:
    """The Pallas Triton kernels in `jax.jit(fn)(*args, **kwargs)` lowered for CUDA from any host, in program
    order. `args`: arrays or jax.ShapeDtypeStruct. The Pallas lowering takes the compute capability of a local
    GPU, and sm_90 without one. JAX 0.11's Triton lowering refuses a host without a GPU ("No supported GPU devices
    found, please specify an abstract GPU device"); under 0.11 this runs on a GPU host only."""
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect as triton_dialect

    lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    kernels = []
    for call in _custom_calls(module.operation, []):
        if str(call.attributes["call_target_name"]).strip('"') != _TRITON_CALL:
            continue
        config = call.attributes["mhlo.backend_config"]
        # the IR is MLIR bytecode of jaxlib's Triton dialect: parse it there and print it as text, which a
        # Triton of another LLVM revision can read (bytecode versions need not match)
        with jax_mlir.make_ir_context() as ctx, ir.Location.unknown():
            triton_dialect.register_dialect(ctx)
            text = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
        grid = tuple(_attr_int(config[f"grid_{a}"]) for a in "xyz")
        kernels.append(TritonKernel(ir.StringAttr(config["name"]).value, text, _attr_int(config["num_warps"]),
                                    _attr_int(config["num_stages"]), grid))
    return kernels


def triton_available() -> bool:
    """Whether the triton package is installed, found without importing it: triton loads its own LLVM, which stays
    out of a process that runs XLA (`compile_triton_kernel`)."""
    return importlib.util.find_spec("triton") is not None


def _import_triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise ImportError("triton_kernel_resources needs the `triton` package (pip install triton; the project's "
                          "[test] extras pin it)") from e
    return triton, GPUTarget


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: str) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` of the triton wheel."""
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch=int(re.sub(r"\D", "", arch))).path
    except Exception:  # noqa: BLE001 - older/newer triton: fall back to the wheel's bin/ptxas
        ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    regs, spill = _PTXAS_REGS.search(log), _PTXAS_SPILL.search(log)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None,
            int(spill.group(2)) if spill else None)


_POOL: concurrent.futures.ProcessPoolExecutor | None = None


def _triton_process() -> concurrent.futures.ProcessPoolExecutor:
    """One child process per Python process (started on first use, reused) that runs the triton package."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_POOL.shutdown)  # before interpreter teardown, which its own finaliser does not survive
    return _POOL


def compile_triton_kernel(kernel: TritonKernel, compute_capability: Any = (9, 0), *,
                          ptxas: bool = True) -> KernelResources:
    """Compile one kernel's Triton IR for `compute_capability` with the triton package; no GPU needed.

    The compile runs in a child process: the triton package brings its own LLVM and MLIR, and loaded beside
    XLA's in one process, later XLA compiles there segfaulted (twice in full test runs, in tests after the
    resource checks had run in that worker)."""
    return _triton_process().submit(_compile, kernel, _parse_cc(compute_capability), ptxas).result()


def _compile(kernel: TritonKernel, compute_capability: tuple[int, int], ptxas: bool) -> KernelResources:
    triton, GPUTarget = _import_triton()
    major, minor = compute_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(path, "w") as f:
            f.write(kernel.ir)
        compiled = triton.compile(path, target=GPUTarget("cuda", 10 * major + minor, 32),
                                  options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages, num_ctas=1,
                                               enable_fp_fusion=True))  # XLA fuses too; no effect on memory
    shared = int(compiled.metadata.shared)
    arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"])
    arch = arch.group(1) if arch else f"sm_{major}{minor}"
    regs = spill_st = spill_ld = None
    if ptxas:
        regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"], arch)
    return KernelResources(kernel.name, shared, regs, spill_st, spill_ld, kernel.num_warps, kernel.num_stages,
                           kernel.grid, arch)


def triton_kernel_resources(fn: Callable, *args, compute_capability: Any = (9, 0), ptxas: bool = True,
                            **kwargs) -> list[KernelResources]:
    """Resources of every Pallas Triton kernel in `jax.jit(fn)(*args, **kwargs)` compiled for
    `compute_capability` (default sm_90), measured on any host. `args`: arrays or jax.ShapeDtypeStruct."""
    return [compile_triton_kernel(k, compute_capability, ptxas=ptxas) for k in triton_kernels(fn, *args, **kwargs)]
