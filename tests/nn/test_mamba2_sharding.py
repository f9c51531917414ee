"""The Mamba-2 mixer under a tensor-sharded mesh: its parts (z, x, B, C, dt) shard by heads or groups, so the
compiled forward and backward move no activations between tensor shards except the reductions of the two
projections' contractions (out_proj's output, the in_proj input gradient) and the batch reduction of the param
gradients; and it computes what one device computes, also where the tensor degree does not divide the groups.

Runs in a subprocess with 8 CPU devices (the device count is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, re
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from nemojax.config import MambaConfig, ModelConfig, Runtime
    from nemojax.nn.mamba2 import Mamba2Mixer
    from nemojax.train import sharding

    # H = 8 heads of P = 16, G = 2 groups of N = 16: tensor 2 divides the groups, tensor 4 only the heads
    cfg = ModelConfig(vocab_size=32, hidden_size=64, pattern="M", runtime=Runtime(dtype="float32"),
                      initializer_range=0.1,
                      mamba=MambaConfig(num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=16))
    mixer = Mamba2Mixer(cfg)
    u = jax.random.normal(jax.random.key(1), (4, 32, 64))
    boxed = jax.eval_shape(mixer.init, jax.random.key(0), u)["params"]
    params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.key(0), u)["params"])
    specs = nn.get_partition_spec(boxed)
    units = sharding._units(cfg)

    def loss(params, u):
        return jnp.sum(mixer.apply({"params": params}, u)[0] ** 2)  # a mixer returns (y, state)

    step = jax.value_and_grad(loss, argnums=(0, 1))
    want_loss, (want_grads, want_du) = jax.jit(step)(params, u)
    out = {}
    for tensor in (2, 4):
        mesh = sharding.make_mesh({"data": 8 // tensor, "tensor": tensor})
        def place(spec, leaf):
            physical = nn.logical_to_mesh_axes(tuple(spec), sharding.RULES)
            dims = tuple(spec) + (None,) * (leaf.ndim - len(spec))
            return NamedSharding(mesh, sharding._fit(physical, leaf.shape, mesh, tuple(units.get(d) for d in dims)))
        p_sharding = jax.tree.map(place, specs, params, is_leaf=lambda x: isinstance(x, P))
        u_sharding = NamedSharding(mesh, P("data", None, None))
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            fn = jax.jit(step, in_shardings=(p_sharding, u_sharding))
            hlo = fn.lower(params, u).compile().as_text()
            got_loss, (got_grads, got_du) = fn(jax.device_put(params, p_sharding), jax.device_put(u, u_sharding))
        ops = []
        for line in hlo.splitlines():
            m = re.search(r"= .*? (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\\(",
                          line)
            if m:
                name = re.search(r'op_name="([^"]*)"', line)
                ops.append([m[1], name[1] if name else ""])
        got, want = (got_loss, got_grads, got_du), (want_loss, want_grads, want_du)
        err = max(float(jnp.max(jnp.abs(a - b)) / (1.0 + jnp.max(jnp.abs(b))))
                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        out[tensor] = {"ops": ops, "err": err,
                       "B_out": p_sharding["in_proj_B"]["kernel"].spec[1],  # the output dim's mesh axis
                       "x_out": p_sharding["in_proj_x"]["kernel"].spec[1]}
    print(json.dumps(out))
""")


@pytest.fixture(scope="session")  # one subprocess per worker, whatever the test order
def sharded() -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("mamba_sharding")  # one worker, one subprocess for both tests
def test_tensor_sharded_mixer_has_no_resharding_collectives(sharded):
    """Tensor 2 (divides H and G): only all-reduces, none of them from a split or concatenate; no all-to-all,
    collective-permute or all-gather (the fused [z | x | B | C | dt] layout cut across shards needed those)."""
    run = sharded["2"]
    assert run["x_out"] == "tensor" and run["B_out"] == "tensor"
    kinds = sorted({kind for kind, _ in run["ops"]})
    assert kinds == ["all-reduce"], run["ops"]
    sources = [name.rsplit("/", 1)[-1] for _, name in run["ops"]]
    assert not [s for s in sources if s.startswith(("split", "concatenate", "slice"))], run["ops"]
    # forward: out_proj's output is reduced over tensor
    assert any("out_proj/dot_general" in name for _, name in run["ops"])


@pytest.mark.xdist_group("mamba_sharding")  # one worker, one subprocess for both tests
def test_sharded_mixer_equals_one_device(sharded):
    """Loss, param gradients and input gradient equal the one-device ones, on tensor 2 and on tensor 4, where
    G = 2 does not divide: B and C (and their convs) are replicated, z, x and dt still shard by heads."""
    assert sharded["4"]["B_out"] is None and sharded["4"]["x_out"] == "tensor"
    for tensor in ("2", "4"):
        assert sharded[tensor]["err"] < 1e-5, (tensor, sharded[tensor]["err"])  # relative to each leaf's max
