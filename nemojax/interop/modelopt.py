"""Quantized checkpoints in NVIDIA's layout (the ModelOpt "unified Hugging Face checkpoint"), both directions.

    save_quantized(model, "out/")           # config.json + hf_quant_config.json + model.safetensors
    model = load_quantized("out/")          # the recipe, the calibrated state and dequantized kernels

(both also exported as `nemojax.quant.save_quantized` / `load_quantized`; `nemojax.load_hf` reads such a folder
through `load_quantized`.)

`save_quantized` writes every linear layer that `model.config.runtime.quant` quantizes in the packed format NVIDIA's
serving stacks (vLLM, TensorRT-LLM, SGLang) load for its published NVFP4 / FP8 models, and every other tensor as
`save_hf` does. The codes are those the model's own fake quantizer produces (the kernel in the compute dtype,
`nemojax.quant.quantize` with the layer's calibrated amax and static block scales), so the checkpoint dequantizes
(code x weight_scale [x weight_scale_2]) to exactly the weights the fake-quantized model computes with.
`load_quantized` inverts it: the recipe is rebuilt from the quantization config (one rule per quantized layer),
kernels become the dequantized values, and the stored scales become the frozen state leaves (static NVFP4 block
scales, amaxes), so re-quantizing a loaded kernel gives back the stored codes and a second export is
byte-identical.

Tensors per quantized linear module `m` (torch layout [out, in], blocks along `in`, the contraction axis; stacked
experts [E, in, out] are written as one module per expert, `...experts.{e}.up_proj`):

    algo          m.weight                     m.weight_scale                  m.weight_scale_2   m.input_scale
    NVFP4         uint8 [out, in/2]            float8_e4m3fn [out, in/16]      f32 []             f32 []
    W4A16_NVFP4   uint8 [out, in/2]            float8_e4m3fn [out, in/16]      f32 []             -
    FP8           float8_e4m3fn [out, in]      f32 []                          -                  f32 []
    MXFP8         float8_e4m3fn [out, in]      uint8 [out, in/32] (E8M0 code)  -                  -

    FP8 KV cache: {attention}.k_proj.k_scale, {attention}.v_proj.v_scale   f32 []

Format facts relied on, with sources (NVIDIA/Model-Optimizer @ a2fbac7, `modelopt/torch/...`; vLLM @ 00155cd,
`vllm/model_executor/layers/quantization/modelopt.py`):

1. `hf_quant_config.json` = {"producer": {"name", "version"}, "quantization": {"quant_algo", "kv_cache_quant_algo",
   ...}}; with one layer format the "quantization" dict also holds that format's fields ("group_size" for the
   NVFP4 / MXFP8 families, none for FP8) and "exclude_modules" (the unquantized modules); with several it is
   quant_algo "MIXED_PRECISION" plus "quantized_layers": {module name: {"quant_algo", ["group_size"]}}
   (export/quant_utils.py `get_quant_config`, `process_layer_quant_config`). Per-layer algos: "NVFP4" and
   "W4A16_NVFP4" with group_size 16, "FP8", "MXFP8" with group_size 32 (same file). The file is written only
   when something is quantized (export/unified_export_hf.py `_write_hf_export_config`).
2. config.json gets "quantization_config" = {"config_groups": {"group_i": {"weights": {...}, "input_activations":
   {...}, "targets": [...]}}, "ignore": exclude_modules, "quant_algo", "kv_cache_scheme": {"dynamic": false,
   "num_bits": 8, "type": "float"} for FP8, "producer", "quant_method": "modelopt", and for MIXED_PRECISION also
   "quantized_layers"} (export/convert_hf_config.py `convert_hf_quant_config_format`, `_quant_algo_to_group_config`;
   targets ["Linear"] for one format, the sorted layer names per group for MIXED_PRECISION).
3. vLLM reads hf_quant_config.json's "quantization" (quant_algo, kv_cache_quant_algo, group_size,
   exclude_modules as fnmatch wildcards or exact names) or config.json's quantization_config (quant_algo,
   kv_cache_scheme, ignore); MIXED_PRECISION needs a non-empty "quantized_layers"; supported algos FP8, NVFP4,
   W4A16_NVFP4, MXFP8, MIXED_PRECISION, KV "FP8"/"NVFP4" (vLLM modelopt.py `QUANT_ALGOS`, `from_config`,
   `ModelOptMixedPrecisionConfig._from_config`).
4. NVFP4 tensors: `weight` uint8, two E2M1 codes per byte, element 2i in the low nibble
   (`(q[..., 1::2] << 4) | q[..., 0::2]`), code = sign << 3 | magnitude index; `weight_scale` float8_e4m3fn per 16
   elements of the last (input) dim; `weight_scale_2` = weight amax / (6 * 448); `input_scale` = input amax /
   (6 * 448); dequantization = code x weight_scale x weight_scale_2 (quantization/qtensor/nvfp4_tensor.py
   `NVFP4QTensor.quantize`, `get_weights_scaling_factor_2`, `get_activation_scaling_factor`;
   export/unified_export_hf.py `_export_quantized_weight`). ModelOpt stores 1.0 (clamped to >= 2^-9) for an
   all-zero block's scale; we store the scale our quantizer computed (0 for a flushed block): the block's codes
   are 0 either way, so it dequantizes to 0 in both.
5. FP8 (per-tensor E4M3): `weight` float8_e4m3fn, `weight_scale` = amax / 448 (0-dim), `input_scale` = input
   amax / 448 (export/quant_utils.py `get_scaling_factor`, `to_quantized_weight`).
6. MXFP8: `weight` float8_e4m3fn, `weight_scale` uint8 = E8M0 biased exponent (scale 2^(code - 127) =
   2^ceil(log2(block amax / 448))) per 32 elements of the input dim; activations are quantized dynamically, no
   input_scale (quantization/qtensor/mxfp8_tensor.py `MXFP8QTensor`, export `_export_quantized_weight`).
7. KV cache: the attention module's k/v amaxes are exported as `{attention}.k_proj.k_scale` and
   `{attention}.v_proj.v_scale` = amax / 448, and kv_cache_quant_algo "FP8" (export/quant_utils.py
   `_KV_CACHE_REPLACEMENTS`, `postprocess_state_dict`; unified_export_hf.py `kv_cache_max_bound = 448`).
8. Unquantized tensors keep their names and are written in the export dtype (default: the model's own dtype;
   unified_export_hf.py `_resolve_export_dtype`).

Scale values: the decode scales stored are those our quantizer computes, S_dec = 1 / fl(2688 / A) (NVFP4,
docs/formats.md 4) and 1 / fl(448 / A) (FP8), equal to ModelOpt's A / 2688 and A / 448 up to one float32 ulp;
storing ours keeps "checkpoint dequantization == our fake quantization" exact. On import the amax leaf is set to
a value A' whose decode scale is bit-equal to the stored one (searched among the float32 neighbours of
scale x 2688 or scale x 448).

Fused modules: the Mamba mixer's `in_proj` is one checkpoint module but five linear weights here (`in_proj_z`,
`in_proj_x`, `in_proj_B`, `in_proj_C`, `in_proj_dt`, so that each shards by heads or groups; nemojax.nn.mamba2).
They must share one format and are written as one module: the weight concatenated in the checkpoint's row order,
one per-tensor scale from the largest of the parts' amaxes, the input scale from their common input amax.
`calibrate` gives the parts one amax (calibrated on the fused weight, as ModelOpt calibrates `in_proj`), so the
export is exact; parts left with different amaxes (uncalibrated or dynamic weights) are re-rounded to the shared
scale, as a server that fuses q/k/v projections with different scales does. Loading gives every part the stored
scale and its columns of the block scales.

Not supported (ValueError naming the layer and the alternatives): MXFP4 and FP8 E5M2 layers; inputs with a
dynamic (uncalibrated) per-tensor amax for NVFP4 / FP8, whose layout needs a static input_scale; weight-only FP8;
mixed weight / input formats; contraction dims that are not a multiple of the block; a KV cache without
calibrated static amaxes. Gradient formats and the Hadamard transform of training recipes are not part of an
inference checkpoint and are dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.errors import CheckpointError
from nemojax.interop import safetensors_file
from nemojax.interop.naming import TensorRule, checkpoint_name, rule_for
from nemojax.interop.safetensors_file import CONFIG_NAME, DEFAULT_MAX_SHARD_BYTES, save_folder, write_tensors
from nemojax.interop.state_dict import config_from_hf, model_from_state_dict, state_dict_from_params, tensor_rules
from nemojax.lowp.formats import e8m0_from_code, e8m0_to_code
from nemojax.lowp.qarray import QArray, pack_fp4, quantize, unpack_fp4
from nemojax.lowp.recipe import NOT_LINEAR, LinearQuant, QuantRecipe, TensorQuant, is_state
from nemojax.model import Model, abstract_params

QUANT_CONFIG_NAME = "hf_quant_config.json"  # NVIDIA ModelOpt's marker of a quantized checkpoint
PRODUCER = "nemojax"
NVFP4_GROUP = 16
MXFP8_GROUP = 32
ALGOS = ("NVFP4", "W4A16_NVFP4", "FP8", "MXFP8")
SUPPORTED = ("weights and inputs nvfp4 (inputs calibrated: static=True) -> NVFP4; weights nvfp4 only -> "
             "W4A16_NVFP4; weights and inputs fp8_e4m3 (inputs calibrated) -> FP8; weights and inputs mxfp8 -> MXFP8")
# Candidate offsets (in float32 ulps) when solving for an amax whose decode scale equals a stored one.
_ULP_SEARCH = (0, -1, 1, -2, 2, -3, 3, -4, 4)


# One compiled program per (shape, format) instead of one per primitive: eager quantize / dequantize of every
# layer otherwise spends seconds compiling small ops.
_quantize = jax.jit(quantize, static_argnames=("fmt", "axis"))
_dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


# ------------------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Linear:
    """One linear weight of the model: its recipe path (`layers_1/mixer/experts/up_proj`), its param path, its
    checkpoint rule and the checkpoint module names (one per expert for stacked experts)."""

    path: str
    param: tuple[str, ...]
    rule: TensorRule
    modules: tuple[str, ...]

    @property
    def stacked(self) -> bool:
        return self.rule.layout == "experts"

    def state(self, suffix: str) -> tuple[str, ...]:
        """Param path of the state leaf `W{suffix}` beside the weight W (e.g. `kernel_amax`)."""
        return (*self.param[:-1], self.param[-1] + suffix)


@functools.lru_cache(maxsize=16)
def _abstract(config: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat abstract params of `config` without its recipe (the linear weights do not depend on it); cached."""
    return flatten_dict(abstract_params(config.replace(runtime={"quant": None})))


