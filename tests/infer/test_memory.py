"""Memory planner: byte-exact against the caches init_cache allocates, the right scaling in batch and context,
weights as Model.init would hold them, max_context at its boundary, and Nemotron Nano 2 9B at 128k by hand."""

from __future__ import annotations

import sys

import jax
import pytest

from nemojax import presets
from nemojax.infer.cache import cache_nbytes, init_cache
from nemojax.infer.memory import MemoryPlan, cache_bytes, max_context
from nemojax.model import abstract_params

TINY = ["nemotron-h-8b-tiny", "nemotron-nano-9b-v2-tiny", "nemotron-3-nano-30b-a3b-tiny",
        "nemotron-3-super-120b-a12b-tiny"]
GiB = 2**30


def _held(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch,context", [(1, 1), (2, 17), (3, 64)])
def test_cache_parts_equal_the_allocated_cache(name, dtype, batch, context):
    config = presets.get(name)
    plan = cache_bytes(config, batch, context, dtype=dtype)
    held = cache_nbytes(init_cache(config, batch, context, dtype))
    assert {"kv": plan.kv, "ssm": plan.ssm, "conv": plan.conv} == held
    assert plan.kv > 0 and plan.ssm > 0 and plan.conv > 0


def test_mtp_caches_are_one_set_per_depth():
    config = presets.get("nemotron-3-super-120b-a12b-tiny", mtp={"num_layers": 2, "pattern": "*M"})
    base = cache_bytes(config, 2, 9, dtype="bfloat16")
    plan = cache_bytes(config, 2, 9, dtype="bfloat16", mtp=True)
    head = cache_nbytes(init_cache(config, 2, 9, "bfloat16", pattern="*M*M"))
    assert plan.kv == base.kv + head["kv"] and plan.ssm == base.ssm + head["ssm"]
    assert plan.conv == base.conv + head["conv"] and head["kv"] > 0 and head["ssm"] > 0
    assert plan.weights == base.weights  # weights hold the MTP head either way
    with pytest.raises(ValueError, match="config.mtp is None"):
        cache_bytes(presets.get("nemotron-h-8b-tiny"), 1, 8, mtp=True)


def test_scaling_in_context_and_batch():
    config = presets.get("nemotron-nano-9b-v2-tiny")
    a, b, c = (cache_bytes(config, 2, n) for n in (100, 200, 300))
    assert (a.ssm, a.conv, a.weights) == (b.ssm, b.conv, b.weights) == (c.ssm, c.conv, c.weights)
    assert b.kv == 2 * a.kv and c.kv == 3 * a.kv  # linear through zero
    d = cache_bytes(config, 6, 100)
    assert (d.kv, d.ssm, d.conv) == (3 * a.kv, 3 * a.ssm, 3 * a.conv) and d.weights == a.weights
    assert a.total == a.weights + a.kv + a.ssm + a.conv == a.weights + a.cache


@pytest.mark.parametrize("name", ["nemotron-h-8b-tiny", "nemotron-3-super-120b-a12b-tiny"])
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_weights_are_the_params_model_init_holds(name, weight_dtype):
    """In bfloat16 the MoE router (kernel and correction bias) stays float32, as in the model."""
    config = presets.get(name)
    held = _held(abstract_params(config.replace(runtime={"param_dtype": weight_dtype})))
    assert cache_bytes(config, 1, 4, weight_dtype=weight_dtype).weights == held
    # default: the runtime's param_dtype
    assert cache_bytes(config.replace(runtime={"param_dtype": weight_dtype}), 1, 4).weights == held
    n = sum(x.size for x in jax.tree.leaves(abstract_params(config)))
    routers = config.pattern.count("E") + (config.mtp.pattern.count("E") * config.mtp.num_layers if config.mtp else 0)
    router_params = routers * (config.hidden_size + 1) * config.moe.num_experts if config.moe else 0
    itemsize = 4 if weight_dtype == "float32" else 2
    assert held == (n - router_params) * itemsize + router_params * 4


def test_nano2_9b_at_128k_in_bfloat16_fits_an_a10g():
    """Nemotron Nano 2 9B: 56 layers = 27 Mamba-2 + 4 attention + 25 MLP; Mamba 128 heads x 80, N 128, 8 groups,
    conv 4; attention 8 KV heads x 128; 8,888,227,328 params (tests/test_presets.py). The paper's claim: 128k context
    on a 22 GiB A10G in bfloat16."""
    config = presets.get("nemotron-nano-9b-v2")
    assert (config.pattern.count("M"), config.pattern.count("*"), config.pattern.count("-")) == (27, 4, 25)
    context = 131072
    kv = 4 * 2 * context * 8 * 128 * 2  # layers x (k, v) x positions x kv heads x head_dim x bf16
    ssm = 27 * 128 * 80 * 128 * 4  # layers x H x P x N x float32
    conv = 27 * 3 * (128 * 80 + 2 * 8 * 128) * 2  # layers x (K - 1) x conv_dim x bf16
    weights = 8_888_227_328 * 2
    assert (kv, ssm, conv, weights) == (2 * GiB, 141_557_760, 1_990_656, 17_776_454_656)

    plan = cache_bytes(config, 1, context)
    assert plan == MemoryPlan(weights=weights, kv=kv, ssm=ssm, conv=conv)
    assert plan.total == 20_067_486_720
    assert plan.total / GiB == pytest.approx(18.689, abs=1e-3)
    assert plan.total <= 22 * GiB  # the claim holds, with ~3.3 GiB to spare for activations and workspace
    # what does not fit: the same context with a float32 cache and weights, or 8 sequences in bfloat16
    assert cache_bytes(config, 1, context, dtype="float32", weight_dtype="float32").total > 22 * GiB
    assert cache_bytes(config, 8, context).total > 22 * GiB
    # the 12B-v2 it was pruned from does not fit at any context: its bfloat16 weights alone are 22.9 GiB
    assert max_context(presets.get("nemotron-nano-12b-v2"), 1, 22 * GiB) == 0
    text = str(plan)
    assert "weights" in text and "18.689" in text and "2.000" in text


def test_max_context_is_the_boundary():
    config = presets.get("nemotron-nano-9b-v2")
    n = max_context(config, 1, 22 * GiB)
    assert cache_bytes(config, 1, n).total <= 22 * GiB < cache_bytes(config, 1, n + 1).total
    assert n == 348_041  # 128k fits with room: 3.31 GiB / 16 KiB per token more
    assert n == (22 * GiB - 17_776_454_656 - 141_557_760 - 1_990_656) // (4 * 2 * 8 * 128 * 2)
    tiny = presets.get("nemotron-h-8b-tiny")
    budget = cache_bytes(tiny, 2, 1000).total
    assert max_context(tiny, 2, budget) == 1000 and max_context(tiny, 2, budget - 1) == 999
    assert max_context(tiny, 2, cache_bytes(tiny, 2, 1).total - 1) == 0  # not even one token
    mamba_only = tiny.replace(pattern="M-M-", attention=None)
    assert max_context(mamba_only, 1, 10 * GiB) == sys.maxsize
    assert max_context(mamba_only, 1, 1) == 0


def test_bad_arguments_name_the_field():
    config = presets.get("nemotron-h-8b-tiny")
    for kwargs, field in (({"batch": 0, "context": 8}, "batch=0"), ({"batch": 1, "context": -1}, "context=-1")):
        with pytest.raises(ValueError, match=field):
            cache_bytes(config, **kwargs)
    with pytest.raises(ValueError, match="dtype='float7'"):
        cache_bytes(config, 1, 8, dtype="float7")
    with pytest.raises(ValueError, match="weight_dtype='nope'"):
        cache_bytes(config, 1, 8, weight_dtype="nope")
    with pytest.raises(ValueError, match="memory_bytes=-1"):
        max_context(config, 1, -1)
