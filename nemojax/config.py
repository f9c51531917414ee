"""Model configuration: frozen, validated, hashable; and the Hugging Face config.json mapping.

A `ModelConfig` describes one NemotronH-family network (hybrid Mamba-2 / attention / MLP / MoE stack, optional
MTP head). Its sub-configs hold the fields of one kind of mixer and are `None` when the pattern has no layer of
that kind. How the network runs (compute and parameter dtypes, rematerialisation, layer scans, kernel choices, the
quantization recipe) is kept apart in `config.runtime`, a `Runtime`: a checkpoint's identity (`architecture()`,
config.json) never depends on it. Every field is checked when the config is built; an inconsistent field raises a
`ValueError` that names it, the value and what is allowed, so nothing downstream ever sees a half-valid config.

`ModelConfig.from_hf(d)` accepts every spelling of a NemotronH `config.json` (docs/numerics.md 10):
`hybrid_override_pattern` or `layers_block_type` / `layer_types` (legacy "mamba"/"attention" or new
"linear_attention"/"full_attention" names; spellings given together must agree), `head_dim` or
`attention_head_dim`, the `mamba_*` aliases and `time_step_limit`. A malformed value raises a ValueError naming its
config.json key.
`to_hf()` writes a dict that transformers' `NemotronHConfig` and NVIDIA's remote code both load.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar

from nemojax import families
from nemojax.lowp.recipe import QuantRecipe

DTYPES = ("float32", "bfloat16", "float16")
# config.json key of a NemotronH variant with RoPE in its attention layers (a nemojax extension; see to_hf)
ROPE_KEY = "nemojax_rope"
LAYER_CONFIGS_KEY = "nemojax_layer_configs"  # config.json: a heterogeneous stack's per-layer widths (nemojax only)
MOE_IMPLS = ("auto", "dense", "ragged")
SSD_IMPLS = ("chunked", "sequential")
KERNEL_IMPLS = ("xla", "pallas", "auto")  # pallas_kernels.dispatch.IMPLS
ATTENTION_IMPLS = (*KERNEL_IMPLS, "cudnn")  # + jax.nn.dot_product_attention's cuDNN fused kernel
# Activation checkpointing per layer: "none", "full" (save nothing), or a jax.checkpoint_policies name.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Above this many routed experts `moe_impl="auto"` switches from the dense one-hot einsum to sorted ragged_dot.
DENSE_MOE_MAX_EXPERTS = 16


class ConfigFieldError(ValueError):
    """A config field with a value outside what is allowed. `field` is its dotted name ("mamba.time_step_min"),
    so `ModelConfig.from_hf` can say which config.json key the value came from."""

    def __init__(self, field: str, value: Any, allowed: str, message: str | None = None) -> None:
        super().__init__(message or f"{field}={value!r} is invalid: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigFieldError(field, value, allowed)


# What each kind of field holds, as said in an error message. bool is an int subclass (True would pass as 1, and
# "true" from a hand-written config.json is truthy), so ints and floats exclude it explicitly.
_KIND_NAMES = {"int": "an integer", "float": "a finite number", "bool": "a bool (true/false)", "str": "a string"}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        # numbers.Real: numpy scalars too (stored back as a Python float by _check)
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"bool": bool, "str": str}[kind])


def _check(obj: Any, prefix: str, name: str, kind: str, allowed: str = "", ok: Any = None,
           optional: bool = False) -> None:
    """Validates one field, `obj.<name>`: it must be None (only if `optional`) or a value of `kind` ("int": an int,
    not a bool; "float": a finite real number, not a bool, stored back as a Python float; "bool"; "str") for which
    `ok(value)` holds.
    Otherwise raises ConfigFieldError "<prefix><name>=<value> is invalid: must be <kind> <allowed>"."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if not _is_kind(value, kind) or (ok is not None and not ok(value)):
        _fail(f"{prefix}{name}", value,
              f"must be {_KIND_NAMES[kind]}{' ' + allowed if allowed else ''}{' or None' if optional else ''}")
    if kind == "float":
        object.__setattr__(obj, name, float(value))  # 1 and 1.0 compare equal; store one type for repr/json


def _positive(value: Any) -> bool:
    return value > 0