@functools.lru_cache(maxsize=16)
def _linears(config: ModelConfig) -> tuple[_Linear, ...]:
    """Every linear weight of `config`: `kernel`s other than the router's and conv1d's, and stacked experts."""
    experts = config.moe.num_experts if config.moe else None
    abstract = _abstract(config)
    out = []
    for path in families.linear_weights(config, abstract):
        leaf = abstract[path]
        name = "/".join(path[:-1]) if path[-1] == "kernel" else "/".join(path)
        rule = rule_for(path, len(leaf.shape), experts, families.family_of(config))
        out.append(_Linear(name, path, rule, tuple(n.removesuffix(".weight") for n in rule.names)))
    return tuple(out)


@dataclass(frozen=True)
class _Module:
    """One linear module of the checkpoint (one per expert for stacked experts) and the linear weights it is
    made of: one, or the parts of a fused tensor in its row order (the Mamba mixer's in_proj)."""

    parts: tuple[_Linear, ...]

    @property
    def path(self) -> str:
        """The recipe path of a single weight; for a fused module the parts' paths joined by ' + '."""
        return " + ".join(part.path for part in self.parts)

    @property
    def modules(self) -> tuple[str, ...]:
        return self.parts[0].modules

    @property
    def stacked(self) -> bool:
        return self.parts[0].stacked


