"""Meshes and logical sharding rules. Rules and `_fit` are checked in-process on abstract meshes of any shape (no
devices needed); building meshes and placing params on 8 devices runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nemojax
from nemojax.model import abstract_params
from nemojax.train import sharding
from nemojax.train.optim import OptimizerConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SUPER = nemojax.presets.get("nemotron-3-super-120b-a12b-tiny")


def _abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, expert: int = 1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor, expert), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _specs(config, mesh) -> dict:
    shardings = sharding.param_shardings(config, mesh, abstract_params(config))
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, NamedSharding))


# ------------------------------------------------------------------ make_mesh on this process's device(s)


ONE = jax.devices()[:1]


def test_make_mesh_on_one_device():
    for shape in ({}, {"fsdp": -1}, {"data": 1, "tensor": 1}, {"expert": -1, "data": 1}):
        mesh = sharding.make_mesh(shape, ONE)
        assert mesh.axis_names == sharding.MESH_AXES
        assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
        assert mesh.axis_types == (AxisType.Auto,) * 4


@pytest.mark.parametrize("shape, message", [
    ({"model": 2}, r"mesh axes \['model'\] are invalid"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 2}, "needs 2 devices, 1 available"),
    ({"data": 2, "tensor": -1}, "1 devices do not divide by 2"),
    ({"data": 0}, "invalid"),
    ({"data": 0, "fsdp": -1}, "invalid"),  # a zero size is bad input too, not a ZeroDivisionError
])
def test_make_mesh_errors_name_the_problem(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape, ONE)


# ------------------------------------------------------------------ rules (abstract meshes)


def test_rules_place_each_logical_axis():
    """fsdp 2, tensor 2, expert 4 divide every dimension of the tiny Super: embed -> fsdp; vocab, mlp, heads,
    kv_heads, ssm_heads -> tensor; experts -> expert; unnamed dims (the router's expert dim) replicated."""
    specs = _specs(SUPER, _abstract_mesh(fsdp=2, tensor=2, expert=4))
    assert specs["embeddings"]["embedding"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")  # (embed, vocab)
    moe = specs["layers_1"]["mixer"]
    assert moe["experts"]["up_proj"] == P("expert", "fsdp", "tensor")  # (experts, embed, mlp)
    assert moe["experts"]["down_proj"] == P("expert", "tensor", "fsdp")  # (experts, mlp, embed)
    assert moe["gate"]["kernel"] == P("fsdp", None)
    assert moe["gate"]["e_score_correction_bias"] == P(None)
    assert moe["shared_experts"]["up_proj"]["kernel"] == P("fsdp", "tensor")
    assert moe["fc1_latent_proj"]["kernel"] == P("fsdp", "tensor")
    attention = specs["layers_3"]["mixer"]
    assert attention["q_proj"]["kernel"] == P("fsdp", "tensor")  # (embed, heads)
    assert attention["k_proj"]["kernel"] == P("fsdp", "tensor")  # (embed, kv_heads)
    assert attention["o_proj"]["kernel"] == P("tensor", "fsdp")  # (heads, embed)
    mamba = specs["layers_0"]["mixer"]
    for part in ("z", "x", "dt"):
        assert mamba[f"in_proj_{part}"]["kernel"] == P("fsdp", "tensor")  # (embed, ssm_heads)
    for part in ("B", "C"):
        assert mamba[f"in_proj_{part}"]["kernel"] == P("fsdp", "tensor")  # (embed, ssm_groups): G = 2
        assert mamba[f"conv1d_{part}"]["kernel"] == P(None, "tensor")  # (conv, ssm_groups)
    assert mamba["A_log"] == P("tensor")
    assert mamba["conv1d_x"]["kernel"] == P(None, "tensor")  # (conv, ssm_heads)
    assert mamba["out_proj"]["kernel"] == P("tensor", "fsdp")  # (ssm_heads, embed)
    assert specs["norm_f"]["scale"] == P("fsdp")


def test_non_divisible_dimensions_are_replicated():
    """vocab 510 does not split 4 ways, 8 experts do not split 16 ways, 64 hidden does not split 3 ways: those
    dimensions are replicated while the divisible ones on the same tensors stay sharded. (Size-1 mesh axes divide
    everything, so they stay in the spec, where they change nothing.)"""
    config = SUPER.replace(vocab_size=510)
    mesh = _abstract_mesh(fsdp=2, tensor=4)
    specs = _specs(config, mesh)
    assert specs["embeddings"]["embedding"] == P(None, "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", None)
    assert NamedSharding(mesh, specs["lm_head"]["kernel"]).shard_shape((64, 510)) == (32, 510)
    assert specs["layers_3"]["mixer"]["q_proj"]["kernel"] == P("fsdp", "tensor")  # 64 heads dim, 4 | 64
    specs = _specs(SUPER, _abstract_mesh(expert=16, tensor=2))
    assert specs["layers_1"]["mixer"]["experts"]["up_proj"] == P(None, "fsdp", "tensor")  # experts replicated
    mesh = _abstract_mesh(fsdp=3)
    specs = _specs(SUPER, mesh)
    assert specs["lm_head"]["kernel"] == P(None, "tensor")
    assert specs["layers_1"]["mixer"]["experts"]["up_proj"] == P("expert", None, "tensor")  # latent 32: 3 does not
    assert NamedSharding(mesh, specs["lm_head"]["kernel"]).shard_shape((64, 512)) == (64, 512)


def test_mamba_parts_split_between_whole_heads_and_groups():
    """The tiny Super's mixer has H = 8 heads of P = 16 and G = 2 groups of N = 16. Tensor 4 divides the heads
    but not the groups: z, x, dt (and the norm, out_proj, conv1d_x) shard, B and C and their convs replicate
    although G * N = 32 divides by 4. Tensor 16 divides H * P = 128 but not H: the whole mixer replicates."""
    m = SUPER.mamba
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size) == (8, 16, 2, 16)
    mamba = _specs(SUPER, _abstract_mesh(tensor=4))["layers_0"]["mixer"]
    for part in ("z", "x", "dt"):
        assert mamba[f"in_proj_{part}"]["kernel"] == P("fsdp", "tensor")
    for part in ("B", "C"):
        assert mamba[f"in_proj_{part}"]["kernel"] == P("fsdp", None)
        assert mamba[f"conv1d_{part}"]["kernel"] == P(None, None) and mamba[f"conv1d_{part}"]["bias"] == P(None)
    assert mamba["conv1d_x"]["bias"] == P("tensor") and mamba["norm"]["scale"] == P("tensor")
    assert mamba["out_proj"]["kernel"] == P("tensor", "fsdp")
    mamba = _specs(SUPER, _abstract_mesh(tensor=16))["layers_0"]["mixer"]
    assert mamba["in_proj_x"]["kernel"] == P("fsdp", None) and mamba["out_proj"]["kernel"] == P(None, "fsdp")
    assert mamba["A_log"] == P(None)


def test_fit_keeps_the_axes_that_divide():
    """A dimension split over several mesh axes keeps, in order, each axis whose running product divides it."""
    mesh = _abstract_mesh(data=2, fsdp=4, expert=2)
    batch = P(sharding.BATCH_AXES, None)
    assert sharding._fit(batch, (16, 5), mesh) == P(("data", "fsdp", "expert"), None)
    assert sharding._fit(batch, (8, 5), mesh) == P(("data", "fsdp"), None)  # 8 % (2*4*2) != 0: expert dropped
    assert sharding._fit(batch, (4, 5), mesh) == P(("data", "expert"), None)  # fsdp dropped, expert still fits
    assert sharding._fit(batch, (2, 5), mesh) == P("data", None)
    assert sharding._fit(batch, (3, 5), mesh) == P(None, None)
    assert sharding._fit(P("fsdp"), (6, 7), mesh) == P(None, None)  # a short spec is padded with None
    assert sharding._fit(P(None, "fsdp"), (6, 12), mesh) == P(None, "fsdp")
    # with units (heads, groups) per dimension, the axes must divide the units, not only the size
    assert sharding._fit(P(None, "fsdp"), (6, 12), mesh, (None, 2)) == P(None, None)
    assert sharding._fit(P(None, "fsdp"), (6, 12), mesh, (None, 4)) == P(None, "fsdp")


def test_batch_sharding_and_replicated():
    mesh = sharding.make_mesh({}, ONE)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    assert sharding.replicated(mesh).spec == P()


def test_opt_state_shardings_mirror_params():
    """Adam's mu and nu take their param's sharding leaf by leaf; counts and other scalars are replicated."""
    mesh = _abstract_mesh(fsdp=2, tensor=2, expert=4)
    params_shape = abstract_params(SUPER)
    params_sharding = sharding.param_shardings(SUPER, mesh, params_shape)
    optimizer = make_optimizer(OptimizerConfig())
    state_sharding = sharding.opt_state_shardings(optimizer, params_shape, params_sharding, mesh)
    assert jax.tree.structure(state_sharding, is_leaf=lambda x: isinstance(x, NamedSharding)) == \
        jax.tree.structure(jax.eval_shape(optimizer.init, params_shape))
    adam = [s for s in jax.tree.leaves(state_sharding, is_leaf=lambda s: hasattr(s, "nu")) if hasattr(s, "nu")]
    assert len(adam) == 1
    expected = jax.tree.leaves(params_sharding)
    for moment in (adam[0].mu, adam[0].nu):
        assert jax.tree.structure(moment) == jax.tree.structure(params_sharding)
        assert [s.spec for s in jax.tree.leaves(moment)] == [s.spec for s in expected]
    assert len(set(s.spec for s in expected)) > 4  # the params really are sharded in several ways
    # everything else (Adam's count, the schedule's count) is a replicated scalar
    moments = {id(s) for moment in (adam[0].mu, adam[0].nu) for s in jax.tree.leaves(moment)}
    others = [s for s in jax.tree.leaves(state_sharding) if id(s) not in moments]
    assert len(others) >= 2
    assert all(s.spec == P() for s in others)


# ------------------------------------------------------------------ 8 CPU devices (subprocess)

WORKER = textwrap.dedent("""
    import json
    import jax
    import nemojax
    from nemojax.model import abstract_params
    from nemojax.train import sharding
    from nemojax.train.optim import OptimizerConfig, make_optimizer

    out = {"devices": jax.device_count(), "meshes": {}, "errors": {}}
    for name, shape in {"fsdp_fill": {"fsdp": -1}, "dp_tp": {"data": 2, "tensor": 4},
                        "tp_fill": {"data": 2, "tensor": -1}, "mixed": {"data": 2, "fsdp": 2, "expert": 2}}.items():
        out["meshes"][name] = dict(sharding.make_mesh(shape).shape)
    for name, shape in {"fill_3": {"data": 3, "fsdp": -1}, "product": {"data": 2, "tensor": 2}}.items():
        try:
            sharding.make_mesh(shape)
        except ValueError as error:
            out["errors"][name] = str(error)
    config = nemojax.presets.get("nemotron-3-super-120b-a12b-tiny", vocab_size=511, pattern="E*")
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    model = nemojax.Model.init(config, 0)
    shardings = sharding.param_shardings(config, mesh, abstract_params(config))
    params = jax.device_put(model.params, shardings)
    local = lambda x: list(x.addressable_shards[0].data.shape)
    out["shards"] = {"embedding": local(params["embeddings"]["embedding"]),
                     "lm_head": local(params["lm_head"]["kernel"]),
                     "up_proj": local(params["layers_0"]["mixer"]["experts"]["up_proj"]),
                     "q_proj": local(params["layers_1"]["mixer"]["q_proj"]["kernel"])}
    optimizer = make_optimizer(OptimizerConfig())
    opt_sharding = sharding.opt_state_shardings(optimizer, abstract_params(config), shardings, mesh)
    state = jax.jit(optimizer.init, out_shardings=opt_sharding)(params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "nu")) if hasattr(s, "nu")][0]
    out["mu_up_proj"] = local(adam.mu["layers_0"]["mixer"]["experts"]["up_proj"])
    out["mu_matches"] = all(m.sharding.spec == p.sharding.spec
                            for m, p in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(params)))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("subprocess")
def test_make_mesh_on_8_devices(eight_devices):
    assert eight_devices["devices"] == 8
    assert eight_devices["meshes"] == {
        "fsdp_fill": {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1},
        "dp_tp": {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1},
        "tp_fill": {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1},
        "mixed": {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2}}
    assert "8 devices do not divide by 3" in eight_devices["errors"]["fill_3"]
    assert "needs 4 devices, 8 available" in eight_devices["errors"]["product"]


@pytest.mark.xdist_group("subprocess")
def test_params_and_adam_state_placed_on_8_devices(eight_devices):
    """fsdp 2 x tensor 2 x expert 2 with vocab 511 (odd, so not split over tensor): each device holds the
    hand-derived shard."""
    assert eight_devices["shards"] == {
        "embedding": [511, 32],  # (vocab 511 replicated, embed 64 / fsdp 2)
        "lm_head": [32, 511],
        "up_proj": [4, 16, 16],  # (experts 8 / 2, latent 32 / fsdp 2, mlp 32 / tensor 2)
        "q_proj": [32, 32],  # (embed 64 / 2, heads 64 / 2)
    }
    assert eight_devices["mu_up_proj"] == [4, 16, 16]
    assert eight_devices["mu_matches"]
