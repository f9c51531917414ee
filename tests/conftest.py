"""Shared test setup: float32 on CPU, deterministic; tests must not download anything; XLA without its backend
optimisations; one persistent compilation cache per run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The suite's tiny models spend far more time being compiled than running: XLA's backend optimisation level 0
# cuts the whole suite's time by about a third (measured on tests/pallas_kernels + tests/infer: 4:27 -> 2:47 on
# 2 cores). Numerics are what the tests check, and they hold at either level. Set before jax initialises its
# backend; subprocesses inherit it (the multi-device tests append their device count to it).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# One persistent XLA compilation cache for the run, shared by the xdist workers and every subprocess the tests start
# (CLI jobs, notebooks, README blocks, multi-device runs): the suite compiles the same small programs many times
# over, in several processes and under new Python closures that jax's in-memory caches do not recognise. Entries
# are keyed by the program, the compile options and the XLA flags, so a hit is the same executable. Measured on
# tests/infer (2 workers, cold cache): 117.6 s -> 109.8 s. A fresh directory per run, removed at the end, so no
# run depends on an earlier one; NEMOJAX_TEST_XLA_CACHE=0 turns it off.
if os.environ.get("NEMOJAX_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    # set in the pytest process before xdist starts its workers, which inherit it
    _cache = tempfile.mkdtemp(prefix="nemojax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