@functools.lru_cache(maxsize=16)
def _modules(config: ModelConfig) -> tuple[_Module, ...]:
    """The linear weights of `config` grouped by checkpoint module (fused parts in their row order)."""
    groups: dict[tuple[str, ...], list[_Linear]] = {}
    for layer in _linears(config):
        groups.setdefault(layer.modules, []).append(layer)
    return tuple(_Module(tuple(sorted(parts, key=lambda p: p.rule.part or 0))) for parts in groups.values())


def _module_spec(module: _Module, recipe: QuantRecipe, pattern: str) -> LinearQuant | None:
    """The one recipe entry of the module's weights; the parts of a fused module must agree."""
    specs = [recipe.linear(part.path, pattern) for part in module.parts]
    if any(spec != specs[0] for spec in specs[1:]):
        raise ValueError(f"layers {module.path} are one checkpoint module ({module.modules[0]}) but the recipe gives "
                         f"them different formats {specs}; give them one rule (e.g. a pattern '*/in_proj_*')")
    return specs[0]


def _layer_algo(path: str, spec: LinearQuant) -> dict[str, Any]:
    """The ModelOpt per-layer config ({"quant_algo", ["group_size"]}) of the layer at `path` with formats `spec`."""
    w, x = spec.weight, spec.input
    wfmt, xfmt = (w.fmt if w else None), (x.fmt if x else None)

    def refuse(why: str) -> ValueError:
        return ValueError(f"layer {path}: weight fmt={wfmt!r}, input fmt={xfmt!r} cannot be exported to the "
                          f"ModelOpt layout: {why}. Supported: {SUPPORTED}")

    if w is None:
        raise refuse("a quantized input needs a quantized weight")
    if wfmt in ("mxfp4", "fp8_e5m2"):
        raise refuse(f"ModelOpt has no serving layout for {wfmt} weights")
    if wfmt in ("nvfp4", "nvfp4_2d"):
        if x is None:
            return {"quant_algo": "W4A16_NVFP4", "group_size": NVFP4_GROUP}
        if xfmt != "nvfp4":
            raise refuse("mixed weight / input formats")
        if not x.static:
            raise refuse("the input uses a dynamic per-tensor amax (TensorQuant.static=False) but the layout "
                         "stores a static input_scale; use static inputs and run nemojax.quant.calibrate")
        return {"quant_algo": "NVFP4", "group_size": NVFP4_GROUP}
    if wfmt == "fp8_e4m3":
        if x is None:
            raise refuse("weight-only FP8 has no ModelOpt algo")
        if xfmt != "fp8_e4m3":
            raise refuse("mixed weight / input formats")
        if not x.static:
            raise refuse("the input uses a dynamic per-tensor amax (TensorQuant.static=False) but the layout "
                         "stores a static input_scale; use static inputs and run nemojax.quant.calibrate")
        return {"quant_algo": "FP8"}
    if wfmt == "mxfp8":
        if xfmt != "mxfp8":
            raise refuse("MXFP8 checkpoints quantize the inputs to mxfp8 too")
        return {"quant_algo": "MXFP8", "group_size": MXFP8_GROUP}
    raise refuse("unknown format")


def _spec_from_algo(algo: str, where: str) -> LinearQuant:
    """The LinearQuant a ModelOpt per-layer algo loads as (calibrated amaxes, clipped STE as ModelOpt's quantizers;
    NVFP4 weights with static block scales, which the checkpoint stores)."""
    nvfp4_w = TensorQuant("nvfp4", static=True, ste="clipped", block_scales="static")
    if algo == "NVFP4":
        return LinearQuant(weight=nvfp4_w, input=TensorQuant("nvfp4", static=True, ste="clipped"))
    if algo == "W4A16_NVFP4":
        return LinearQuant(weight=nvfp4_w)
    if algo == "FP8":
        return LinearQuant(weight=TensorQuant("fp8_e4m3", static=True, ste="clipped"),
                           input=TensorQuant("fp8_e4m3", static=True, ste="clipped"))
    if algo == "MXFP8":
        return LinearQuant(weight=TensorQuant("mxfp8"), input=TensorQuant("mxfp8"))
    raise ValueError(f"{where}: quant_algo={algo!r} is not supported; allowed: {ALGOS}")


# ------------------------------------------------------------------------------------------------- scales


def decode_scale(amax: jax.Array, fmt: str) -> np.ndarray:
    """The per-tensor decode scale our quantizer derives from `amax` (f32 [...]): NVFP4 S_dec = 1/fl(2688/A),
    FP8 1/fl(448/A); computed by `quantize` itself so it is bit-equal to what the model uses. Returns f32 [...]."""
    amax = jnp.asarray(amax, jnp.float32)
    if fmt == "nvfp4":
        q = _quantize(jnp.zeros((*amax.shape, NVFP4_GROUP), jnp.float32), "nvfp4", axis=-1, amax=amax)
        return np.asarray(q.global_scale, np.float32).reshape(amax.shape)
    q = _quantize(jnp.zeros((*amax.shape, 1), jnp.float32), fmt, axis=-1, amax=amax)
    return np.asarray(q.scale, np.float32).reshape(amax.shape)


