"""Named recipes: NVIDIA's published precision assignments (docs/formats.md 2, 5, 6).

    quant.recipes.get("nvfp4")                          # ModelOpt NVFP4_DEFAULT_CFG: W4A4 every linear but lm_head
    quant.recipes.get("fp8_training", keep_first_layers=1)

Inference (PTQ / QAT / QAD) recipes calibrate per-tensor amaxes (`static=True`) and use the clipped STE, as
ModelOpt does; training recipes quantize the backward GEMMs too and always use the current amax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from nemojax.lowp.recipe import LinearQuant, QuantRecipe, TensorQuant

ATTENTION = "*mixer/[qkvo]_proj"
LATENT = "*latent_proj"
ROUTED = "*mixer/experts/*"


def _w_a(fmt: str, *, block_scales: str = "dynamic") -> LinearQuant:
    """Weights and inputs in `fmt`, calibrated per-tensor amaxes (none for MX: its scales are all per block),
    clipped STE (ModelOpt's default quantizers)."""
    static = not fmt.startswith("mx")
    return LinearQuant(weight=TensorQuant(fmt, static=static, ste="clipped", block_scales=block_scales),
                       input=TensorQuant(fmt, static=static, ste="clipped"))


def _weights_only(fmt: str) -> LinearQuant:
    return LinearQuant(weight=TensorQuant(fmt, static=True, ste="clipped"))


FP8_KV = TensorQuant("fp8_e4m3", static=True)
HIGH = None  # readability: a rule that keeps a layer in high precision


def nvfp4() -> QuantRecipe:
    """ModelOpt NVFP4_DEFAULT_CFG: NVFP4 weights and inputs of every linear layer; lm_head stays high precision."""
    return QuantRecipe("nvfp4", default=_w_a("nvfp4"), rules=(("lm_head", HIGH),))


def nvfp4_w4a16() -> QuantRecipe:
    """NVFP4 weights only (what NVFP4 checkpoints run as on Hopper)."""
    return QuantRecipe("nvfp4_w4a16", default=_weights_only("nvfp4"), rules=(("lm_head", HIGH),))


def fp8() -> QuantRecipe:
    """FP8 E4M3 per-tensor W8A8 with an FP8 KV cache (ModelOpt FP8_DEFAULT_CFG + FP8_KV_CFG)."""
    return QuantRecipe("fp8", default=_w_a("fp8_e4m3"), rules=(("lm_head", HIGH),), kv_cache=FP8_KV)


def mxfp8() -> QuantRecipe:
    return QuantRecipe("mxfp8", default=_w_a("mxfp8"), rules=(("lm_head", HIGH),))


def mxfp4() -> QuantRecipe:
    return QuantRecipe("mxfp4", default=_w_a("mxfp4"), rules=(("lm_head", HIGH),))


def nemotron3_nano_nvfp4() -> QuantRecipe:
    """Nemotron 3 Nano NVFP4 (QAD checkpoint): the attention layers and the Mamba layers that feed them stay high
    precision; experts and the other Mamba GEMMs NVFP4; FP8 KV cache."""
    return QuantRecipe("nemotron3_nano_nvfp4", default=_w_a("nvfp4"), rules=(("lm_head", HIGH),),
                       keep_before_attention=True, kv_cache=FP8_KV)


def nemotron3_super_nvfp4() -> QuantRecipe:
    """Nemotron 3 Super NVFP4 PTQ (`nvfp4-mse`): routed experts NVFP4 W4A4 with MSE-searched static weight block
    scales; shared experts, Mamba in/out_proj (and any dense MLP) FP8 per-tensor; attention, latent projections,
    MTP and lm_head high precision; FP8 KV cache."""
    return QuantRecipe(
        "nemotron3_super_nvfp4", default=_w_a("fp8_e4m3"),
        rules=(("lm_head", HIGH), ("mtp/*", HIGH), (ATTENTION, HIGH), (LATENT, HIGH),
               (ROUTED, _w_a("nvfp4", block_scales="static"))),
        kv_cache=FP8_KV)


def fp8_training(keep_first_layers: int = 1, keep_last_layers: int = 1) -> QuantRecipe:
    """FP8 per-tensor current scaling, "hybrid" formats: E4M3 weights and activations, E5M2 gradients; the first
    and last layers and lm_head in high precision (Nemotron-H; Megatron-Bridge keeps 2 + 2 at 56B scale)."""
    e4m3, e5m2 = TensorQuant("fp8_e4m3"), TensorQuant("fp8_e5m2")
    return QuantRecipe("fp8_training", default=LinearQuant(weight=e4m3, input=e4m3, grad=e5m2),
                       rules=(("lm_head", HIGH), ("mtp/*", HIGH)),
                       keep_first_layers=keep_first_layers, keep_last_layers=keep_last_layers)


def _nvfp4_training_linear() -> LinearQuant:
    return LinearQuant(weight=TensorQuant("nvfp4_2d"), input=TensorQuant("nvfp4"),
                       grad=TensorQuant("nvfp4", rounding="stochastic"), rht=True)


def nvfp4_training(keep_last_fraction: float = 0.15) -> QuantRecipe:
    """The NVFP4 pretraining recipe (arXiv 2509.25149): 16x16 weight scales, 1x16 activations and gradients,
    stochastic rounding of gradients, RHT on the weight-gradient GEMM inputs, the last ~15% of layers and
    lm_head in high precision."""
    return QuantRecipe("nvfp4_training", default=_nvfp4_training_linear(), rules=(("lm_head", HIGH),),
                       keep_last_fraction=keep_last_fraction)


def nemotron3_super_nvfp4_training(keep_last_fraction: float = 0.15) -> QuantRecipe:
    """Nemotron 3 Super pretraining: the NVFP4 recipe, with attention projections, latent MoE projections, MTP,
    the last 15% of layers and lm_head in high precision and the Mamba out_proj in MXFP8."""
    mx = TensorQuant("mxfp8")
    return QuantRecipe(
        "nemotron3_super_nvfp4_training", default=_nvfp4_training_linear(),
        rules=(("lm_head", HIGH), ("mtp/*", HIGH), (ATTENTION, HIGH), (LATENT, HIGH),
               ("*mixer/out_proj", LinearQuant(weight=mx, input=mx, grad=mx))),
        keep_last_fraction=keep_last_fraction)


RECIPES: dict[str, Callable[..., QuantRecipe]] = {
    f.__name__: f for f in (nvfp4, nvfp4_w4a16, fp8, mxfp8, mxfp4, nemotron3_nano_nvfp4, nemotron3_super_nvfp4,
                            fp8_training, nvfp4_training, nemotron3_super_nvfp4_training)
}


def names() -> list[str]:
    return list(RECIPES)


def get(name: str | QuantRecipe, **overrides: Any) -> QuantRecipe:
    """A named recipe (keyword arguments go to its factory, e.g. keep_last_fraction), or a recipe as is."""
    if isinstance(name, QuantRecipe):
        return dataclasses.replace(name, **overrides) if overrides else name
    if name not in RECIPES:
        raise ValueError(f"quant recipe {name!r} is unknown: must be one of {', '.join(RECIPES)}")
    return RECIPES[name](**overrides)
