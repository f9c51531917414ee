"""Shared test setup: float32 on CPU, deterministic; tests must not download anything; one JAX compilation cache
per test run."""

import os
import shutil
import tempfile
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests compile the same tiny models' functions in different processes (xdist workers, the subprocesses of
# the multi-device and resume tests). A persistent compilation cache shared by everything one `pytest` run starts
# compiles each once: the process that loads this file first picks a fresh directory and its environment reaches
# the workers and subprocesses it starts. Nothing carries over between runs, so a run costs what a fresh clone's
# does; the directory is removed when the run ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                           f"nemojax-jax-cache-{uuid.uuid4().hex}")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
