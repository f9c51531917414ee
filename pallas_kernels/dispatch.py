"""Which implementation an op runs: `impl="xla" | "pallas" | "auto"`, chosen per op from the model config.

    impl = dispatch.resolve("ssd_update", config.runtime.mamba_decode_impl)  # "xla" or "pallas"
    interpret = dispatch.interpret()                                    # True on CPU: Pallas runs interpreted

"pallas" always runs the kernel (interpreted on CPU, so a forced kernel is testable everywhere). "auto" picks
the kernel only on the backends where it has been validated against its reference on the device; a kernel that
has only passed interpret-mode tests stays on XLA under "auto", so no model changes numerics or breaks on a
backend nobody has run it on.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pltriton

IMPLS = ("xla", "pallas", "auto")
# implementations beyond IMPLS that some ops accept ("cudnn": jax.nn.dot_product_attention's fused kernel)
EXTRA_IMPLS: dict[str, tuple[str, ...]] = {"attention": ("cudnn",)}
# op -> {backend: the implementation "auto" picks there}. An entry is added only from a recorded device run in which
# that implementation compiled, matched its reference and beat the XLA baseline on that backend: the run's JSON is
# committed under experiments/results/ and named beside the entry, and tests/pallas_kernels/test_dispatch.py
# checks every entry against it. Backends without an entry run XLA.
VALIDATED: dict[str, dict[str, str]] = {
    "ssd_scan": {},
    "ssd_update": {},
    "fp8_matmul": {},
    "nvfp4_matmul": {},
    # cuDNN 6.1x / 7.2x XLA at L 4096 / 8192 (h200-2026-12-04-kernels-issue-bench_kernels.json); a faster 8B-slice
    # prefill with the same top-1 tokens as XLA to 98.6% in bf16 (h200-2026-12-04-run1-model.jsonl)
    "attention": {"gpu": "cudnn"},
    "attention_packed": {},  # attention over packed documents (segment ids), which cuDNN's path here does not take
    "decode_attention": {},  # one decode step over the KV cache (pallas_kernels.decode_attention)
}


def resolve(op: str, impl: str, backend: str | None = None) -> str:
    """"xla", "pallas" (or an op's extra impl) for `op` under the setting `impl` on `backend` (default: JAX's
    default backend)."""
    if op not in VALIDATED:
        raise ValueError(f"op={op!r} is invalid: must be one of {sorted(VALIDATED)}")
    allowed = IMPLS + EXTRA_IMPLS.get(op, ())
    if impl not in allowed:
        raise ValueError(f"impl={impl!r} is invalid for {op}: must be one of {allowed}")
    if impl != "auto":
        return impl
    return VALIDATED[op].get(backend or jax.default_backend(), "xla")


def interpret(backend: str | None = None) -> bool:
    """Whether Pallas kernels must run in interpret mode (CPU has no Pallas lowering)."""
    return (backend or jax.default_backend()) == "cpu"


def compiler_params(backend: str | None = None, **triton) -> pltriton.CompilerParams | None:
    """A pallas_call's compiler params for `backend`: on "gpu" Triton's (with `triton` options such as num_warps),
    which selects the Triton lowering the kernels here are written for (a pallas_call without params would go to
    Mosaic GPU, whose layout rules differ); None elsewhere (TPU rejects GPU params; the interpreter ignores them)."""
    return pltriton.CompilerParams(**triton) if (backend or jax.default_backend()) == "gpu" else None
