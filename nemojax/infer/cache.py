"""Inference caches as pytrees, preallocated for a maximum length (docs/numerics.md 4).

Per layer of the pattern:

    M  MambaState: conv [b, K-1, conv_dim] (compute dtype) the last K-1 pre-activation xBC inputs, oldest first
                   (vLLM's width: the current token arrives with the step), zeros before the sequence;
                   ssm [b, H, P, N] float32 (docs/numerics.md 4). Neither grows with the context.
    *  KVCache:    k, v [b, kv_heads, max_len, head_dim] (compute dtype); entry s holds position s.
    - E            None (no state).

Each layer's entry is built by its registered kind (`nemojax.families.LayerKind.cache`), so a new kind brings
its own state.

`Cache.length` [b] int32 counts the tokens each sequence has committed: positions 0..length-1 of every KV cache
are valid, and every Mamba state is the state after exactly those tokens. Positions at or beyond `length` may hold
stale entries (right padding, rejected speculative drafts); they are masked and later overwritten.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.nn.state import KVCache, LayerState, MambaState

__all__ = ["Cache", "KVCache", "MambaState", "cache_nbytes", "init_cache", "layer_cache"]


LayerCache = LayerState


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """One entry per pattern character (None for MLP/MoE layers) and the committed length of each sequence."""

    layers: tuple[LayerCache, ...]
    length: jax.Array  # [b] int32

    @property
    def max_len(self) -> int:
        for layer in self.layers:
            if isinstance(layer, KVCache):
                return layer.k.shape[2]
        return -1  # no attention layer: any length fits

    def replace(self, **changes) -> Cache:
        return dataclasses.replace(self, **changes)


def layer_cache(config: ModelConfig, kind: str, batch: int, max_len: int, dtype: jnp.dtype) -> LayerCache:
    """The zero cache of one layer of pattern character `kind`, as its registered kind builds it (None for a
    stateless kind)."""
    entry = families.kind(kind)
    return None if entry.cache is None else entry.cache(config, batch, max_len, dtype)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str | jnp.dtype | None = None,
               pattern: str | None = None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    dtype: of the conv state and KV cache (default the config's compute dtype); the SSM state is always float32.
    pattern: the layer kinds to allocate for (default `config.pattern`; the MTP head passes its own).
    """
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be positive")
    dtype = jnp.dtype(dtype or config.runtime.dtype)
    if pattern is None:  # each main layer by its own config (a heterogeneous stack's widths differ per layer)
        layers = tuple(layer_cache(config.layer(i), kind, batch, max_len, dtype)
                       for i, kind in enumerate(config.pattern))
    else:
        layers = tuple(layer_cache(config, kind, batch, max_len, dtype) for kind in pattern)
    return Cache(layers, jnp.zeros((batch,), jnp.int32))


def cache_nbytes(cache: Cache) -> dict[str, int]:
    """Bytes actually held by a cache, by part: {"kv", "ssm", "conv"}, plus "other" for the states of other
    registered kinds when there are any."""
    out = {"kv": 0, "ssm": 0, "conv": 0}
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            out["kv"] += layer.k.nbytes + layer.v.nbytes
        elif isinstance(layer, MambaState):
            out["ssm"] += layer.ssm.nbytes
            out["conv"] += layer.conv.nbytes
        elif layer is not None:  # the state of another registered kind
            out["other"] = out.get("other", 0) + sum(leaf.nbytes for leaf in jax.tree.leaves(layer))
    return out