def amax_for_scale(scale: np.ndarray, fmt: str) -> np.ndarray:
    """An amax (f32 [...]) whose `decode_scale` is bit-equal to the stored decode `scale` (f32 [...]) where one
    exists within a few ulps of scale x (2688 | 448), else scale x (2688 | 448)."""
    scale = np.asarray(scale, np.float32)
    guess = scale * np.float32(6.0 * 448.0 if fmt == "nvfp4" else 448.0)
    bits = guess.view(np.int32)
    cands = np.stack([(bits + k).view(np.float32) for k in _ULP_SEARCH])  # [K, ...]
    cands = np.where(np.isfinite(cands) & (cands > 0), cands, guess[None])
    ok = decode_scale(cands, fmt) == scale[None]
    pick = np.where(ok.any(axis=0), ok.argmax(axis=0), 0)
    return np.take_along_axis(cands, pick[None], axis=0)[0]


def _positive(amax: np.ndarray | None, what: str) -> np.ndarray:
    if amax is None or not np.all(np.isfinite(amax)) or not np.all(amax > 0):
        raise ValueError(f"{what} is not calibrated (value {None if amax is None else np.asarray(amax).tolist()}); "
                         "run nemojax.quant.calibrate on the model before save_quantized")
    return np.asarray(amax, np.float32)


# ------------------------------------------------------------------------------------------------- export


def _swap(x: np.ndarray) -> np.ndarray:
    """Our layout [..., in, out] <-> torch [..., out, in]."""
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def _per_module(layer: _Linear | _Module, value: np.ndarray) -> list[np.ndarray]:
    """A tensor with a leading expert dim (stacked experts) -> one array per checkpoint module."""
    if layer.stacked:
        return [np.array(value[e], order="C") for e in range(value.shape[0])]
    return [value]


def _export_linear(layer: _Module, spec: LinearQuant, flat: Mapping[tuple[str, ...], Any],
                   compute_dtype: jnp.dtype) -> dict[str, np.ndarray]:
    """Checkpoint tensors of one quantized linear module (see the module docstring's table; a fused module's parts
    concatenated along `out`, with one per-tensor scale)."""
    algo = _layer_algo(layer.path, spec)["quant_algo"]
    parts = [jnp.asarray(flat[part.param]).astype(compute_dtype) for part in layer.parts]
    W = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)  # [in, out] or [E, in, out]
    contract = W.ndim - 2
    group = {"NVFP4": NVFP4_GROUP, "W4A16_NVFP4": NVFP4_GROUP, "MXFP8": MXFP8_GROUP}.get(algo)
    if group and W.shape[contract] % group:
        raise ValueError(f"layer {layer.path}: contraction dim {W.shape[contract]} (weight shape {W.shape}) is not a "
                         f"multiple of the {algo} block of {group}; the checkpoint layout has no padding")
    if not bool(jnp.all(jnp.isfinite(W))):
        raise ValueError(f"layer {layer.path}: the weight has NaN or inf values; refusing to export")
    out: dict[str, list[np.ndarray]] = {}

    def weight_amax() -> jax.Array:  # the largest of the parts' (calibrated, else current) amaxes
        amaxes = []
        for part, w in zip(layer.parts, parts, strict=True):
            current = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=(-2, -1))
            static = flat.get(part.state("_amax"))
            amaxes.append(current if static is None else jnp.where(static > 0, static, current))
        return functools.reduce(jnp.maximum, amaxes)

    def input_scale(fmt: str) -> np.ndarray:
        amaxes = [flat.get(part.state("_input_amax")) for part in layer.parts]
        amax = np.max([_positive(None if a is None else np.asarray(a), f"the input amax of layer {part.path}")
                       for a, part in zip(amaxes, layer.parts, strict=True)], axis=0)
        return decode_scale(amax, fmt)

    if algo in ("NVFP4", "W4A16_NVFP4"):
        fmt = spec.weight.fmt
        block = None
        if spec.weight.block_scales == "static":
            blocks = [flat.get(part.state("_block_scale")) for part in layer.parts]
            if any(b is not None and not bool(jnp.any(jnp.asarray(b) != 0)) for b in blocks):
                raise ValueError(f"the static NVFP4 block scales of layer {layer.path} are all zero (not "
                                 "calibrated); run nemojax.quant.calibrate (method='mse') on the model before "
                                 "save_quantized")
            if all(b is not None for b in blocks):
                block = blocks[0] if len(blocks) == 1 else jnp.concatenate([jnp.asarray(b) for b in blocks], -1)
        q = _quantize(W, fmt, axis=contract, amax=weight_amax(), block_scale=block)
        scale = np.asarray(q.scale.astype(jnp.float32))
        if fmt == "nvfp4_2d":  # one scale per 16x16 tile -> the 1x16 layout (each tile scale on its 16 columns)
            scale = np.repeat(scale, NVFP4_GROUP, axis=-1)[..., : W.shape[-1]]
        if not np.all(np.isfinite(scale)):
            raise ValueError(f"layer {layer.path}: NaN block scales; refusing to export")
        codes = _swap(np.asarray(q.data))  # [..., out, in] float4_e2m1fn
        out["weight"] = _per_module(layer, np.asarray(pack_fp4(jnp.asarray(codes))))
        out["weight_scale"] = _per_module(layer, _swap(scale).astype(ml_dtypes.float8_e4m3fn))
        out["weight_scale_2"] = _per_module(layer, np.asarray(q.global_scale, np.float32).reshape(W.shape[:-2]))
        if algo == "NVFP4":
            out["input_scale"] = _per_module(layer, input_scale("nvfp4"))
    elif algo == "FP8":
        q = _quantize(W, "fp8_e4m3", axis=contract, amax=weight_amax())
        out["weight"] = _per_module(layer, _swap(np.asarray(q.data)))
        out["weight_scale"] = _per_module(layer, np.asarray(q.scale, np.float32).reshape(W.shape[:-2]))
        out["input_scale"] = _per_module(layer, input_scale("fp8_e4m3"))
    else:  # MXFP8
        q = _quantize(W, "mxfp8", axis=contract)
        codes = np.asarray(e8m0_to_code(q.scale))
        if np.any(codes == 255):
            raise ValueError(f"layer {layer.path}: NaN block scales; refusing to export")
        out["weight"] = _per_module(layer, _swap(np.asarray(q.data)))
        out["weight_scale"] = _per_module(layer, _swap(codes.astype(np.uint8)))
    tensors = {}
    for field, values in out.items():
        for module, value in zip(layer.modules, values, strict=True):
            tensors[f"{module}.{field}"] = np.array(value, order="C")  # keeps 0-d scalars 0-d
    return tensors


