"""Recipes (nemojax.lowp.recipe / recipes): which layer gets which format, validation, serialisation."""

from __future__ import annotations

import json

import pytest

from nemojax.lowp.recipe import LinearQuant, QuantRecipe, TensorQuant, is_state
from nemojax.quant import named_recipes

PATTERN = "M-M*-MM-"  # nemotron-h-8b-tiny


def _fmt(recipe: QuantRecipe, path: str, pattern: str = PATTERN) -> str | None:
    spec = recipe.linear(path, pattern)
    return None if spec is None else spec.weight.fmt


def test_default_nvfp4_quantizes_every_linear_but_lm_head():
    r = named_recipes.get("nvfp4")
    for path in ("layers_0/mixer/in_proj_x", "layers_3/mixer/q_proj", "layers_7/mixer/down_proj",
                 "mtp/layers_0/eh_proj", "layers_1/mixer/experts/up_proj"):
        spec = r.linear(path, PATTERN)
        assert spec.weight.fmt == spec.input.fmt == "nvfp4"
        assert spec.weight.static and spec.input.static and spec.weight.ste == "clipped"
    assert r.linear("lm_head", PATTERN) is None


def test_positional_keeps():
    # last 15% of 8 layers = ceil(1.2) = 2 layers; first 1
    r = QuantRecipe("t", default=LinearQuant(weight=TensorQuant("fp8_e4m3")), keep_first_layers=1,
                    keep_last_fraction=0.15)
    kept = [i for i in range(8) if _fmt(r, f"layers_{i}/mixer/in_proj_x") is None]
    assert kept == [0, 6, 7]
    assert r.kept_layers("M" * 20) == frozenset({0, 17, 18, 19})
    # Nemotron 3 Nano: attention layers and the layers feeding them
    nano = named_recipes.get("nemotron3_nano_nvfp4")
    assert nano.kept_layers(PATTERN) == frozenset({2, 3})
    assert nano.kept_layers("MEM*EMEM*E") == frozenset({2, 3, 7, 8})
    # MTP layers are not main layers: positional keeps never touch them
    assert _fmt(r, "mtp/layers_0/mixer/q_proj") == "fp8_e4m3"


def test_super_ptq_recipe_assignments():
    r = named_recipes.get("nemotron3_super_nvfp4")
    pattern = "MEM*EMEM"
    routed = r.linear("layers_1/mixer/experts/up_proj", pattern)
    assert routed.weight.fmt == "nvfp4" and routed.weight.block_scales == "static" and routed.input.fmt == "nvfp4"
    assert _fmt(r, "layers_1/mixer/shared_experts/up_proj", pattern) == "fp8_e4m3"
    assert _fmt(r, "layers_0/mixer/in_proj_x", pattern) == "fp8_e4m3"
    assert _fmt(r, "layers_0/mixer/out_proj", pattern) == "fp8_e4m3"
    for hp in ("layers_3/mixer/q_proj", "layers_3/mixer/o_proj", "layers_1/mixer/fc1_latent_proj",
               "layers_1/mixer/fc2_latent_proj", "mtp/layers_1/mixer/experts/up_proj", "lm_head"):
        assert r.linear(hp, pattern) is None, hp
    assert r.kv_cache.fmt == "fp8_e4m3"


def test_super_pretraining_recipe_assignments():
    r = named_recipes.get("nemotron3_super_nvfp4_training")
    pattern = "MEM*EMEM" * 5  # 40 layers: the last ceil(6) are high precision
    spec = r.linear("layers_0/mixer/in_proj_x", pattern)
    assert (spec.weight.fmt, spec.input.fmt, spec.grad.fmt, spec.grad.rounding, spec.rht) == \
        ("nvfp4_2d", "nvfp4", "nvfp4", "stochastic", True)
    assert _fmt(r, "layers_0/mixer/out_proj", pattern) == "mxfp8"
    assert r.linear("layers_3/mixer/q_proj", pattern) is None
    assert r.linear("layers_1/mixer/fc2_latent_proj", pattern) is None
    assert [i for i in range(40) if r.linear(f"layers_{i}/mixer/in_proj_x", pattern) is None] == list(range(34, 40))


def test_fp8_training_recipe_is_hybrid_current_scaling():
    r = named_recipes.get("fp8_training", keep_first_layers=2, keep_last_layers=2)
    spec = r.linear("layers_3/mixer/q_proj", PATTERN)
    assert (spec.weight.fmt, spec.input.fmt, spec.grad.fmt) == ("fp8_e4m3", "fp8_e4m3", "fp8_e5m2")
    assert not (spec.weight.static or spec.input.static)
    assert [i for i in range(8) if r.linear(f"layers_{i}/mixer/x", PATTERN) is None] == [0, 1, 6, 7]


@pytest.mark.parametrize("name", named_recipes.names())
def test_json_round_trip(name):
    r = named_recipes.get(name)
    assert QuantRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("build, field", [
    (lambda: TensorQuant("nvfp5"), "fmt="),
    (lambda: TensorQuant("nvfp4", ste="straight"), "ste="),
    (lambda: TensorQuant("nvfp4", rounding="down"), "rounding="),
    (lambda: TensorQuant("mxfp8", static=True), "static="),
    (lambda: TensorQuant("fp8_e4m3", block_scales="static"), "block_scales="),
    (lambda: LinearQuant(input=TensorQuant("nvfp4", block_scales="static")), "input.block_scales"),
    (lambda: LinearQuant(weight=TensorQuant("nvfp4"), grad=TensorQuant("nvfp4")), "grad="),
    (lambda: LinearQuant(weight=TensorQuant("nvfp4"), input=TensorQuant("nvfp4"), rht=True), "rht="),
    (lambda: QuantRecipe("x", kv_cache=TensorQuant("nvfp4")), "kv_cache.fmt="),
    (lambda: QuantRecipe("x", keep_last_fraction=1.5), "keep_last_fraction="),
    (lambda: QuantRecipe("x", rules=(("lm_head", "bf16"),)), "rules[0]="),
    (lambda: named_recipes.get("int4"), "quant recipe 'int4' is unknown"),
])
def test_bad_recipes_name_the_field(build, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_state_names():
    for name in ("kernel_amax", "kernel_input_amax", "kernel_block_scale", "up_proj_amax", "k_amax", "v_amax"):
        assert is_state(name)
    for name in ("kernel", "up_proj", "scale", "A_log", "bias", "embedding"):
        assert not is_state(name)
