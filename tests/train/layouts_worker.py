"""Runs a few training steps of a tiny MoE hybrid on a given mesh layout and prints the losses as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.train.layouts_worker '{"data": 8}'
    python -m tests.train.layouts_worker '{"data": 2, "fsdp": 2}' --process-id 0 --num-processes 2 --port 12355

Each process computes the same global batches from a seed and feeds only its own rows, as a real multi-host job
does. Used by test_layouts.py in subprocesses (device count and jax.distributed must be set before jax starts).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

STEPS = 3
BATCH, SEQ = 8, 24


def config(mesh: dict):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"preset": "nemotron-3-nano-30b-a3b-tiny",
                                         "overrides": {"vocab_size": 128}, "runtime": {"moe_impl": "dense"}})
    c.mesh = ml_collections.ConfigDict(mesh)
    c.optimizer = ml_collections.ConfigDict({"lr": 1e-2, "warmup_steps": 1})
    c.train = ml_collections.ConfigDict({"steps": STEPS, "grad_accum": 2, "z_loss": 1e-4, "moe_aux_loss": 1e-2,
                                         "moe_bias_rate": 1e-3})
    return c


def global_batch(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, 128, (BATCH, SEQ + 1)).astype(np.int32)
    mask = (rng.random((BATCH, SEQ)) > 0.1).astype(np.float32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def train_steps(mesh: dict) -> dict:
    """STEPS steps on `mesh`; every process feeds its own rows of the same global batches."""
    import flax.linen as nn
    import jax

    from nemojax.train import sharding
    from nemojax.train.loop import _global_batch, build

    run = build(config(mesh))
    losses, norms = [], []
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.RULES):
        state = run.init(jax.random.PRNGKey(0))
        rows = BATCH // jax.process_count()
        for step in range(STEPS):
            local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows]
                     for k, v in global_batch(step).items()}
            state, metrics = run.step(state, _global_batch(local, run.batch_sharding))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        checksum = float(jax.jit(lambda params: sum(jax.numpy.sum(jax.numpy.abs(x)) for x in jax.tree.leaves(params)),
                                 out_shardings=sharding.replicated(run.mesh))(state.params))
    return {"mesh": mesh, "losses": losses, "grad_norms": norms, "param_checksum": checksum,
            "devices": jax.device_count(), "processes": jax.process_count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mesh")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--local-devices", type=int, default=0)
    args = parser.parse_args()

    import jax

    if args.local_devices:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    meshes = json.loads(args.mesh)
    results = [train_steps(mesh) for mesh in (meshes if isinstance(meshes, list) else [meshes])]
    if jax.process_index() == 0:
        print(json.dumps(results if isinstance(meshes, list) else results[0]))
    if args.num_processes > 1:
        jax.distributed.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
