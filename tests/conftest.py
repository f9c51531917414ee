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

# No persistent XLA compilation cache for the suite: with it on for every program (a shared directory, minimum
# compile time 0) it saved ~7% of tests/infer, but jax 0.10.2 serialising one small CPU executable segfaulted in
# put_executable_and_time, twice in full runs (CI and here, tests/quant/test_transform.py), killing an xdist worker;
# after a dead worker, --dist loadgroup hung CI until its 90-minute limit.
