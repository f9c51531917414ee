"""Model configuration: frozen, validated, hashable; and the Hugging Face config.json mapping.

A `ModelConfig` describes one NemotronH-family network (hybrid Mamba-2 / attention / MLP / MoE stack, optional
MTP head). Its sub-configs hold the fields of one kind of mixer and are `None` when the pattern has no layer of
that kind. How the network runs (compute and parameter dtypes, rematerialisation, layer scans, kernel choices, the
quantization recipe) is kept apart in `config.runtime`, a `Runtime`: a checkpoint's identity (`architecture()`,
config.json) never depends on it. Every field is checked when the config is built; an inconsistent field raises a
`ValueError` that names it, the value and what is allowed, so nothing downstream ever sees a half-valid config.

`ModelConfig.from_hf(d)` accepts every spelling of a NemotronH `config.json` (docs/numerics.md 10):
`hybrid_override_pattern` or `layers_block_type` (legacy "mamba"/"attention" or new "linear_attention"/
"full_attention" names), `head_dim` or `attention_head_dim`, the `mamba_*` aliases and `time_step_limit`.
`to_hf()` writes a dict that transformers' `NemotronHConfig` and NVIDIA's remote code both load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from nemojax import families
from nemojax.lowp.recipe import QuantRecipe

DTYPES = ("float32", "bfloat16", "float16")
# config.json key of a NemotronH variant with RoPE in its attention layers (a nemojax extension; see to_hf)
ROPE_KEY = "nemojax_rope"
MOE_IMPLS = ("auto", "dense", "ragged")
SSD_IMPLS = ("chunked", "sequential")
KERNEL_IMPLS = ("xla", "pallas", "auto")  # pallas_kernels.dispatch.IMPLS
ATTENTION_IMPLS = (*KERNEL_IMPLS, "cudnn")  # + jax.nn.dot_product_attention's cuDNN fused kernel
# Activation checkpointing per layer: "none", "full" (save nothing), or a jax.checkpoint_policies name.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
# Above this many routed experts `moe_impl="auto"` switches from the dense one-hot einsum to sorted ragged_dot.
DENSE_MOE_MAX_EXPERTS = 16


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{field}={value!r} is invalid: {allowed}")


def _require_positive(prefix: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(f"{prefix}{name}", value, "must be a positive integer")


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
        try:
            limit = tuple(float(v) for v in self.time_step_limit)
        except (TypeError, ValueError):
            limit = ()
        if len(limit) != 2 or not (0.0 <= limit[0] <= limit[1]):
            _fail("mamba.time_step_limit", self.time_step_limit, "must be (lo, hi) with 0 <= lo <= hi")
        object.__setattr__(self, "time_step_limit", limit)
        if not 0 < self.time_step_min <= self.time_step_max:
            _fail("mamba.time_step_min", self.time_step_min, f"must be in (0, time_step_max={self.time_step_max}]")

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
        if self.rope_theta is not None:
            if self.rope_theta <= 0:
                _fail("attention.rope_theta", self.rope_theta, "must be positive or None (no RoPE)")
            rotary = int(self.head_dim * self.partial_rotary_factor)
            if not 0 < self.partial_rotary_factor <= 1 or rotary <= 0 or rotary % 2:
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
        if self.n_shared_experts < 0:
            _fail("moe.n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.n_shared_experts and self.shared_intermediate_size <= 0:
            _fail("moe.shared_intermediate_size", self.shared_intermediate_size, "must be positive")
        if self.latent_size is not None and self.latent_size <= 0:
            _fail("moe.latent_size", self.latent_size, "must be positive or None")
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
        if not isinstance(self.pattern, str) or not self.pattern:
            _fail("mtp.pattern", self.pattern, "must be a non-empty string of layer kinds")


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
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    runtime: Runtime = Runtime()  # how it runs (dtype, remat, kernels, quantization), not what it is

    def __post_init__(self) -> None:
        _require_positive("", self, ("vocab_size", "hidden_size"))
        patterns = (("pattern", self.pattern),) + ((("mtp.pattern", self.mtp.pattern),) if self.mtp else ())
        for field, pattern in patterns:
            bad = sorted(set(pattern) - set(self.KINDS)) if isinstance(pattern, str) else [pattern]
            if not pattern or bad:
                _fail(field, pattern, f"must be a non-empty string over the kinds {_kind_names(self.KINDS)} "
                                      f"(found {bad})")
        for field, cls in (("mamba", MambaConfig), ("attention", AttentionConfig), ("moe", MoEConfig),
                           ("mtp", MTPConfig), ("runtime", Runtime)):
            value = getattr(self, field)
            if value is not None and not isinstance(value, cls):
                _fail(field, value, f"must be a {cls.__name__} or None")
        kinds = set(self.pattern) | (set(self.mtp.pattern) if self.mtp else set())
        for char in self.KINDS:
            entry = families.kind(char)
            if char in kinds and entry.config_field and getattr(self, entry.config_field) is None:
                _fail(entry.config_field, None, f"is required because the pattern has '{char}' ({entry.name}) layers")
        if "-" in kinds and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            _fail("intermediate_size", self.intermediate_size, "must be a positive integer for '-' MLP layers")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be positive")
        if self.tie_word_embeddings:
            _fail("tie_word_embeddings", True, "NemotronH checkpoints are untied; only False is supported")

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    def replace(self, **changes: Any) -> ModelConfig:
        """A new validated config with `changes` applied (sub-configs, `runtime` among them, may be given as dicts
        of changes: `config.replace(runtime={"dtype": "bfloat16"})`)."""
        if isinstance(changes.get("runtime"), Mapping):
            known = {f.name for f in dataclasses.fields(Runtime)}
            unknown = sorted(set(changes["runtime"]) - known)
            if unknown:
                _fail("runtime", unknown, f"fields must be among {sorted(known)}")
            changes["runtime"] = dataclasses.replace(self.runtime, **changes["runtime"])
        for name in ("mamba", "attention", "moe", "mtp"):
            if isinstance(changes.get(name), Mapping):
                current = getattr(self, name)
                if current is None:
                    raise ValueError(f"{name} is None; pass a full {name} config instead of a dict of changes")
                changes[name] = dataclasses.replace(current, **changes[name])
        return dataclasses.replace(self, **changes)

    def architecture(self) -> ModelConfig:
        """This config with the default runtime: what a checkpoint is, whatever runs it."""
        return dataclasses.replace(self, runtime=Runtime())

    # ------------------------------------------------------------------ Hugging Face config.json mapping

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a NemotronH `config.json` dict. `overrides` replace parsed fields or set
        nemojax-only ones (`runtime=Runtime(dtype="bfloat16")`; a dict of runtime fields also works)."""
        d = dict(hf)
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            _fail("model_type", d["model_type"], f"must be {cls.MODEL_TYPE!r} for {cls.__name__} (nemojax.load_hf "
                  "picks the config class by model_type)")
        pattern = _parse_pattern(d, "hybrid_override_pattern", "layers_block_type", kinds=cls.KINDS)
        n_layers = d.get("num_hidden_layers")
        if "layers_block_type" not in d and n_layers is not None and n_layers != len(pattern):
            _fail("num_hidden_layers", n_layers, f"must equal the pattern length {len(pattern)} ({pattern!r})")

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                if name in d and d[name] is not None:
                    return d[name]
            return default

        mtp = None
        n_mtp = first("num_nextn_predict_layers", "mtp_num_layers", default=0)
        if n_mtp:
            mtp_pattern = _parse_pattern(d, "mtp_hybrid_override_pattern", "mtp_layers_block_type",
                                         default="*E", kinds=cls.KINDS)
            mtp = MTPConfig(num_layers=n_mtp, pattern=mtp_pattern)
        kinds = set(pattern) | (set(mtp.pattern) if mtp else set())

        mamba = None
        if "M" in kinds:
            limit = first("time_step_limit", "mamba_dt_limit", default=(0.0, math.inf))
            mamba = MambaConfig(
                num_heads=_required(d, "mamba_num_heads"),
                head_dim=_required(d, "mamba_head_dim"),
                state_size=_required(d, "ssm_state_size", "mamba_state_dim", "mamba_d_state"),
                n_groups=first("n_groups", "mamba_n_groups", default=8),
                conv_kernel=first("conv_kernel", "mamba_d_conv", default=4),
                chunk_size=first("chunk_size", "mamba_chunk_size", default=128),
                use_conv_bias=first("use_conv_bias", "mamba_conv_bias", default=True),
                proj_bias=first("use_bias", "mamba_proj_bias", default=False),
                time_step_limit=tuple(_json_float(v) for v in limit),
                time_step_min=first("time_step_min", "mamba_dt_min", default=0.001),
                time_step_max=first("time_step_max", "mamba_dt_max", default=0.1),
                time_step_floor=first("time_step_floor", "mamba_dt_init_floor", default=1e-4),
            )
        attention = None
        if "*" in kinds:
            head_dim = first("head_dim", "attention_head_dim", "kv_channels")
            if head_dim is None:
                _fail("head_dim", None, "config.json has no head_dim, attention_head_dim or kv_channels")
            n_heads = _required(d, "num_attention_heads")
            attention = AttentionConfig(
                num_heads=n_heads,
                num_kv_heads=first("num_key_value_heads", default=n_heads),
                head_dim=head_dim,
                bias=first("attention_bias", default=False),
                # NemotronH has no RoPE: real config.json files carry rope_theta / partial_rotary_factor that no
                # implementation reads (docs/numerics.md), so only nemojax's own key turns RoPE on
                **_rope_fields(d.get(ROPE_KEY)),
            )
        moe = None
        if "E" in kinds:
            moe = MoEConfig(
                num_experts=_required(d, "n_routed_experts", "num_local_experts"),
                top_k=_required(d, "num_experts_per_tok"),
                intermediate_size=_required(d, "moe_intermediate_size"),
                shared_intermediate_size=first("moe_shared_expert_intermediate_size", default=0),
                n_shared_experts=first("n_shared_experts", default=1),
                latent_size=first("moe_latent_size"),
                routed_scaling_factor=float(first("routed_scaling_factor", default=1.0)),
                n_group=first("n_group", default=1),
                topk_group=first("topk_group", default=1),
                norm_topk_prob=first("norm_topk_prob", default=True),
            )
        eos = first("eos_token_id", default=2)
        fields = dict(
            vocab_size=_required(d, "vocab_size"),
            hidden_size=_required(d, "hidden_size"),
            pattern=pattern,
            mamba=mamba,
            attention=attention,
            intermediate_size=first("intermediate_size") if "-" in kinds else None,
            moe=moe,
            mtp=mtp,
            mlp_bias=first("mlp_bias", default=False),
            norm_eps=float(first("layer_norm_epsilon", "rms_norm_eps", "norm_eps", default=1e-5)),
            tie_word_embeddings=first("tie_word_embeddings", default=False),
            initializer_range=first("initializer_range", default=0.02),
            max_position_embeddings=first("max_position_embeddings", default=4096),
            bos_token_id=first("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            pad_token_id=first("pad_token_id"),
        )
        if isinstance(overrides.get("runtime"), Mapping):
            overrides["runtime"] = Runtime(**overrides["runtime"])
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
            "eos_token_id": self.eos_token_id,
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
        return d


def _rope_fields(value: Any) -> dict[str, Any]:
    """AttentionConfig fields from config.json's `nemojax_rope` entry (absent: no RoPE)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or "rope_theta" not in value:
        _fail(ROPE_KEY, value, "must be a dict with rope_theta (and optionally partial_rotary_factor)")
    return {"rope_theta": float(value["rope_theta"]),
            "partial_rotary_factor": float(value.get("partial_rotary_factor", 1.0))}


def _json_float(value: Any) -> float:
    """A float from config.json, including transformers 5's {"__float__": "Infinity"} encoding of inf."""
    if isinstance(value, Mapping) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _required(d: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if d.get(name) is not None:
            return d[name]
    raise ValueError(f"config.json is missing {names[0]!r}" + (f" (or {', '.join(names[1:])})" if names[1:] else ""))


def _kind_names(kinds: str) -> str:
    return ", ".join(f"{c!r} ({families.kind(c).name})" for c in kinds)


def _hf_layer_names(pattern: str) -> list[str]:
    """config.json's list spelling of a pattern: each kind's first HF name."""
    return [families.kind(c).hf_names[0] for c in pattern]


def _parse_pattern(d: Mapping[str, Any], string_key: str, list_key: str, default: str | None = None,
                   kinds: str = "M*-E") -> str:
    """Reads a layer pattern from its string spelling (Megatron's '|' and '/' stripped) or its list spelling."""
    if d.get(list_key) is not None:
        names = d[list_key]
        if isinstance(names, str):
            _fail(list_key, names, "must be a list of layer-type names")
        chars = {name: c for c in kinds for name in families.kind(c).hf_names}
        unknown = [n for n in names if n not in chars]
        if unknown:
            _fail(list_key, unknown, f"names must be among {sorted(chars)}")
        return "".join(chars[n] for n in names)
    if d.get(string_key) is not None:
        pattern = d[string_key].replace("|", "").split("/")[0]
        bad = sorted(set(pattern) - set(kinds))
        if bad:
            _fail(string_key, d[string_key], f"characters {bad} are not among the kinds {_kind_names(kinds)}")
        return pattern
    if default is not None:
        return default
    raise ValueError(f"config.json has neither {string_key!r} nor {list_key!r}")