def _require_positive(prefix: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        _check(obj, prefix, name, "int", "> 0", _positive)


def _require_bools(prefix: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        _check(obj, prefix, name, "bool")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Mamba-2 mixer sizes. I = num_heads * head_dim; B/C have n_groups groups of state_size."""

    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj bias (HF `use_bias`)
    # dt is clipped to this range after softplus; (0, inf) is the reference behaviour (docs/numerics.md 3).
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Used only to initialise dt_bias for training from scratch.
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4

    def __post_init__(self) -> None:
        _require_positive("mamba.", self, ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel",
                                           "chunk_size"))
        if self.num_heads % self.n_groups:
            _fail("mamba.num_heads", self.num_heads, f"must be divisible by mamba.n_groups={self.n_groups}")
        _require_bools("mamba.", self, ("use_conv_bias", "proj_bias"))
        limit = self.time_step_limit
        numeric = isinstance(limit, (tuple, list)) and all(_is_kind(v, "int") or isinstance(v, float) for v in limit)
        if not numeric or len(limit) != 2 or not (0.0 <= limit[0] <= limit[1]) or math.isinf(limit[0]):
            _fail("mamba.time_step_limit", limit, "must be (lo, hi) with 0 <= lo <= hi, lo finite (hi may be inf)")
        object.__setattr__(self, "time_step_limit", tuple(float(v) for v in limit))
        _check(self, "mamba.", "time_step_max", "float", "> 0", _positive)
        _check(self, "mamba.", "time_step_min", "float", f"in (0, time_step_max={self.time_step_max}]",
               lambda v: 0 < v <= self.time_step_max)
        _check(self, "mamba.", "time_step_floor", "float", ">= 0", lambda v: v >= 0)

    @property
    def inner_size(self) -> int:
        """I = H * P, the width of x, z and the gated norm."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the causal conv: x, B and C."""
        return self.inner_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Output width of in_proj: z, xBC and one dt per head."""
        return self.inner_size + self.conv_dim + self.num_heads


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Grouped-query attention. NemotronH uses no positional encoding (rope_theta=None)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    bias: bool = False
    rope_theta: float | None = None
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        _require_positive("attention.", self, ("num_heads", "num_kv_heads", "head_dim"))
        if self.num_heads % self.num_kv_heads:
            _fail("attention.num_heads", self.num_heads,
                  f"must be divisible by attention.num_kv_heads={self.num_kv_heads}")
        _require_bools("attention.", self, ("bias",))
        _check(self, "attention.", "rope_theta", "float", "> 0", _positive, optional=True)  # None: no RoPE
        _check(self, "attention.", "partial_rotary_factor", "float", "in (0, 1]", lambda v: 0 < v <= 1)
        if self.rope_theta is not None:
            rotary = int(self.head_dim * self.partial_rotary_factor)
            if rotary <= 0 or rotary % 2:
                _fail("attention.partial_rotary_factor", self.partial_rotary_factor,
                      f"must be in (0, 1] and give an even rotary width of head_dim={self.head_dim}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sigmoid-routed MoE with relu2 experts, a shared expert and an optional latent projection."""

    num_experts: int
    top_k: int
    intermediate_size: int
    shared_intermediate_size: int
    n_shared_experts: int = 1
    latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        _require_positive("moe.", self, ("num_experts", "top_k", "intermediate_size", "n_group", "topk_group"))
        _check(self, "moe.", "n_shared_experts", "int", ">= 0", lambda v: v >= 0)
        _check(self, "moe.", "shared_intermediate_size", "int",
               "> 0 (n_shared_experts > 0)" if self.n_shared_experts else ">= 0",
               _positive if self.n_shared_experts else lambda v: v >= 0)
        _check(self, "moe.", "latent_size", "int", "> 0", _positive, optional=True)
        _check(self, "moe.", "routed_scaling_factor", "float", "> 0", _positive)
        _require_bools("moe.", self, ("norm_topk_prob",))
        if self.num_experts % self.n_group:
            _fail("moe.num_experts", self.num_experts, f"must be divisible by moe.n_group={self.n_group}")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            _fail("moe.n_group", self.n_group, "must leave at least 2 experts per group (groups score by top-2)")
        if self.topk_group > self.n_group:
            _fail("moe.topk_group", self.topk_group, f"must be <= moe.n_group={self.n_group}")
        selectable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > selectable:
            _fail("moe.top_k", self.top_k, f"must be <= the {selectable} experts in the kept groups")


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction head: `num_layers` depths, each a stack of blocks given by `pattern`."""

    num_layers: int = 1
    pattern: str = "*E"

    def __post_init__(self) -> None:
        _require_positive("mtp.", self, ("num_layers",))
        _check(self, "mtp.", "pattern", "str", "of layer kinds, not empty", bool)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a network runs, not what it is: none of these fields changes the function a checkpoint computes beyond
    rounding, so they are never part of its identity (config.json, a run's fingerprint) and may differ between
    the run that wrote a checkpoint and the one that reads it."""

    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    remat: str = "none"  # activation checkpointing per layer, one of REMAT_POLICIES
    # Run the pattern's repeated runs of layers as scans (nemojax.models.scan): XLA compiles each run's body once
    # instead of every layer. The module's params are then in the scanned layout (stacked on leading `layers`
    # axes); nemojax.models.scan converts to and from the checkpoint-named unrolled layout.
    scan_layers: bool = False
    quant: QuantRecipe | None = None  # low-precision formats per linear layer (nemojax.quant.apply)
    # GEMMs of quantized linear layers whose formats a Pallas kernel covers (pallas_kernels.quant_matmul):
    # "xla" (fake-quantized operands), "pallas" or "auto" (the kernel on the backends where it is validated; see
    # pallas_kernels.dispatch)
    matmul_impl: str = "auto"
    # the Mamba-2 scan of a prefill or training forward: "chunked" (the SSD algorithm) or "sequential" (the
    # recurrence, an oracle)
    ssd_impl: str = "chunked"
    # the chunked scan's implementation: "xla" (nemojax.nn.ssd), "pallas" (pallas_kernels.ssd_scan) or "auto"
    scan_impl: str = "auto"
    # the Mamba-2 single-token decode step: "xla", "pallas" (pallas_kernels.ssd_update) or "auto"
    mamba_decode_impl: str = "auto"
    # causal self-attention without a cache (training, fresh prefill): "xla" (nemojax.nn.attention), "pallas"
    # (JAX's own Pallas flash attention, pallas_kernels.attention), "cudnn" or "auto"
    attention_impl: str = "auto"
    # one attention decode step over the KV cache: "xla" (nemojax.nn.attention.cached_attention, reads the whole
    # cache with a mask), "pallas" (JAX's split-K decode kernel reading only the filled part,
    # pallas_kernels.decode_attention; bf16/f16 caches whose length is a multiple of 16, else XLA) or "auto"
    attention_decode_impl: str = "auto"
    # routed experts: "dense" (one-hot einsum over all experts), "ragged" (tokens sorted by expert, ragged_dot) or
    # "auto" (dense up to DENSE_MOE_MAX_EXPERTS experts)
    moe_impl: str = "auto"

    def __post_init__(self) -> None:
        choices = (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                   ("scan_layers", (False, True)), ("matmul_impl", KERNEL_IMPLS), ("ssd_impl", SSD_IMPLS),
                   ("scan_impl", KERNEL_IMPLS), ("mamba_decode_impl", KERNEL_IMPLS),
                   ("attention_impl", ATTENTION_IMPLS), ("attention_decode_impl", KERNEL_IMPLS),
                   ("moe_impl", MOE_IMPLS))
        for field, allowed in choices:
            value = getattr(self, field)
            if type(value) is not type(allowed[0]) or value not in allowed:
                _fail(f"runtime.{field}", value, f"must be one of {allowed}")
        if self.quant is not None and not isinstance(self.quant, QuantRecipe):
            _fail("runtime.quant", self.quant, "must be a QuantRecipe or None")

    def resolved_moe_impl(self, num_experts: int) -> str:
        """"dense" or "ragged" for a MoE layer of `num_experts` routed experts."""
        if self.moe_impl != "auto":
            return self.moe_impl
        return "dense" if num_experts <= DENSE_MOE_MAX_EXPERTS else "ragged"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A NemotronH-family network. `pattern` has one character per layer: M (Mamba-2), * (attention),
    - (relu2 MLP), E (MoE). A family that builds on this stack subclasses it, adds its fields and sets `KINDS`
    (the layer kinds its pattern may use, each registered in `nemojax.families`)."""

    KINDS: ClassVar[str] = "M*-E"
    MODEL_TYPE: ClassVar[str] = "nemotron_h"  # config.json's model_type

    vocab_size: int
    hidden_size: int
    pattern: str
    mamba: MambaConfig | None = None
    attention: AttentionConfig | None = None
    intermediate_size: int | None = None  # width of the '-' MLP layers
    moe: MoEConfig | None = None
    mtp: MTPConfig | None = None
    mlp_bias: bool = False
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2  # a tuple: several ids end generation (config.json's list)
    pad_token_id: int | None = 0
    # A heterogeneous stack: per layer of `pattern`, None (the fields above) or that layer's own value of its kind's
    # config field (an int intermediate_size for '-', a MambaConfig / AttentionConfig / MoEConfig, or a dict of
    # changes to the global one); what `layer(i)` builds layer i from. Empty: every layer alike.
    layer_configs: tuple = ()
    runtime: Runtime = Runtime()  # how it runs (dtype, remat, kernels, quantization), not what it is

    def __post_init__(self) -> None:
        # sub-config types first: the pattern checks below read mtp.pattern
        for field, cls in (("mamba", MambaConfig), ("attention", AttentionConfig), ("moe", MoEConfig),
                           ("mtp", MTPConfig), ("runtime", Runtime)):
            value = getattr(self, field)
            if (value is None and field == "runtime") or (value is not None and not isinstance(value, cls)):
                _fail(field, value, f"must be a {cls.__name__}" + ("" if field == "runtime" else " or None"))
        _require_positive("", self, ("vocab_size", "hidden_size", "max_position_embeddings"))
        patterns = (("pattern", self.pattern),) + ((("mtp.pattern", self.mtp.pattern),) if self.mtp else ())
        for field, pattern in patterns:
            bad = sorted(set(pattern) - set(self.KINDS)) if isinstance(pattern, str) else [pattern]
            if not pattern or bad:
                _fail(field, pattern, f"must be a non-empty string over the kinds {_kind_names(self.KINDS)} "
                                      f"(found {bad})")
        kinds = set(self.pattern) | (set(self.mtp.pattern) if self.mtp else set())
        for char in self.KINDS:
            entry = families.kind(char)
            if char in kinds and entry.config_field and getattr(self, entry.config_field) is None:
                _fail(entry.config_field, None, f"is required because the pattern has '{char}' ({entry.name}) layers")
        _check(self, "", "intermediate_size", "int", "> 0" + (" (the pattern has '-' MLP layers)" if "-" in kinds
                                                              else ""), _positive, optional="-" not in kinds)
        _require_bools("", self, ("mlp_bias", "tie_word_embeddings"))
        # eps <= 0 or inf makes every RMSNorm output 0 or nan: constant logits, not an error
        _check(self, "", "norm_eps", "float", "> 0", _positive)
        _check(self, "", "initializer_range", "float", "> 0", _positive)
        in_vocab = f"in [0, vocab_size={self.vocab_size})"
        for name in ("bos_token_id", "pad_token_id"):
            _check(self, "", name, "int", in_vocab, lambda v: 0 <= v < self.vocab_size, optional=True)
        self._check_eos(in_vocab)
        if self.tie_word_embeddings:
            _fail("tie_word_embeddings", True, "NemotronH checkpoints are untied; only False is supported")
        self._check_layer_configs()

    def _check_layer_configs(self) -> None:
        """layer_configs: empty, or one entry per layer, each None or a valid value of its kind's config field
        (dicts of changes become sub-configs; entries equal to the global value become None, and all-None
        becomes empty, so one architecture has one config)."""
        entries = self.layer_configs
        if not isinstance(entries, (tuple, list)) or (entries and len(entries) != self.num_layers):
            _fail("layer_configs", entries, f"must be a list with one entry per layer of pattern ({self.num_layers}), "
                                            "or empty")
        out = []
        for i, (char, value) in enumerate(zip(self.pattern, entries, strict=False)):
            name, field = f"layer_configs[{i}]", families.kind(char).config_field
            current = None if field is None else getattr(self, field)
            if value is not None and field is None:
                _fail(name, value, f"must be None: '{char}' layers have no config of their own")
            if value is not None and isinstance(current, int):
                if not (_is_kind(value, "int") and value > 0):
                    _fail(name, value, f"must be None or a positive int ({field} of that '{char}' layer)")
            elif isinstance(value, Mapping):
                value = _replace_fields(name, current, value)
            elif value is not None and not isinstance(value, type(current)):
                _fail(name, value, f"must be None, {type(current).__name__}(...) or a dict of changes to {field}")
            out.append(None if value == current else value)
        object.__setattr__(self, "layer_configs", tuple(out) if any(v is not None for v in out) else ())
        if self.layer_configs and self.runtime.scan_layers:
            _fail("runtime.scan_layers", True, "must be False for a heterogeneous stack (layer_configs): a scan "
                                               "stacks layers of one shape")

    def layer(self, i: int) -> ModelConfig:
        """The config layer i of `pattern` is built from: this one with that layer's `layer_configs` entry (itself
        when the stack is homogeneous)."""
        if not self.layer_configs:
            return self
        value, changes = self.layer_configs[i], {"layer_configs": ()}
        if value is not None:
            changes[families.kind(self.pattern[i]).config_field] = value
        return dataclasses.replace(self, **changes)

    def _check_eos(self, in_vocab: str) -> None:
        """eos_token_id: None, one id, or a non-empty list / tuple of ids (stored as a tuple, so the config stays
        hashable), every id in the vocabulary."""
        eos = self.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if eos is None:
            return
        if not ids or not all(_is_kind(v, "int") and 0 <= v < self.vocab_size for v in ids):
            _fail("eos_token_id", eos, f"must be an integer {in_vocab}, a non-empty list of them, or None")
        if isinstance(eos, (list, tuple)):
            object.__setattr__(self, "eos_token_id", tuple(int(v) for v in eos))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (empty when eos_token_id is None)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def replace(self, **changes: Any) -> ModelConfig:
        """A new validated config with `changes` applied (sub-configs, `runtime` among them, may be given as dicts
        of changes: `config.replace(runtime={"dtype": "bfloat16"})`)."""
        for name in ("runtime", "mamba", "attention", "moe", "mtp"):
            if isinstance(changes.get(name), Mapping):
                current = getattr(self, name)
                if current is None:
                    raise ValueError(f"{name} is None; pass a full {name} config instead of a dict of changes")
                changes[name] = _replace_fields(name, current, changes[name])
        return dataclasses.replace(self, **changes)

    def architecture(self) -> ModelConfig:
        """This config with the default runtime: what a checkpoint is, whatever runs it."""
        return dataclasses.replace(self, runtime=Runtime())

    # ------------------------------------------------------------------ Hugging Face config.json mapping

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a NemotronH `config.json` dict. `overrides` replace parsed fields or set
        nemojax-only ones (`runtime=Runtime(dtype="bfloat16")`; a dict of runtime fields also works).

        A malformed value raises ValueError naming the config.json key it came from (and the field it sets)."""
        if not isinstance(hf, Mapping):
            raise ValueError(f"config.json must be a dict (a JSON object), got {type(hf).__name__}")
        sources: dict[str, str] = {}  # field ("mamba.time_step_min") -> the config.json key that gave it
        if isinstance(overrides.get("runtime"), Mapping):
            overrides["runtime"] = _replace_fields("runtime", Runtime(), overrides["runtime"])
        try:
            return cls._build_from_hf(dict(hf), sources, overrides)
        except ConfigFieldError as error:
            key = sources.get(error.field)
            # an error in an override (or a sub-config it replaced) is the caller's, not config.json's
            if key is None or any(error.field == n or error.field.startswith(n + ".") for n in overrides):
                raise
            raise ConfigFieldError(error.field, error.value, error.allowed, message=(
                f"config.json {key}={error.value!r} is invalid (sets {cls.__name__}.{error.field}): "
                f"{error.allowed}")) from None

    @classmethod
    def _build_from_hf(cls, d: dict[str, Any], sources: dict[str, str], overrides: dict[str, Any]) -> ModelConfig:
        """from_hf's parse: `sources` is filled with the config.json key behind each field as it is read."""
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            _fail("model_type", d["model_type"], f"must be {cls.MODEL_TYPE!r} for {cls.__name__} (nemojax.load_hf "
                  "picks the config class by model_type)")
        pattern = _parse_pattern(d, "hybrid_override_pattern", ("layers_block_type", "layer_types"), kinds=cls.KINDS)
        n_layers = d.get("num_hidden_layers")
        has_list = any(d.get(key) is not None for key in ("layers_block_type", "layer_types"))
        if not has_list and n_layers is not None and n_layers != len(pattern):
            _fail("num_hidden_layers", n_layers, f"must equal the pattern length {len(pattern)} ({pattern!r})")

        def first(field: str, *names: str, default: Any = None) -> Any:
            """The value of the first of `names` present (not null) in config.json, else `default`."""
            sources[field] = names[0]
            for name in names:
                if name in d and d[name] is not None:
                    sources[field] = name
                    return d[name]
            return default

        def required(field: str, *names: str) -> Any:
            value = first(field, *names)
            if value is None:
                raise ValueError(f"config.json is missing {names[0]!r}"
                                 + (f" (or {', '.join(names[1:])})" if names[1:] else ""))
            return value

        mtp = None
        n_mtp = first("mtp.num_layers", "num_nextn_predict_layers", "mtp_num_layers", default=0)
        if n_mtp != 0:  # not `if n_mtp`: "1", 1.5 or -1 must reach MTPConfig's check, not be read as a count
            mtp_pattern = _parse_pattern(d, "mtp_hybrid_override_pattern", ("mtp_layers_block_type",),
                                         default="*E", kinds=cls.KINDS)
            mtp = MTPConfig(num_layers=n_mtp, pattern=mtp_pattern)
        kinds = set(pattern) | (set(mtp.pattern) if mtp else set())

        mamba = None
        if "M" in kinds:
            limit = first("mamba.time_step_limit", "time_step_limit", "mamba_dt_limit", default=(0.0, math.inf))
            mamba = MambaConfig(
                num_heads=required("mamba.num_heads", "mamba_num_heads"),
                head_dim=required("mamba.head_dim", "mamba_head_dim"),
                state_size=required("mamba.state_size", "ssm_state_size", "mamba_state_dim", "mamba_d_state"),
                n_groups=first("mamba.n_groups", "n_groups", "mamba_n_groups", default=8),
                conv_kernel=first("mamba.conv_kernel", "conv_kernel", "mamba_d_conv", default=4),
                chunk_size=first("mamba.chunk_size", "chunk_size", "mamba_chunk_size", default=128),
                use_conv_bias=first("mamba.use_conv_bias", "use_conv_bias", "mamba_conv_bias", default=True),
                proj_bias=first("mamba.proj_bias", "use_bias", "mamba_proj_bias", default=False),
                time_step_limit=[_json_float(v) for v in limit] if isinstance(limit, (list, tuple)) else limit,
                time_step_min=_json_float(first("mamba.time_step_min", "time_step_min", "mamba_dt_min",
                                                default=0.001)),
                time_step_max=_json_float(first("mamba.time_step_max", "time_step_max", "mamba_dt_max",
                                                default=0.1)),
                time_step_floor=_json_float(first("mamba.time_step_floor", "time_step_floor", "mamba_dt_init_floor",
                                                  default=1e-4)),
            )
        attention = None
        if "*" in kinds:
            head_dim = first("attention.head_dim", "head_dim", "attention_head_dim", "kv_channels")
            if head_dim is None:
                _fail("head_dim", None, "config.json has no head_dim, attention_head_dim or kv_channels")
            n_heads = required("attention.num_heads", "num_attention_heads")
            attention = AttentionConfig(
                num_heads=n_heads,
                num_kv_heads=first("attention.num_kv_heads", "num_key_value_heads", default=n_heads),
                head_dim=head_dim,
                bias=first("attention.bias", "attention_bias", default=False),
                # NemotronH has no RoPE: real config.json files carry rope_theta / partial_rotary_factor that no
                # implementation reads (docs/numerics.md), so only nemojax's own key turns RoPE on
                **_rope_fields(d.get(ROPE_KEY), sources),
            )
        moe = None
        if "E" in kinds:
            moe = MoEConfig(
                num_experts=required("moe.num_experts", "n_routed_experts", "num_local_experts"),
                top_k=required("moe.top_k", "num_experts_per_tok"),
                intermediate_size=required("moe.intermediate_size", "moe_intermediate_size"),
                shared_intermediate_size=first("moe.shared_intermediate_size", "moe_shared_expert_intermediate_size",
                                               default=0),
                n_shared_experts=first("moe.n_shared_experts", "n_shared_experts", default=1),
                latent_size=first("moe.latent_size", "moe_latent_size"),
                routed_scaling_factor=_json_float(first("moe.routed_scaling_factor", "routed_scaling_factor",
                                                        default=1.0)),
                n_group=first("moe.n_group", "n_group", default=1),
                topk_group=first("moe.topk_group", "topk_group", default=1),
                norm_topk_prob=first("moe.norm_topk_prob", "norm_topk_prob", default=True),
            )
        eos = first("eos_token_id", "eos_token_id", default=2)  # transformers allows a list of stop ids
        fields = dict(
            vocab_size=required("vocab_size", "vocab_size"),
            hidden_size=required("hidden_size", "hidden_size"),
            pattern=pattern,
            mamba=mamba,
            attention=attention,
            intermediate_size=first("intermediate_size", "intermediate_size") if "-" in kinds else None,
            moe=moe,
            mtp=mtp,
            mlp_bias=first("mlp_bias", "mlp_bias", default=False),
            norm_eps=_json_float(first("norm_eps", "layer_norm_epsilon", "rms_norm_eps", "norm_eps", default=1e-5)),
            tie_word_embeddings=first("tie_word_embeddings", "tie_word_embeddings", default=False),
            initializer_range=_json_float(first("initializer_range", "initializer_range", default=0.02)),
            max_position_embeddings=first("max_position_embeddings", "max_position_embeddings", default=4096),
            bos_token_id=first("bos_token_id", "bos_token_id"),
            eos_token_id=eos,
            pad_token_id=first("pad_token_id", "pad_token_id"),
            layer_configs=tuple(d.get(LAYER_CONFIGS_KEY) or ()),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict for transformers' NemotronHForCausalLM (and NVIDIA's remote code). An attention
        RoPE (not part of NemotronH) is written under `nemojax_rope`, which only nemojax reads back."""
        d: dict[str, Any] = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": self.MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "hybrid_override_pattern": self.pattern,
            "layers_block_type": _hf_layer_names(self.pattern),
            "tie_word_embeddings": False,
            "layer_norm_epsilon": self.norm_eps,
            "initializer_range": self.initializer_range,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_hidden_act": "relu2",
            "mlp_bias": self.mlp_bias,
            "residual_in_fp32": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.intermediate_size is not None:
            d["intermediate_size"] = self.intermediate_size
        if self.attention is not None:
            a = self.attention
            d.update(num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                     attention_bias=a.bias)
            if a.rope_theta is not None:  # transformers ignores this key: the checkpoint is nemojax's own variant
                d[ROPE_KEY] = {"rope_theta": a.rope_theta, "partial_rotary_factor": a.partial_rotary_factor}
        if self.mamba is not None:
            m = self.mamba
            d.update(mamba_num_heads=m.num_heads, mamba_head_dim=m.head_dim, ssm_state_size=m.state_size,
                     n_groups=m.n_groups, conv_kernel=m.conv_kernel, chunk_size=m.chunk_size,
                     use_conv_bias=m.use_conv_bias, use_bias=m.proj_bias, mamba_hidden_act="silu",
                     time_step_limit=list(m.time_step_limit), time_step_min=m.time_step_min,
                     time_step_max=m.time_step_max, time_step_floor=m.time_step_floor,
                     mamba_ssm_cache_dtype="float32")
        if self.moe is not None:
            e = self.moe
            d.update(n_routed_experts=e.num_experts, num_experts_per_tok=e.top_k,
                     moe_intermediate_size=e.intermediate_size,
                     moe_shared_expert_intermediate_size=e.shared_intermediate_size,
                     n_shared_experts=e.n_shared_experts, moe_latent_size=e.latent_size,
                     routed_scaling_factor=e.routed_scaling_factor, n_group=e.n_group, topk_group=e.topk_group,
                     norm_topk_prob=e.norm_topk_prob)
        if self.mtp is not None:
            d.update(num_nextn_predict_layers=self.mtp.num_layers, mtp_hybrid_override_pattern=self.mtp.pattern,
                     mtp_layers_block_type=_hf_layer_names(self.mtp.pattern))
        else:
            d["num_nextn_predict_layers"] = 0
        if self.layer_configs:
            # transformers' NemotronH has one width per kind: it ignores this key and refuses the tensors of the
            # layers that differ (size mismatches); nemojax reads it back
            d[LAYER_CONFIGS_KEY] = [_layer_changes(self, char, value)
                                    for char, value in zip(self.pattern, self.layer_configs, strict=True)]
        return d


def _layer_changes(config: ModelConfig, char: str, value: Any) -> Any:
    """One layer_configs entry for config.json: None, an int, or the fields that differ from the global value."""
    if value is None or isinstance(value, int):
        return value
    current = getattr(config, families.kind(char).config_field)
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(current, f.name)}


def _replace_fields(name: str, current: Any, changes: Mapping[str, Any]) -> Any:
    """`current` (a sub-config or Runtime) with a dict of field changes; an unknown field raises ValueError naming
    `name` and the known fields (not dataclasses' bare TypeError)."""
    known = {f.name for f in dataclasses.fields(current)}
    unknown = sorted(set(changes) - known)
    if unknown:
        _fail(name, unknown, f"fields must be among {sorted(known)}")
    return dataclasses.replace(current, **changes)


def _rope_fields(value: Any, sources: dict[str, str]) -> dict[str, Any]:
    """AttentionConfig fields from config.json's `nemojax_rope` entry (absent: no RoPE)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or "rope_theta" not in value:
        _fail(ROPE_KEY, value, "must be a dict with rope_theta (and optionally partial_rotary_factor)")
    sources.update({"attention.rope_theta": f"{ROPE_KEY}.rope_theta",
                    "attention.partial_rotary_factor": f"{ROPE_KEY}.partial_rotary_factor"})
    return {"rope_theta": _json_float(value["rope_theta"]),
            "partial_rotary_factor": _json_float(value.get("partial_rotary_factor", 1.0))}


def _json_float(value: Any) -> Any:
    """A float from config.json, including transformers 5's {"__float__": "Infinity"} encoding of inf. Anything
    else that is not a number (a string, a list) comes back unchanged for the config's own check to refuse with
    the field's name: float("1e-5") would quietly accept a quoted number."""
    if isinstance(value, Mapping) and isinstance(value.get("__float__"), str):
        try:
            return float(value["__float__"])
        except ValueError:
            return value
    return value


def _kind_names(kinds: str) -> str:
    return ", ".join(f"{c!r} ({families.kind(c).name})" for c in kinds)


def _hf_layer_names(pattern: str) -> list[str]:
    """config.json's list spelling of a pattern: each kind's first HF name."""
    return [families.kind(c).hf_names[0] for c in pattern]


def _parse_pattern(d: Mapping[str, Any], string_key: str, list_keys: tuple[str, ...], default: str | None = None,
                   kinds: str = "M*-E") -> str:
    """Reads a layer pattern from its string spelling (Megatron's '|' and '/' stripped) and/or its list spellings
    (transformers' `layers_block_type`, alias `layer_types`). Spellings present together must agree: which one
    a reader prefers differs (transformers keeps the list), so a disagreement is refused, not resolved."""
    found = {key: _list_pattern(key, d[key], kinds) for key in list_keys if d.get(key) is not None}
    if d.get(string_key) is not None:
        found[string_key] = _string_pattern(string_key, d[string_key], kinds)
    if len(set(found.values())) > 1:
        spellings = ", ".join(f"{key}={found[key]!r}" for key in found)
        _fail(string_key, d[string_key] if string_key in found else found, f"the pattern spellings disagree "
              f"({spellings}); config.json must give one layer pattern")
    if found:
        return next(iter(found.values()))
    if default is not None:
        return default
    raise ValueError(f"config.json has neither {string_key!r} nor {' / '.join(repr(k) for k in list_keys)}")


def _list_pattern(key: str, names: Any, kinds: str) -> str:
    """A pattern from a list of HF layer-type names ("mamba", "full_attention", ...)."""
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        _fail(key, names, "must be a non-empty list of layer-type names (strings)")
    chars = {name: c for c in kinds for name in families.kind(c).hf_names}
    unknown = [n for n in names if n not in chars]
    if unknown:
        _fail(key, unknown, f"names must be among {sorted(chars)}")
    return "".join(chars[n] for n in names)


def _string_pattern(key: str, value: Any, kinds: str) -> str:
    """A pattern from its string spelling, Megatron's '|' separators and '/'-suffix (MTP layers) dropped."""
    if not isinstance(value, str):
        _fail(key, value, f"must be a string over the kinds {_kind_names(kinds)}")
    pattern = value.replace("|", "").split("/")[0]
    bad = sorted(set(pattern) - set(kinds))
    if bad or not pattern:
        _fail(key, value, f"characters {bad} are not among the kinds {_kind_names(kinds)}" if bad
              else "must not be empty")
    return pattern
