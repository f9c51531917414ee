"""Shared test setup: float32 on CPU, deterministic; tests must not download anything; XLA without its backend
optimisations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The suite's tiny models spend far more time being compiled than running: XLA's backend optimisation level 0
# cuts the whole suite's time by about a third (measured on tests/pallas_kernels + tests/infer: 4:27 -> 2:47 on
# 2 cores). Numerics are what the tests check, and they hold at either level. Set before jax initialises its
# backend; subprocesses inherit it (the multi-device tests append their device count to it).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# No persistent XLA compilation cache for the suite: it saved ~7% of tests/infer, but every program it serialises is
# one more large allocation, and serialising one segfaulted (below).

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


# Each xdist worker runs hundreds of test modules in one process, and jax keeps every compiled program (and what
# module fixtures hold) alive: workers grew to ~10 GiB each on this 23 GiB machine, and full runs then died with
# SIGSEGV inside XLA's compile or executable serialisation (in tests that pass alone; a failed allocation in LLVM
# crashes rather than raising), after which `--dist loadgroup` left the run hanging to CI's limit. Programs are
# rarely shared across modules: release them after each one.
@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