def _kv_tensors(config: ModelConfig, flat: Mapping[tuple[str, ...], Any]) -> dict[str, np.ndarray]:
    """`{attention}.k_proj.k_scale` / `.v_proj.v_scale` of every attention layer (FP8 KV cache)."""
    kv = config.runtime.quant.kv_cache
    if kv.fmt != "fp8_e4m3":
        raise ValueError(f"kv_cache.fmt={kv.fmt!r} cannot be exported: ModelOpt's FP8 KV cache is fp8_e4m3")
    # a static KV recipe gives every layer that caches keys and values its k_amax / v_amax params (nn.attention)
    paths = [p for p in flat if p[-1] == "k_amax"]
    if not kv.static:
        raise ValueError("kv_cache.static=False: the ModelOpt layout stores static k_scale / v_scale; use a recipe "
                         "with kv_cache=TensorQuant('fp8_e4m3', static=True) and run nemojax.quant.calibrate")
    tensors = {}
    for path in paths:
        stem = rule_for(path, 0).names[0].removesuffix("k_amax")
        for name, proj in (("k", "k_proj"), ("v", "v_proj")):
            where = "/".join((*path[:-1], f"{name}_amax"))
            amax = _positive(np.asarray(flat[(*path[:-1], f"{name}_amax")]), f"the KV amax {where}")
            tensors[f"{stem}{proj}.{name}_scale"] = decode_scale(amax, "fp8_e4m3").astype(np.float32)
    return tensors


def quant_config(model: Model) -> dict[str, Any]:
    """The `hf_quant_config.json` dict of `model` (see the module docstring, facts 1 and 7)."""
    config = model.config
    recipe = config.runtime.quant
    if recipe is None:
        raise ValueError("model.config.runtime.quant is None: nothing is quantized; apply a recipe "
                         "(nemojax.quant.apply) or save a high-precision checkpoint with nemojax.save_hf")
    quantized: dict[str, dict[str, Any]] = {}
    excluded: list[str] = []
    for layer in _modules(config):
        spec = _module_spec(layer, recipe, config.pattern)
        if spec is None or (spec.weight is None and spec.input is None):
            excluded.extend(layer.modules)
            continue
        algo = _layer_algo(layer.path, spec)
        quantized.update({module: dict(algo) for module in layer.modules})
    # Other modules a server might build as Linear layers but that stay high precision: routers, conv1d.
    for path in _abstract(config):
        if path[-1] == "kernel" and len(path) > 1 and path[-2] in NOT_LINEAR:
            excluded.append(rule_for(path, 2).names[0].removesuffix(".weight"))
    excluded = list(dict.fromkeys(excluded))  # the parts of a fused module name it once
    if not quantized and recipe.kv_cache is None:
        raise ValueError(f"recipe {recipe.name!r} quantizes no linear layer and no KV cache of this model; save a "
                         "high-precision checkpoint with nemojax.save_hf instead")
    quantization: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}
    kinds = {json.dumps(c, sort_keys=True) for c in quantized.values()}
    if len(kinds) > 1:
        quantization.update(quant_algo="MIXED_PRECISION", quantized_layers=dict(sorted(quantized.items())))
    elif kinds:
        quantization.update(json.loads(kinds.pop()))
    quantization["exclude_modules"] = sorted(excluded)
    if recipe.kv_cache is not None:
        quantization["kv_cache_quant_algo"] = "FP8"
    return {"producer": {"name": PRODUCER, "version": _version()}, "quantization": quantization}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("nemojax")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0"


def _group_config(algo: str, group_size: int | None) -> dict[str, Any]:
    """A compressed-tensors style config group (ModelOpt `_quant_algo_to_group_config`)."""
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size or NVFP4_GROUP}
    if algo == "FP8":
        fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
        return {"input_activations": dict(fp8), "weights": dict(fp8)}
    if algo == "NVFP4":
        return {"input_activations": dict(fp4), "weights": dict(fp4)}
    if algo == "W4A16_NVFP4":
        return {"weights": fp4}
    mx = {"dynamic": False, "num_bits": 8, "type": "float", "group_size": group_size or MXFP8_GROUP}
    return {"input_activations": dict(mx), "weights": dict(mx)}


