"""nemojax.elastic.choices and nemojax.elastic.count: the choice lists and the differentiable cost, checked against
param_count / cache_bytes of the config `pruned_config` builds, and against hand-derived deltas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nemojax import presets
from nemojax.compress.prune import pruned_config
from nemojax.elastic.choices import Choices, default_choices, layer_counts, make_choices
from nemojax.elastic.count import count, count_exact
from nemojax.infer.memory import cache_bytes
from nemojax.model import param_count

DENSE = "nemotron-h-8b-tiny"  # M-M*-MM-
MOE = "nemotron-3-nano-30b-a3b-tiny"  # MEM*EMEM, routed + shared experts
LATENT_MTP = "nemotron-3-super-120b-a12b-tiny"  # MEM*EMEM, latent MoE, MTP head "*E"
ORDER = (5, 2, 6)


def _oracle_config(config, sizes, depth=0, order=ORDER):
    """The config prune builds for these sizes, the first `depth` layers of `order` dropped."""
    pattern = "".join(c for i, c in enumerate(config.pattern) if i not in order[:depth])
    return pruned_config(config, pattern=pattern, **sizes)


def _grid(choices, index):
    return {axis: sizes[min(index, len(sizes) - 1)] for axis, sizes in choices.items() if axis != "depth"}


# ------------------------------------------------------------------------------------------------ choices


def test_default_choices_round_to_allowed_sizes():
    config = presets.get(MOE)
    choices = default_choices(config, max_drop=2)
    assert dict(choices) == {
        "hidden": (64, 56, 48, 40, 32), "mamba_heads": (8, 6, 4), "mamba_head_dim": (16, 14, 12, 10, 8),
        "experts": (8, 7, 6, 5, 4), "expert_ffn": (32, 28, 24, 20, 16), "shared_ffn": (64, 56, 48, 40, 32),
        "heads": (4, 2), "depth": (0, 1, 2)}
    # mamba_heads: multiples of n_groups=2 (7 -> 6 or 8; 5 -> 4 or 6, ties to the larger; 6.5 -> 6)
    assert default_choices(config, (1.0, 0.75, 0.5), axes=("experts",)) == Choices({"experts": (8, 6, 4)})
    # experts keep room for top_k=2: a quarter (2) is allowed, an eighth (1) rounds up to 2
    assert default_choices(config, (1.0, 0.125), axes=("experts",))["experts"] == (8, 2)
    assert hash(choices) == hash(default_choices(config, max_drop=2))
    assert layer_counts(config) == {"hidden": 1, "mamba_heads": 4, "mamba_head_dim": 4, "experts": 3,
                                    "expert_ffn": 3, "shared_ffn": 3, "heads": 1, "depth": 1}


@pytest.mark.parametrize("table, message", [
    ({"ffn": (128, 96)}, "no such axis"),  # the MoE model has no '-' layers
    ({"heads": (4, 3)}, r"allowed values: \[2, 4\]"),
    ({"experts": (6, 8)}, "strictly descending"),
    ({"experts": (7, 6)}, "full size 8"),
    ({"depth": (1, 2)}, "ascending from 0"),
    ({"depth": (0, 8)}, "num_layers=8"),
])
def test_make_choices_names_the_bad_axis(table, message):
    with pytest.raises(ValueError, match=message):
        make_choices(presets.get(MOE), table)


def test_default_choices_errors():
    config = presets.get(DENSE)
    with pytest.raises(ValueError, match="max_drop"):
        default_choices(config, axes=("depth",))
    with pytest.raises(ValueError, match="experts"):
        default_choices(config, axes=("experts",))
    with pytest.raises(ValueError, match="fractions"):
        default_choices(config, fractions=(1.0, 0.0))


# ------------------------------------------------------------------------------------------------ params


@pytest.mark.parametrize("name", [DENSE, MOE, LATENT_MTP])
def test_count_equals_param_count_of_the_pruned_config(name):
    config = presets.get(name)
    choices = default_choices(config)
    for index in (0, 1, 2, 4):
        sizes = _grid(choices, index)
        for depth in (0, 2):
            want = param_count(_oracle_config(config, sizes, depth))
            got = count(config, {**sizes, "depth": depth}, removal_order=ORDER)
            assert got.dtype == jnp.float32 and float(got) == want, (index, depth)
            assert count_exact(config, {**sizes, "depth": depth}, removal_order=ORDER) == want


def test_count_covers_biases_and_shared_expert_variants():
    config = presets.get(MOE, mlp_bias=True, attention={"bias": True}, mamba={"proj_bias": True,
                         "use_conv_bias": False}, moe={"n_shared_experts": 2})
    sizes = {"hidden": 40, "experts": 6, "expert_ffn": 24, "heads": 2, "mamba_heads": 6, "mamba_head_dim": 12}
    assert count_exact(config, sizes) == param_count(pruned_config(config, **sizes))
    with pytest.raises(ValueError, match="shared_ffn"):  # two shared experts: not an axis
        count(config, {"shared_ffn": 32})
    no_shared = presets.get(MOE, moe={"n_shared_experts": 0, "shared_intermediate_size": 0})
    assert count_exact(no_shared, {"experts": 4}) == param_count(pruned_config(no_shared, experts=4))


def test_count_exact_of_a_full_size_model():
    config = presets.get("nemotron-3-super-120b-a12b")  # 1.2e11: beyond float32's exact integers
    assert count_exact(config) == param_count(config)


def test_active_params_count_top_k_routed_experts():
    config = presets.get(MOE)  # 3 MoE layers, 8 experts of up [64, 32] + down [32, 64], top_k 2
    full = param_count(config)
    assert float(count(config, kind="active_params")) == full - 3 * (8 - 2) * 2 * 64 * 32
    # fewer experts leave the active count's routed part alone: only the router shrinks ([64, E] + [E])
    assert float(count(config, {"experts": 4}, kind="active_params")) == full - 3 * (8 - 2) * 2 * 64 * 32 - 3 * 4 * 65
    dense = presets.get(DENSE)
    assert float(count(dense, kind="active_params")) == param_count(dense)


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("name, dtypes", [(DENSE, {}), (MOE, {"dtype": "bfloat16", "weight_dtype": "bfloat16"}),
                                          (LATENT_MTP, {"weight_dtype": "bfloat16"})])
def test_memory_equals_cache_bytes_of_the_pruned_config(name, dtypes):
    config = presets.get(name)
    choices = default_choices(config)
    for index, depth in ((0, 0), (1, 2), (4, 1)):
        sizes = _grid(choices, index)
        small = _oracle_config(config, sizes, depth)
        for mtp in (False, True) if config.mtp else (False,):
            want = cache_bytes(small, 3, 100, mtp=mtp, **dtypes).total
            got = count_exact(config, {**sizes, "depth": depth}, kind="memory", removal_order=ORDER, batch=3,
                              context=100, mtp=mtp, **dtypes)
            assert got == want, (index, depth, mtp)


# ------------------------------------------------------------------------------------------------ per layer, depth


def test_heterogeneous_sizes():
    config = presets.get(DENSE)  # '-' layers at 1, 4, 7; D = 64, no MLP bias
    homogeneous = float(count(config, {"ffn": 96}))
    assert float(count(config, {"ffn": (96, 96, 96)})) == homogeneous
    # one '-' layer from 96 to 64: up and down lose 2 * D * 32
    assert float(count(config, {"ffn": (96, 64, 96)})) == homogeneous - 2 * 64 * 32
    moe = presets.get(MOE)  # MoE layers 1, 4, 6: one loses 2 experts (2 * 2 * 64 * 32) and their router rows (2 * 65)
    assert float(count(moe, {"experts": (8, 6, 8)})) == param_count(moe) - 2 * 2 * 64 * 32 - 2 * 65
    # the MTP head's MoE layer takes the full size unless listed after the main layers
    mtp = presets.get(LATENT_MTP)  # latent 32: an expert is 2 * 32 * 32
    assert float(count(mtp, {"experts": (6, 6, 6)})) == param_count(mtp) - 3 * 2 * (2 * 32 * 32 + 65)
    assert float(count(mtp, {"experts": (6, 6, 6, 6)})) == param_count(pruned_config(mtp, experts=6))
    with pytest.raises(ValueError, match=r"sizes\['experts'\] has shape \[2\].*3 \(or 4"):
        count(mtp, {"experts": (8, 8)})
    with pytest.raises(ValueError, match="hidden size is global"):
        count(config, {"hidden": (64, 64)})


def test_depth_keep_probabilities_give_the_expected_count():
    config = presets.get(DENSE)
    full = float(count(config))
    without_5 = float(count(config, {"depth": 1}, removal_order=(5,)))
    assert without_5 == param_count(config.replace(pattern=config.pattern[:5] + config.pattern[6:]))
    gamma = jnp.ones(8).at[5].set(0.25)
    assert float(count(config, {"depth": gamma}, removal_order=(5,))) == pytest.approx(
        0.25 * full + 0.75 * without_5, rel=1e-6)
    # a traced drop count (a sampled depth inside jit) drops the same layers
    assert float(jax.jit(lambda d: count(config, {"depth": d}, removal_order=ORDER))(2)) == param_count(
        _oracle_config(config, {}, 2))


def test_count_is_differentiable_in_float_sizes():
    config = presets.get(DENSE)  # three '-' layers: d params / d ffn = 3 * 2 * D
    assert float(jax.grad(lambda f: count(config, {"ffn": f}))(100.0)) == 3 * 2 * 64
    # d / d hidden of the embedding and lm_head alone is 2 * vocab; the whole count's derivative is larger
    assert float(jax.grad(lambda d: count(config, {"hidden": d}))(64.0)) > 2 * 512
    grad_gamma = jax.grad(lambda g: count(config, {"depth": g}, removal_order=ORDER))(jnp.ones(8))
    assert float(grad_gamma[1]) == 2 * 64 * 128 + 64  # a '-' layer: up, down, its pre-norm


@pytest.mark.parametrize("sizes, options, message", [
    ({"experts": 4}, {}, "no such axis"),
    ({"heads": 3}, {}, r"sizes\['heads'\]=3 is invalid"),
    ({"depth": 4}, {"removal_order": ORDER}, r"sizes\['depth'\]=4 is invalid"),
    ({"depth": 1}, {"removal_order": (9,)}, "removal_order"),
    ({"depth": 1.5}, {"removal_order": ORDER}, "keep probabilities"),
    ({}, {"kind": "flops"}, "kind='flops'"),
    ({}, {"kind": "memory", "context": 0}, "context=0"),
])
def test_count_errors_name_the_field(sizes, options, message):
    with pytest.raises(ValueError, match=message):
        count(presets.get(DENSE), sizes, **options)
