"""Builds and compiles the tiny train step with `train.compilation_cache_dir=CACHE`; prints the number of persistent
cache hits jax reported, as JSON. test_scan_layers.py runs it twice, as two processes, like two training runs.

    python -m tests.train.compile_cache_worker CACHE

A subprocess because the cache is process-wide state, and serialising an executable runs XLA code that must not take
a pytest worker down with it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import flax.linen as nn
import jax

from nemojax import config_files
from nemojax.train import loop, sharding

ROOT = Path(__file__).resolve().parents[2]


def main(cache: str) -> None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny step compiles in under 1 s
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    # the cache does not care how the stack is laid out: the cheapest step to compile (suite time)
    config = config_files.load(ROOT / "configs" / "tiny.py",
                               ["model.overrides.pattern=M-", f"train.compilation_cache_dir={cache}"])
    run = loop.build(config, devices=jax.devices()[:1])
    batch = {k: jax.ShapeDtypeStruct((4, 16), dtype, sharding=run.batch_sharding)
             for k, dtype in (("tokens", "int32"), ("targets", "int32"), ("loss_mask", "float32"),
                              ("segment_ids", "int32"))}
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.RULES):
        run.step.lower(run.abstract_state, batch).compile()
    print(json.dumps({"cache_hits": len(hits)}))


if __name__ == "__main__":
    main(sys.argv[1])
