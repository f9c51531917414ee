"""Distillation and QAD on the one fit loop, on one device and on an 8-device mesh, straight and interrupted +
resumed; prints what test_fit.py compares as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.train.fit_worker WORKDIR

Runs in a subprocess because the CPU device count is fixed when jax starts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

STEPS, STOP = 3, 1
B, L, VOCAB = 8, 16, 64
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def batches() -> list[dict[str, np.ndarray]]:
    """STEPS + 1 batches of random tokens (the first one also calibrates the quantized student)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS + 1):
        tokens = rng.integers(0, VOCAB, (B, L + 1)).astype(np.int32)
        mask = (rng.random((B, L)) > 0.1).astype(np.float32)
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask})
    return out


def _leaves(params) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def runs(method, student, teacher, data: list, workdir: Path) -> dict:
    """The method one device / 8 devices straight / 8 devices stopped after STOP steps and resumed."""
    single, single_history = method(student, teacher, iter(data), mesh=None)
    straight, straight_history = method(student, teacher, iter(data), mesh=MESH, workdir=workdir / "straight")
    method(student, teacher, iter(data), mesh=MESH, workdir=workdir / "resumed", stop_after=STOP)
    resumed, resumed_history = method(student, teacher, iter(data), mesh=MESH, workdir=workdir / "resumed")
    a, b, c = _leaves(single.params), _leaves(straight.params), _leaves(resumed.params)
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(student.params), a, strict=True))
    return {
        "single_losses": [m["loss"] for m in single_history],
        "mesh_losses": [m["loss"] for m in straight_history],
        "mesh_vs_single_max_abs": max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)),
        "moved_max_abs": moved,
        "resumed_params_identical": all(np.array_equal(x, y) for x, y in zip(b, c, strict=True)),
        "resumed_history_identical": straight_history == resumed_history,
        "resumed_steps": [m["step"] for m in resumed_history],
        "checkpoints": sorted(p.name for p in (workdir / "resumed" / "checkpoints").iterdir()),
    }


def main() -> None:
    import jax

    import nemojax
    from nemojax import quant
    from nemojax.compress.distill import DistillConfig, distill
    from nemojax.train.optim import OptimizerConfig

    workdir = Path(sys.argv[1])
    # The straight, stopped and resumed runs compile the same programs: compile each once (suite time).
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    optimizer = OptimizerConfig(lr=1e-3, total_steps=STEPS, warmup_steps=0, schedule="constant", weight_decay=0.0)
    config = nemojax.presets.get("nemotron-h-8b-tiny", runtime={"dtype": "float32", "param_dtype": "float32"},
                                 vocab_size=VOCAB, pattern="*-")
    teacher = nemojax.Model.init(config, 0)
    data = batches()
    dcfg = DistillConfig(optimizer=optimizer, intermediate=((1, 1),), intermediate_weight=0.1)

    def distill_method(student, teacher, batches, **options):
        return distill(student, teacher, batches, steps=STEPS, config=dcfg, **options)

    def qad_method(student, teacher, batches, **options):
        return quant.qad(student, teacher, batches, steps=STEPS, config=quant.QADConfig(optimizer=optimizer),
                         **options)

    student = nemojax.Model.init(config.replace(hidden_size=32, pattern="*-"), 1)
    quantized = quant.calibrate(quant.apply(teacher, "nvfp4"), [data[-1]["tokens"]])
    results = {"devices": jax.device_count(),
               "distill": runs(distill_method, student, teacher, data[:STEPS], workdir / "distill"),
               "qad": runs(qad_method, quantized, teacher, data[:STEPS], workdir / "qad")}
    print(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
