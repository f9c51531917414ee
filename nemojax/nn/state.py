"""Per-layer inference state, and how a forward extends it (docs/numerics.md 4).

    MambaState  conv [b, K-1, conv_dim]: the last K-1 pre-activation xBC inputs, oldest first (compute dtype);
                ssm [b, H, P, N] float32. With `Extend.all_steps` both gain an axis T after b: the state after
                each of the T new tokens, from which `select_step` keeps one per sequence.
    KVCache     k, v [b, kv_heads, max_len, head_dim] (head-major: decode attention reads it in place);
                entry s holds position s.

An `Extend` tells a mixer that the T new tokens of sequence i sit at positions start[i] .. start[i] + T - 1 and
that only the first commit[i] of them are kept: the returned state is the state after exactly those. Tokens past
them are treated as padding: their outputs are unspecified, and their KV entries are masked until overwritten.
With `all_steps` every output is exact and the state after each token is kept, for `select_step` to choose
from once the number of kept tokens is known (speculative verification).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MambaState:
    conv: jax.Array  # [b, K-1, conv_dim] (or [b, T, K-1, conv_dim] per step)
    ssm: jax.Array  # [b, H, P, N] float32 (or [b, T, H, P, N] per step)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [b, kv_heads, max_len, head_dim]
    v: jax.Array


LayerState = MambaState | KVCache | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Extend:
    """start, commit: [b] int32. fresh: every start is 0 and the cache is empty (prefill), so attention runs on
    the new tokens alone. all_steps: keep the Mamba state after every new token (for speculative verification);
    `commit` is then ignored by Mamba layers."""

    start: jax.Array
    commit: jax.Array
    fresh: bool = dataclasses.field(default=False, metadata=dict(static=True))
    all_steps: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def valid(self, T: int) -> jax.Array:
        """[b, T] bool: which new tokens are committed."""
        return jnp.arange(T)[None, :] < self.commit[:, None]


def take_rows(x: jax.Array, first: jax.Array, count: int) -> jax.Array:
    """x: [b, L, ...], first: [b] -> x[i, first[i] : first[i] + count] for each i: [b, count, ...]."""
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, count, axis=0))(x, first)


def select_step(state: LayerState, index: jax.Array) -> LayerState:
    """A per-step Mamba state ([b, T, ...] leaves) -> the state after token index[i] of each sequence."""
    if not isinstance(state, MambaState):
        return state
    pick = lambda x: jnp.take_along_axis(x, index.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]  # noqa: E731
    return MambaState(pick(state.conv), pick(state.ssm))
