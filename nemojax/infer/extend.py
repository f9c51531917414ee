"""Running the model over new tokens from a cache: prefill, decode steps and speculative verification.

All three are one operation, `extend`: T new tokens per sequence at positions cache.length[i] + t, of which the
first commit[i] are kept (see `nemojax.nn.state`). Prefill is an extend of the right-padded prompts from an
empty cache (`fresh`, commit = prompt lengths); a decode step is an extend by one token; verification of k drafts
is an extend by k + 1 tokens that keeps every intermediate Mamba state (`all_steps`) until the number of accepted
tokens is known, then `commit_steps` keeps the right one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from nemojax import model
from nemojax.config import ModelConfig
from nemojax.infer.cache import Cache
from nemojax.nn.state import Extend, select_step, take_rows

Params = dict

# Compiler options for every jitted decode loop and step. XLA's default copy insertion copies a loop-carried
# buffer that is both read and updated in place inside a while body; its region-based live-range analysis sees
# that the reads (`cached_attention` runs before `write_kv`) come first and keeps the KV caches where they lie.
# On CPU each KV buffer was copied twice per step without it (at 4k context, 8 copies of 2 MiB per token in the
# 60M benchmark model). It is a CPU option (GPU has its own flag), so other backends ignore it.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def extend(config: ModelConfig, params: Params, tokens: jax.Array, cache: Cache, commit: jax.Array, *,
           fresh: bool = False, all_steps: bool = False, elastic: Mapping | None = None) -> tuple[jax.Array, Cache]:
    """tokens: [b, T] int, commit: [b] int32 -> (final normed hidden [b, T, hidden], new cache).

    Without `all_steps` the cache's length grows by `commit`; with it the length is unchanged and every Mamba
    state carries a T axis for `commit_steps`. elastic: the live sizes of a masked forward, passed to
    `nemojax.model.apply` (with the full-size params of the elastic model).
    """
    step = Extend(cache.length, commit.astype(jnp.int32), fresh=fresh, all_steps=all_steps)
    out = model.apply(config, params, tokens, states=cache.layers, step=step, logits=False, elastic=elastic)
    return out.hidden, Cache(out.states, cache.length if all_steps else cache.length + step.commit)


def commit_steps(cache: Cache, count: jax.Array) -> Cache:
    """After an `all_steps` extend: keep the first count[i] >= 1 new tokens of each sequence. count: [b]."""
    layers = tuple(select_step(layer, count - 1) for layer in cache.layers)
    return Cache(layers, cache.length + count)


def logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden: [..., hidden] -> [..., vocab] float32 through the lm_head."""
    return model.lm_logits(config, params, hidden)


def logits_at(config: ModelConfig, params: Params, hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden: [b, T, hidden], index: [b] -> logits [b, vocab] of position index[i] of each sequence."""
    return logits(config, params, take_rows(hidden, index, 1)[:, 0])


def embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """tokens: [b, T] -> embeddings [b, T, hidden]."""
    return model.embed(config, params, tokens)


@functools.partial(jax.jit, static_argnums=0)
def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
            cache: Cache, elastic: Mapping | None = None) -> tuple[jax.Array, Cache]:
    """Right-padded prompts into an empty cache. tokens: [b, L], lengths: [b] (1 <= lengths[i] <= L)
    -> (logits of each prompt's last token [b, vocab] float32, cache with length = lengths). elastic: see
    `extend`."""
    hidden, cache = extend(config, params, tokens, cache, lengths, fresh=True, elastic=elastic)
    return logits_at(config, params, hidden, lengths - 1), cache


@functools.partial(jax.jit, static_argnums=0, compiler_options=DECODE_COMPILER_OPTIONS)
def decode_step(config: ModelConfig, params: Params, token: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """token: [b] -> (logits of the next token [b, vocab] float32, cache one longer)."""
    hidden, cache = extend(config, params, token[:, None], cache, jnp.ones_like(cache.length))
    return logits(config, params, hidden[:, 0]), cache
