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