def hf_quantization_config(qconfig: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's "quantization_config" from a `hf_quant_config.json` dict (ModelOpt
    `convert_hf_quant_config_format`, module docstring fact 2)."""
    q = qconfig["quantization"]
    algo = q.get("quant_algo")
    out: dict[str, Any] = {}
    if algo == "MIXED_PRECISION":
        groups: dict[str, list[str]] = {}
        configs: dict[str, dict[str, Any]] = {}
        for name, layer in q["quantized_layers"].items():
            key = json.dumps(layer, sort_keys=True)
            groups.setdefault(key, []).append(name)
            configs[key] = layer
        out["config_groups"] = {
            f"group_{i}": {**_group_config(configs[key]["quant_algo"], configs[key].get("group_size")),
                           "targets": sorted(names)}
            for i, (key, names) in enumerate(groups.items())}
        out["quantized_layers"] = q["quantized_layers"]
    elif algo is not None:
        out["config_groups"] = {"group_0": {**_group_config(algo, q.get("group_size")), "targets": ["Linear"]}}
    out["ignore"] = list(q.get("exclude_modules") or [])
    if algo is not None:
        out["quant_algo"] = algo
    if q.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = qconfig["producer"]
    out["quant_method"] = "modelopt"
    return out


def quantized_state_dict(model: Model, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Every checkpoint tensor of `model` in NVIDIA's quantized layout: {name: numpy array in torch layout}.

    dtype: the dtype of the high-precision tensors that are in the model's param dtype (default: that dtype;
    float32-by-design params such as the router stay float32).
    """
    config = model.config
    quant_config(model)  # validates the recipe (formats, calibration) before any work
    flat = flatten_dict(model.params)
    tensors = state_dict_from_params(config, model.params)
    if dtype is not None:  # params that stay float32 whatever the param dtype (router kernel and bias) stay so
        probe = config.replace(runtime={"param_dtype": "bfloat16", "quant": None})
        fp32 = {n for rule, leaf in tensor_rules(probe) if leaf.dtype == jnp.float32 for n in rule.names}
        tensors = {k: v.astype(jnp.dtype(dtype)) if k not in fp32 and jnp.issubdtype(v.dtype, jnp.floating) else v
                   for k, v in tensors.items()}
    compute_dtype = jnp.dtype(config.runtime.dtype)
    for layer in _modules(config):
        spec = _module_spec(layer, config.runtime.quant, config.pattern)
        if spec is None or (spec.weight is None and spec.input is None):
            continue
        for name in layer.parts[0].rule.names:
            del tensors[name]
        tensors.update(_export_linear(layer, spec, flat, compute_dtype))
    if config.runtime.quant.kv_cache is not None:
        tensors.update(_kv_tensors(config, flat))
    return tensors


