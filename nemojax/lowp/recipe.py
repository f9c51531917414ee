"""Quantization recipes: which linear layers get which low-precision format (docs/formats.md 5, 6).

A `QuantRecipe` is static data carried by `ModelConfig.runtime.quant`. Every linear layer asks it for its `LinearQuant`
with its module path (`layers_3/mixer/in_proj_x`, `layers_1/mixer/experts/up_proj`, `mtp/layers_0/mixer/q_proj`,
`lm_head`); `None` means the layer stays in the model's own precision (bfloat16 / float32).

Resolution order: layers kept by position (`keep_first_layers`, `keep_last_layers`, `keep_last_fraction`,
`keep_before_attention`) stay high precision; then the first `rules` pattern (fnmatch over the path) that
matches decides; else `default`. Non-linear parameters (embeddings, norms, conv1d, the router, the SSM's A, D,
dt) are never quantized.

Quantization state the recipe asks for lives in the params, beside the weight `W` of module `M` (float32, frozen:
zero gradient, never decayed):

    M/W_input_amax    calibrated per-tensor amax of the layer's input   (TensorQuant.static on `input`)
    M/W_amax          calibrated per-tensor amax of the weight           (TensorQuant.static on `weight`)
    M/W_block_scale   NVFP4 block decode scales of the weight (E4M3 values), W's shape with the contraction
                      axis divided by 16                                  (TensorQuant.block_scales == "static")

with W = `kernel` for a dense layer and `up_proj` / `down_proj` for stacked experts, whose amaxes have one entry
per expert ([E]). An amax of 0 means "not calibrated": the layer then uses the current (dynamic) amax.
Attention layers with a quantized KV cache and `kv_cache.static` hold `k_amax` and `v_amax`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping
from typing import Any

from nemojax.lowp.formats import FORMATS

STE_KINDS = ("pass", "clipped")
ROUNDINGS = ("rne", "stochastic")
BLOCK_SCALES = ("dynamic", "static")
BLOCKED_FORMATS = ("nvfp4", "nvfp4_2d")  # formats with E4M3 block scales that calibration may freeze
# Names of the frozen quantization-state leaves (suffixes of the weight's name; see the module docstring).
STATE_SUFFIXES = ("_input_amax", "_amax", "_block_scale")
KV_STATE = ("k_amax", "v_amax")
# Modules with a `kernel` that are not linear layers and are never quantized: the MoE router and the Mamba mixer's
# depthwise convs (one per part x, B, C; see nemojax.nn.mamba2).
NOT_LINEAR = ("gate", "conv1d", "conv1d_x", "conv1d_B", "conv1d_C")
# The flax collection calibration runs make mutable: quantized layers then run in high precision and sow the
# amax of each quantized input under its state name (`kernel_input_amax`, `k_amax`, ...).
CALIBRATION = "quant_stats"


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class TensorQuant:
    """How one GEMM operand is quantized.

    fmt: one of FORMATS. static: use a calibrated per-tensor amax (a param) instead of the current one.
    ste: backward of the fake quantizer, "pass" (identity) or "clipped" (zero beyond the amax).
    rounding: "rne" or "stochastic" (gradients in the NVFP4 training recipe; needs an rng).
    block_scales: "dynamic" (from the current values) or "static" (weights only: NVFP4 block scales frozen by
    MSE calibration, a param).
    """

    fmt: str
    static: bool = False
    ste: str = "pass"
    rounding: str = "rne"
    block_scales: str = "dynamic"

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            _fail("fmt", self.fmt, f"must be one of {FORMATS}")
        if self.ste not in STE_KINDS:
            _fail("ste", self.ste, f"must be one of {STE_KINDS}")
        if self.rounding not in ROUNDINGS:
            _fail("rounding", self.rounding, f"must be one of {ROUNDINGS}")
        if self.block_scales not in BLOCK_SCALES:
            _fail("block_scales", self.block_scales, f"must be one of {BLOCK_SCALES}")
        if self.static and self.fmt.startswith("mx"):
            _fail("static", True, f"fmt={self.fmt!r} has no per-tensor scale to calibrate (MX block scales are "
                  "computed from the values); use static=False")
        if self.block_scales == "static" and self.fmt not in BLOCKED_FORMATS:
            _fail("block_scales", self.block_scales, f"'static' needs an NVFP4 format {BLOCKED_FORMATS}, "
                  f"not fmt={self.fmt!r}")


@dataclasses.dataclass(frozen=True)
class LinearQuant:
    """The formats of one linear layer y = x @ W.

    weight / input: the forward operands (None: kept in high precision). grad: the format of the output gradient
    in the backward GEMMs ("quantized training", docs/formats.md 5); None means the backward runs in high precision on
    the straight-through gradient (QAT / QAD). rht: random Hadamard transform on the inputs of the weight-gradient GEMM
    (NVFP4 training).
    """

    weight: TensorQuant | None = None
    input: TensorQuant | None = None
    grad: TensorQuant | None = None
    rht: bool = False

    def __post_init__(self) -> None:
        for name in ("weight", "input", "grad"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, TensorQuant):
                _fail(name, value, "must be a TensorQuant or None")
        if self.input is not None and self.input.block_scales == "static":
            _fail("input.block_scales", "static", "only weights can have static block scales")
        if self.grad is not None and (self.weight is None or self.input is None):
            _fail("grad", self.grad.fmt, "quantized gradients need both weight and input quantized")
        if self.rht and self.grad is None:
            _fail("rht", True, "the Hadamard transform belongs to the quantized weight-gradient GEMM; set grad")


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """Which layers get which formats. See the module docstring for the resolution order."""

    name: str
    default: LinearQuant | None = None
    rules: tuple[tuple[str, LinearQuant | None], ...] = ()
    keep_first_layers: int = 0
    keep_last_layers: int = 0
    keep_last_fraction: float = 0.0
    keep_before_attention: bool = False
    kv_cache: TensorQuant | None = None

    def __post_init__(self) -> None:
        if self.default is not None and not isinstance(self.default, LinearQuant):
            _fail("default", self.default, "must be a LinearQuant or None")
        for i, rule in enumerate(self.rules):
            if (not isinstance(rule, tuple) or len(rule) != 2 or not isinstance(rule[0], str)
                    or not (rule[1] is None or isinstance(rule[1], LinearQuant))):
                _fail(f"rules[{i}]", rule, "must be a (path pattern, LinearQuant | None) pair")
        for name in ("keep_first_layers", "keep_last_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be a non-negative integer")
        if not 0.0 <= self.keep_last_fraction <= 1.0:
            _fail("keep_last_fraction", self.keep_last_fraction, "must be in [0, 1]")
        if self.kv_cache is not None:
            if not isinstance(self.kv_cache, TensorQuant):
                _fail("kv_cache", self.kv_cache, "must be a TensorQuant or None")
            if not self.kv_cache.fmt.startswith("fp8"):
                _fail("kv_cache.fmt", self.kv_cache.fmt, "must be 'fp8_e4m3' or 'fp8_e5m2' (per-tensor)")

    # ---------------------------------------------------------------- resolution

    def kept_layers(self, pattern: str) -> frozenset[int]:
        """Indices of the main layers (of `pattern`, one char per layer) kept in high precision by position."""
        n = len(pattern)
        last = max(self.keep_last_layers, math.ceil(self.keep_last_fraction * n - 1e-9))
        kept = set(range(min(self.keep_first_layers, n))) | set(range(max(n - last, 0), n))
        if self.keep_before_attention:
            kept |= {i for i in range(n) if pattern[i] == "*"}
            kept |= {i - 1 for i in range(1, n) if pattern[i] == "*"}
        return frozenset(kept)

    def linear(self, path: str | tuple[str, ...], pattern: str) -> LinearQuant | None:
        """The formats of the linear layer at `path` in a model whose main layers follow `pattern`."""
        path = path if isinstance(path, str) else "/".join(path)
        match = re.match(r"layers_(\d+)/", path)
        if match and int(match.group(1)) in self.kept_layers(pattern):
            return None
        for glob, spec in self.rules:
            if fnmatch.fnmatchcase(path, glob):
                return spec
        return self.default

    def describe(self, paths: list[str], pattern: str) -> dict[str, str]:
        """path -> a short format summary ("W nvfp4 / A nvfp4", "bf16"), for reports."""
        out = {}
        for path in paths:
            spec = self.linear(path, pattern)
            if spec is None:
                out[path] = "high precision"
            else:
                parts = [f"{label} {t.fmt}" for label, t in (("W", spec.weight), ("A", spec.input),
                                                             ("G", spec.grad)) if t is not None]
                out[path] = " / ".join(parts) or "high precision"
        return out

    # ---------------------------------------------------------------- (de)serialisation for run.json

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantRecipe:
        """The inverse of `to_dict` (also after a JSON round trip, where tuples became lists)."""

        def tensor(t: Mapping[str, Any] | None) -> TensorQuant | None:
            return None if t is None else TensorQuant(**t)

        def linear(spec: Mapping[str, Any] | None) -> LinearQuant | None:
            if spec is None:
                return None
            return LinearQuant(weight=tensor(spec.get("weight")), input=tensor(spec.get("input")),
                               grad=tensor(spec.get("grad")), rht=bool(spec.get("rht", False)))

        d = dict(d)
        d["default"] = linear(d.get("default"))
        d["rules"] = tuple((glob, linear(spec)) for glob, spec in d.get("rules", ()))
        d["kv_cache"] = tensor(d.get("kv_cache"))
        return cls(**d)


def is_state(name: str) -> bool:
    """Whether a param leaf name is frozen quantization state (calibrated amax or static block scale)."""
    return name in KV_STATE or name.endswith(STATE_SUFFIXES)
