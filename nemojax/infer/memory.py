"""Inference memory planning: the bytes of weights and caches for a batch and context, without allocating them.

    plan = cache_bytes(presets.get("nemotron-nano-9b-v2"), batch=1, context=131072)
    print(plan)                       # GiB per part: weights, kv, ssm, conv, total
    n = max_context(config, batch=1, memory_bytes=22 * 2**30)

The cache parts follow the layout `nemojax.infer.cache.init_cache` allocates (docs/numerics.md 4), byte for byte:

    per Mamba layer      conv [b, K-1, conv_dim] in `dtype`, ssm [b, H, P, N] float32   (independent of context)
    per attention layer  k, v [b, context, kv_heads, head_dim] in `dtype`                (linear in context)
    MLP / MoE layers     nothing

Weights are every param (the MTP head's included whenever `config.mtp` is set: they are loaded either way) at the
weight dtype's itemsize, except the float32-pinned MoE router params, which count 4 bytes each: the bytes
`Model.init` would hold with `param_dtype` = the weight dtype. Not counted: activations and logits of the forward pass,
framework workspace and allocator fragmentation; leave headroom for them.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp

from nemojax import families
from nemojax.config import ModelConfig

__all__ = ["MemoryPlan", "cache_bytes", "max_context"]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes by part: weights, attention KV cache, Mamba SSM state, Mamba conv state, and the states of other
    registered kinds."""

    weights: int
    kv: int
    ssm: int
    conv: int
    other: int = 0

    @property
    def cache(self) -> int:
        """kv + ssm + conv + other: everything that scales with the batch."""
        return self.kv + self.ssm + self.conv + self.other

    @property
    def total(self) -> int:
        return self.weights + self.cache

    def table(self) -> str:
        """A small text table of each part in GiB (and bytes)."""
        parts = ("weights", "kv", "ssm", "conv") + (("other",) if self.other else ())
        rows = [(name, getattr(self, name)) for name in parts] + [("total", self.total)]
        lines = [f"{'part':<8} {'GiB':>10} {'bytes':>16}"]
        lines += [f"{name:<8} {value / GiB:>10.3f} {value:>16,d}" for name, value in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _dtype(value: object, field: str) -> jnp.dtype:
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ValueError(f"{field}={value!r} is invalid: must be a dtype name such as 'bfloat16'") from None


def _layer_bytes(config: ModelConfig, pattern: str, batch: int, itemsize: int) -> tuple[dict[str, int], dict[str, int]]:
    """The cache bytes of the layers in `pattern` for `batch` sequences, by part, as (fixed, per token of
    context): each kind's `cache_bytes` at contexts 0 and 1 (every registered kind's cache is affine in the
    context). The first config.num_layers characters are the main layers, each priced by its own config."""
    fixed: dict[str, int] = {}
    per_token: dict[str, int] = {}
    for i, char in enumerate(pattern):
        entry = families.kind(char)
        config_i = config.layer(i) if i < config.num_layers else config
        if entry.cache is None:
            continue
        if entry.cache_bytes is None:
            raise ValueError(f"layer kind {char!r} ({entry.name}) has a cache but no cache_bytes")
        at0, at1 = entry.cache_bytes(config_i, batch, 0, itemsize), entry.cache_bytes(config_i, batch, 1, itemsize)
        for part in at0.keys() | at1.keys():
            fixed[part] = fixed.get(part, 0) + at0.get(part, 0)
            per_token[part] = per_token.get(part, 0) + at1.get(part, 0) - at0.get(part, 0)
    return fixed, per_token


def _plan(weights: int, fixed: dict[str, int], per_token: dict[str, int], context: int) -> MemoryPlan:
    parts = {part: fixed.get(part, 0) + per_token.get(part, 0) * context for part in fixed.keys() | per_token.keys()}
    named = {name: parts.pop(name, 0) for name in ("kv", "ssm", "conv")}
    return MemoryPlan(weights=weights, other=sum(parts.values()), **named)


def _cache_pattern(config: ModelConfig, mtp: bool) -> str:
    """The layer kinds that hold a cache: the main pattern, plus the MTP pattern once per MTP depth."""
    if not mtp:
        return config.pattern
    if config.mtp is None:
        raise ValueError("mtp=True is invalid: config.mtp is None (the model has no MTP head)")
    return config.pattern + config.mtp.pattern * config.mtp.num_layers


def _weight_bytes(config: ModelConfig, weight_dtype: object) -> int:
    """Each param at `weight_dtype`, except params the model pins to their own dtype (the float32 MoE router
    kernel and correction bias), which keep it. Found by laying the params out under a bfloat16 `param_dtype`:
    whatever is not bfloat16 there is pinned."""
    from nemojax.model import abstract_params  # model imports the network; keep `import memory` light

    itemsize = _dtype(weight_dtype or config.runtime.param_dtype, "weight_dtype").itemsize
    probe = jnp.dtype(jnp.bfloat16)
    leaves = jax.tree.leaves(abstract_params(config.replace(runtime={"param_dtype": "bfloat16"})))
    return sum(x.size * (itemsize if x.dtype == probe else x.dtype.itemsize) for x in leaves)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")


def cache_bytes(config: ModelConfig, batch: int, context: int, *, dtype: object = None, weight_dtype: object = None,
                mtp: bool = False) -> MemoryPlan:
    """The memory of serving `batch` sequences of up to `context` tokens.

    dtype: of the KV cache and conv state (default `config.runtime.dtype`); the SSM state is float32 regardless.
    weight_dtype: of the weights (default `config.runtime.param_dtype`).
    mtp: also count the MTP head's caches (its pattern once per depth), as speculative decoding with the head
      allocates them. Weights always include every param, the MTP head's too when `config.mtp` is set.
    Equals `cache_nbytes(init_cache(config, batch, context, dtype))` part for part (plus the MTP caches).
    """
    _check_positive(batch=batch, context=context)
    itemsize = _dtype(dtype or config.runtime.dtype, "dtype").itemsize
    fixed, per_token = _layer_bytes(config, _cache_pattern(config, mtp), batch, itemsize)
    return _plan(_weight_bytes(config, weight_dtype), fixed, per_token, context)


def max_context(config: ModelConfig, batch: int, memory_bytes: int, *, dtype: object = None,
                weight_dtype: object = None, mtp: bool = False) -> int:
    """The largest context whose `cache_bytes(...).total` is at most `memory_bytes` (same keywords).

    Total memory is affine in the context (only the KV cache grows), so this is a closed form. Returns 0 when not
    even one token fits, and `sys.maxsize` when nothing grows with the context (no attention layers) and the
    fixed part fits.
    """
    _check_positive(batch=batch)
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes={memory_bytes!r} is invalid: must be >= 0")
    itemsize = _dtype(dtype or config.runtime.dtype, "dtype").itemsize
    fixed, per_token = _layer_bytes(config, _cache_pattern(config, mtp), batch, itemsize)
    kv_per_token = sum(per_token.values())
    spare = int(memory_bytes) - _weight_bytes(config, weight_dtype) - sum(fixed.values())
    if spare < 0:
        return 0
    if kv_per_token == 0:
        return sys.maxsize
    return spare // kv_per_token