def save_quantized(model: Model, directory: str | os.PathLike, *, dtype: str | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `model` (with `model.config.runtime.quant` set and calibrated) as a ModelOpt unified HF checkpoint:
    config.json (with "quantization_config"), hf_quant_config.json and (sharded) safetensors.

    dtype: export dtype of the high-precision tensors (default: the model's param dtype), e.g. "bfloat16".
    Only these files are written (other files of the folder stay; own files of a previous save that this one
    lacks are removed), staged inside `directory` and committed through a journal (`safetensors_file.save_folder`),
    so a save that fails or is killed at any point (a bad recipe, an uncalibrated amax, a full disk) leaves the
    old or the new checkpoint loadable. Raises CheckpointError for a symlink, file or training-workdir target.
    Raises ValueError for layers whose formats have no ModelOpt layout (see the module docstring).
    """
    qconfig = quant_config(model)
    tensors = quantized_state_dict(model, dtype)
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = jnp.dtype(dtype or model.config.runtime.param_dtype).name
    hf_config["quantization_config"] = hf_quantization_config(qconfig)

    def fill(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
        (staging / QUANT_CONFIG_NAME).write_text(json.dumps(qconfig, indent=4))
        write_tensors(staging, tensors, max_shard_bytes)

    return save_folder(directory, fill)


# ------------------------------------------------------------------------------------------------- import


def is_quantized(directory: Path, hf_config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint folder holds NVIDIA ModelOpt quantized weights (packed NVFP4 / FP8 tensors and their
    scales): an hf_quant_config.json beside config.json, or a "modelopt" quantization_config in it."""
    method = str((hf_config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return (directory / QUANT_CONFIG_NAME).is_file() or method.startswith("modelopt")



def _read_quant_config(directory: Path, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """The "quantization" dict: from hf_quant_config.json, else from config.json's quantization_config."""
    file = directory / QUANT_CONFIG_NAME
    if file.exists():
        quantization = safetensors_file.read_json(file).get("quantization")
        if not isinstance(quantization, Mapping):
            raise CheckpointError(f'{file}: needs a "quantization" object (quant_algo, kv_cache_quant_algo, ...)')
        return dict(quantization)
    qc = hf_config.get("quantization_config")
    if not qc or not str(qc.get("quant_method", "")).lower().startswith("modelopt"):
        raise ValueError(f"{directory} has no {QUANT_CONFIG_NAME} and config.json has no ModelOpt "
                         "quantization_config (quant_method 'modelopt'); load it with nemojax.load_hf")
    kv = qc.get("kv_cache_scheme")
    kv_algo = "FP8" if isinstance(kv, Mapping) and kv.get("num_bits") == 8 and kv.get("type") == "float" else None
    out = {"quant_algo": qc.get("quant_algo"), "kv_cache_quant_algo": kv_algo,
           "exclude_modules": qc.get("ignore", [])}
    if "quantized_layers" in qc:
        out["quantized_layers"] = qc["quantized_layers"]
    if qc.get("quant_algo") in ("NVFP4", "W4A16_NVFP4", "MXFP8"):
        groups = qc.get("config_groups", {})
        sizes = {g.get("weights", {}).get("group_size") for g in groups.values()} - {None}
        if sizes:
            out["group_size"] = sizes.pop()
    return out


def _module_algos(q: Mapping[str, Any], layers: tuple[_Module, ...]) -> dict[str, str | None]:
    """{checkpoint module name: quant_algo or None} for every linear module, from the "quantization" dict."""
    import fnmatch

    algo = q.get("quant_algo")
    algo = None if algo is None else str(algo).upper()
    names = [m for layer in layers for m in layer.modules]
    if algo == "MIXED_PRECISION":
        per = {checkpoint_name(k): v for k, v in (q.get("quantized_layers") or {}).items()}
        if not per:
            raise ValueError("quant_algo='MIXED_PRECISION' needs a non-empty 'quantized_layers'")
        out = {}
        for name in names:
            layer = per.get(name)
            if layer is not None:
                _check_group(layer.get("quant_algo", "").upper(), layer.get("group_size"), name)
            out[name] = None if layer is None else str(layer["quant_algo"]).upper()
        return out
    if algo is None:
        return dict.fromkeys(names)
    _check_group(algo, q.get("group_size"), "quantization")
    excluded = [checkpoint_name(p) for p in q.get("exclude_modules") or []]
    return {name: None if any(name == p or fnmatch.fnmatchcase(name, p) for p in excluded) else algo
            for name in names}


def _check_group(algo: str, group_size: Any, where: str) -> None:
    want = {"NVFP4": NVFP4_GROUP, "W4A16_NVFP4": NVFP4_GROUP, "MXFP8": MXFP8_GROUP}.get(algo)
    if algo not in ALGOS:
        raise ValueError(f"{where}: quant_algo={algo!r} is not supported; allowed: {ALGOS} or MIXED_PRECISION")
    if want is not None and group_size not in (None, 0, want):
        raise ValueError(f"{where}: group_size={group_size!r} for {algo}; allowed: {want}")


def _scalar(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    value = np.asarray(tensors[name], np.float32)
    if value.size != 1:
        raise CheckpointError(f"tensor {name} has shape {list(value.shape)}, expected a scalar")
    return value.reshape(())


def _import_linear(layer: _Module, algo: str, tensors: dict[str, np.ndarray],
                   shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(dequantized weight in our layout f32 `shape`, {state suffix: value}) of one quantized linear module (a
    fused module: its whole weight, parts concatenated along `out`); pops the module's tensors from `tensors`."""
    rule = dataclasses.replace(layer.parts[0].rule, part=None)
    out_in = rule.checkpoint_shape(shape)  # [out, in]
    weights, state_parts = [], {}

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"missing tensor {name} (quant_algo {algo})")
        return tensors.pop(name)

    def expect(name: str, value: np.ndarray, want_shape: tuple[int, ...], dtype: Any) -> None:
        if tuple(value.shape) != tuple(want_shape) or value.dtype != np.dtype(dtype):
            raise CheckpointError(f"tensor {name} is {value.dtype} {list(value.shape)}, expected "
                                     f"{np.dtype(dtype)} {list(want_shape)} for quant_algo {algo}")

    for m in layer.modules:
        w = take(f"{m}.weight")
        if algo in ("NVFP4", "W4A16_NVFP4"):
            expect(f"{m}.weight", w, (out_in[0], out_in[1] // 2), np.uint8)
            s = take(f"{m}.weight_scale")
            expect(f"{m}.weight_scale", s, (out_in[0], out_in[1] // NVFP4_GROUP), ml_dtypes.float8_e4m3fn)
            s2 = _scalar(tensors, f"{m}.weight_scale_2")
            tensors.pop(f"{m}.weight_scale_2")
            q = QArray(unpack_fp4(jnp.asarray(w)), jnp.asarray(s), jnp.asarray(s2).reshape(1, 1), "nvfp4", 1,
                       "float32")
            state_parts.setdefault("_block_scale", []).append(s.astype(np.float32))
            state_parts.setdefault("_amax", []).append(amax_for_scale(s2, "nvfp4"))
            if algo == "NVFP4":
                state_parts.setdefault("_input_amax", []).append(
                    amax_for_scale(_scalar(tensors, f"{m}.input_scale"), "nvfp4"))
                tensors.pop(f"{m}.input_scale")
        elif algo == "FP8":
            expect(f"{m}.weight", w, out_in, ml_dtypes.float8_e4m3fn)
            s = _scalar(tensors, f"{m}.weight_scale")
            tensors.pop(f"{m}.weight_scale")
            q = QArray(jnp.asarray(w), jnp.asarray(s).reshape(1, 1), None, "fp8_e4m3", 1, "float32")
            state_parts.setdefault("_amax", []).append(amax_for_scale(s, "fp8_e4m3"))
            state_parts.setdefault("_input_amax", []).append(
                amax_for_scale(_scalar(tensors, f"{m}.input_scale"), "fp8_e4m3"))
            tensors.pop(f"{m}.input_scale")
        else:  # MXFP8
            expect(f"{m}.weight", w, out_in, ml_dtypes.float8_e4m3fn)
            s = take(f"{m}.weight_scale")
            expect(f"{m}.weight_scale", s, (out_in[0], out_in[1] // MXFP8_GROUP), np.uint8)
            q = QArray(jnp.asarray(w), e8m0_from_code(jnp.asarray(s)), None, "mxfp8", 1, "float32")
            tensors.pop(f"{m}.input_scale", None)
        weights.append(np.asarray(_dequantize(q)))
    kernel = rule.from_checkpoint(weights)

    def ours(parts: list[np.ndarray]) -> np.ndarray:
        return np.stack(parts) if layer.stacked else parts[0]

    state = {k: ours(v) for k, v in state_parts.items()}
    if "_block_scale" in state:  # [out, in/16] per module -> our layout ([in/16, out] or [E, D/16, F])
        state["_block_scale"] = rule.from_checkpoint(state_parts["_block_scale"])
    return kernel, state


def load_quantized(directory: str | os.PathLike, *, strict: bool = False, **config_overrides: Any) -> Model:
    """Loads a ModelOpt unified HF checkpoint (ours or NVIDIA's) as a fake-quantized Model.

    The config's `quant` is a recipe with one rule per quantized layer path (formats from the per-layer
    quant_algo, see `_spec_from_algo`) and an FP8 KV cache if the checkpoint has one; kernels are the dequantized
    weights in the config's param dtype; the state leaves hold the stored scales (NVFP4 block scales as static
    block scales, per-tensor scales as amaxes). `config_overrides` go to `ModelConfig.from_hf` (e.g.
    runtime={"dtype": "bfloat16"}). Raises `CheckpointError` / ValueError naming the offending tensor, field or
    file. A save killed after its commit point is completed first; NaN/inf in the (dequantized) weights warn, or
    with `strict=True` raise (`model_from_state_dict`).
    """
    directory = Path(directory)
    safetensors_file.finish_interrupted_save(directory)
    hf_config = safetensors_file.read_json(directory / CONFIG_NAME)
    q = _read_quant_config(directory, hf_config)
    config = config_from_hf(hf_config, **config_overrides)
    tensors = {checkpoint_name(k): v for k, v in safetensors_file.read_safetensors(directory).items()}
    if config.mtp is not None and not any(k.startswith("mtp.") for k in tensors):
        config = config.replace(mtp=None)  # as load_hf: checkpoints saved by transformers drop the MTP head
    layers = _modules(config)
    algos = _module_algos(q, layers)
    shapes = {path: leaf.shape for path, leaf in _abstract(config).items()}

    rules, state = [], {}
    for layer in layers:
        found = {algos[m] for m in layer.modules}
        if len(found) > 1:
            raise ValueError(f"layer {layer.path}: its experts have different quant_algo {sorted(map(str, found))}; "
                             "nemojax stores stacked experts with one format")
        algo = found.pop()
        if algo is None:
            continue
        widths = [shapes[part.param][-1] for part in layer.parts]
        shape = (*shapes[layer.parts[0].param][:-1], sum(widths))
        kernel, layer_state = _import_linear(layer, algo, tensors, shape)
        rule = dataclasses.replace(layer.parts[0].rule, part=None)
        for name, value in zip(rule.names, rule.to_checkpoint(kernel), strict=True):
            tensors[name] = value  # the dequantized weight, torch layout, under the plain name
        cuts = np.cumsum(widths)[:-1]
        for part in layer.parts:  # a fused module's parts share the scales; block scales split by columns
            rules.append((part.path, _spec_from_algo(algo, part.path)))
        for suffix, value in layer_state.items():
            values = np.split(value, cuts, axis=-1) if suffix == "_block_scale" else [value] * len(layer.parts)
            state.update({part.state(suffix): v for part, v in zip(layer.parts, values, strict=True)})

    kv_algo = q.get("kv_cache_quant_algo")
    kv = None
    if kv_algo is not None:
        if str(kv_algo).upper() != "FP8":
            raise ValueError(f"kv_cache_quant_algo={kv_algo!r} is not supported; allowed: 'FP8' or null")
        kv = TensorQuant("fp8_e4m3", static=True)
        for name in [k for k in tensors if k.endswith((".k_proj.k_scale", ".v_proj.v_scale"))]:
            value = tensors.pop(name)
            which = name[-len("k_scale"):][0]
            stem = name[: -len(f".{which}_proj.{which}_scale")]
            path = _param_prefix(stem, config) + (f"{which}_amax",)
            state[path] = amax_for_scale(np.asarray(value, np.float32).reshape(()), "fp8_e4m3")
    algo_name = str(q.get("quant_algo") or "kv_only").lower()
    recipe = QuantRecipe(f"modelopt_{algo_name}", rules=tuple(rules), kv_cache=kv)
    config = config.replace(runtime={"quant": recipe})
    model = model_from_state_dict(config, tensors, strict=strict)
    flat = flatten_dict(model.params)
    for path, value in state.items():
        if path not in flat:
            raise CheckpointError(f"quantization state {'/'.join(path)} has no place in the model (config "
                                     f"pattern {config.pattern!r}, recipe {recipe.name!r})")
        want = tuple(flat[path].shape)
        if tuple(np.shape(value)) != want:
            raise CheckpointError(f"quantization state {'/'.join(path)} has shape {list(np.shape(value))}, "
                                     f"expected {list(want)}")
        flat[path] = jnp.asarray(value, flat[path].dtype)
    missing = [p for p, v in flat.items() if is_state(p[-1]) and p[-1] in ("k_amax", "v_amax") and p not in state]
    if missing:
        raise CheckpointError("FP8 KV cache without scales for: " + ", ".join("/".join(p) for p in missing))
    return Model(config, unflatten_dict(flat))


def _param_prefix(stem: str, config: ModelConfig) -> tuple[str, ...]:
    """Checkpoint module name (`backbone.layers.3.mixer`, `mtp.layers.0.mixer`) -> its param path prefix."""
    parts = stem.split(".")
    if parts[:2] == ["backbone", "layers"] and len(parts) == 4:
        return (f"layers_{parts[2]}", parts[3])
    if parts[:2] == ["mtp", "layers"] and len(parts) >= 4:
        return ("mtp", f"layers_{parts[2]}", *parts[3:])
    raise CheckpointError(f"KV scale module {stem!r} is not an attention layer of this model "
                             f"(pattern {config.pattern!r})")
