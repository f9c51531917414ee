"""The attention layer kind ('*'): grouped-query attention with a KV cache.

Heads are pruned group-aware (as NVIDIA ModelOpt does for GQA): the query heads of each KV group are ranked within
the group and the top heads / num_kv_heads of every group are kept, so each kept head keeps reading the same K/V
head; num_kv_heads and head_dim never change. In importance order the kept heads of each group are sorted by
descending score inside the group (the groups keep their order), which leaves the function unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nemojax.families import Axis, LayerKind, WidthRule, register_kind
from nemojax.kinds.masking import grouped_prefix, outer
from nemojax.kinds.pruning import expand, importance_order, keep_top_grouped, record, slice_linear_hidden, take
from nemojax.nn.attention import Attention
from nemojax.nn.state import KVCache

QKV = ("q_proj", "k_proj", "v_proj")


def cache(config, batch: int, max_len: int, dtype) -> KVCache:
    """k, v [b, kv_heads, max_len, head_dim] in `dtype`; entry s holds position s."""
    a = config.attention
    shape = (batch, a.num_kv_heads, max_len, a.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cache_bytes(config, batch: int, context: int, itemsize: int) -> dict[str, int]:
    a = config.attention
    return {"kv": 2 * batch * context * a.num_kv_heads * a.head_dim * itemsize}


def flops(config, seq_len: int) -> float:
    """Projections, then scores and values over the causal half of the context."""
    a, D = config.attention, config.hidden_size
    qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    total = 2.0 * D * qkv + 2.0 * a.num_heads * a.head_dim * D
    return total + 2 * (2.0 * a.num_heads * a.head_dim * seq_len / 2)


def importance(config, taps: dict, params: dict, stat) -> dict:
    """attn: per-row statistic of o_proj's input [b, heads*head_dim] (heads are scored from it)."""
    del config, params
    return {"attn": stat(taps["o_proj_in"])}


def scores(config, stats: dict) -> dict:
    """heads [n_h]: L2 over head_dim of the per-channel scores of the o_proj input."""
    a = config.attention
    return {"heads": np.sqrt(np.sum(np.square(stats["attn"].reshape(a.num_heads, a.head_dim)), axis=-1))}


def _axes(config) -> dict[str, Axis]:
    a = config.attention  # heads are not in the default search grid (the Nemotron-H recipes keep attention)
    return {"heads": Axis(a.num_heads, a.num_kv_heads,
                          why=f"the same number of query heads in each of the num_kv_heads={a.num_kv_heads} KV groups")}


def _changes(config, heads: int) -> dict:
    return {"attention": {"num_heads": heads}}


def _slice(layer: dict, name: str, config, read, options: dict, heads: int) -> None:
    """Keeps the top heads/num_kv_heads query heads of every KV group (in importance order within each group when
    options["order"] is "importance")."""
    a = config.attention
    ordered = importance_order(options)
    if heads == a.num_heads and not ordered:
        return
    k_heads = keep_top_grouped(read(f"{name}/heads", (a.num_heads,)), a.num_kv_heads, heads, ordered)
    record(options, f"{name}/heads", k_heads)
    k_q = expand(k_heads, a.head_dim)
    take(layer, "mixer/q_proj/kernel", k_q, 1)
    take(layer, "mixer/q_proj/bias", k_q, 0)
    take(layer, "mixer/o_proj/kernel", k_q, 0)


def mask(config, live: dict, out: dict) -> dict:
    """The first live["heads"]/num_kv_heads query heads of every KV group (masked forward; see `LayerKind.mask`):
    a dead head's output is zeroed before o_proj."""
    if "heads" not in live:
        return {}
    a = config.attention
    heads = outer(grouped_prefix(a.num_heads, a.num_kv_heads, live["heads"]), jnp.ones((a.head_dim,), jnp.float32))
    return {"heads": heads * out.get("heads", 1.0)}


KIND = register_kind(LayerKind(
    char="*", name="attention", mixer=Attention, hf_names=("full_attention", "attention"),
    config_field="attention", mixes_tokens=True, cache=cache, cache_bytes=cache_bytes, flops=flops,
    importance=importance, scores=scores, linears=(*QKV, "o_proj"), residual_in=QKV, residual_out=("o_proj",),
    slice_hidden=lambda layer, k, config: slice_linear_hidden(layer, k, QKV, ("o_proj",)),
    compile_cost=2.0,  # a guess between Mamba's and the MLP's
    width=(WidthRule(("heads",), _changes, _slice, _axes),), mask=mask,
))
