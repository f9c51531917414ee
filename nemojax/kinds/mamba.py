"""The Mamba-2 layer kind ('M'): mixer, cache, FLOPs, linears, checkpoint parts and group-aware pruning.

Pruning follows Minitron-SSM (arXiv:2504.11409, section 3): heads are kept per SSM group so every kept head keeps
reading its own B/C group; head channels keep the same P' channels in every head; n_groups and state_size never
change.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nemojax.families import Axis, LayerKind, WidthRule, register_kind
from nemojax.kinds.masking import grouped_prefix, outer, prefix
from nemojax.kinds.pruning import (
    WIDTH_FRACTIONS,
    importance_order,
    keep_top,
    keep_top_grouped,
    record,
    slice_linear_hidden,
    take,
)
from nemojax.nn.mamba2 import CONV_PARTS, IN_PROJ_PARTS, Mamba2Mixer
from nemojax.nn.state import MambaState

IN_PROJ = tuple(f"in_proj_{part}" for part in IN_PROJ_PARTS)


def cache(config, batch: int, max_len: int, dtype) -> MambaState:
    """conv [b, K-1, conv_dim] in `dtype`, ssm [b, H, P, N] float32 (neither grows with the context)."""
    del max_len
    m = config.mamba
    return MambaState(jnp.zeros((batch, m.conv_kernel - 1, m.conv_dim), dtype),
                      jnp.zeros((batch, m.num_heads, m.head_dim, m.state_size), jnp.float32))


def cache_bytes(config, batch: int, context: int, itemsize: int) -> dict[str, int]:
    del context
    m = config.mamba
    return {"ssm": batch * m.num_heads * m.head_dim * m.state_size * 4,
            "conv": batch * (m.conv_kernel - 1) * m.conv_dim * itemsize}


def flops(config, seq_len: int) -> float:
    """Projections, conv and the chunked SSD: C.B within chunks (per group) and its product with X (causal
    halves), then the chunk-state build and read-out (each H * P * N multiply-adds per token)."""
    m, D = config.mamba, config.hidden_size
    H, P, N, G, Q = m.num_heads, m.head_dim, m.state_size, m.n_groups, min(m.chunk_size, seq_len)
    total = 2.0 * D * m.in_proj_size + 2.0 * m.inner_size * D + 2.0 * m.conv_kernel * m.conv_dim
    return total + 2.0 * G * N * Q / 2 + 2.0 * H * P * Q / 2 + 2 * (2.0 * H * P * N)


def importance(config, taps: dict, params: dict, stat) -> dict:
    """mamba_x: per-row statistic of the x projection [b, H*P] (heads and channels are scored from it)."""
    del config, params
    return {"mamba_x": stat(taps["x"])}


def scores(config, stats: dict) -> dict:
    """mamba_x [H, P] per-channel scores of the x projection; mamba_channels [P] = L2 over heads; mamba_heads
    [H] = L2 over all P channels (the pruner re-scores heads on the kept channels when both shrink)."""
    m = config.mamba
    s_x = stats["mamba_x"].reshape(m.num_heads, m.head_dim)
    return {"mamba_x": s_x, "mamba_channels": np.sqrt(np.sum(np.square(s_x), axis=0)),
            "mamba_heads": np.sqrt(np.sum(np.square(s_x), axis=1))}


def _axes(config) -> dict[str, Axis]:
    """Heads group-aware (Minitron-SSM); the grid tries fewer channels only down to 3/4, and ranks keeping them
    first: pruning heads beats pruning channels (arXiv 2504.11409)."""
    m = config.mamba
    return {"mamba_heads": Axis(m.num_heads, m.n_groups, grid=WIDTH_FRACTIONS,
                                why=f"the same number of heads in each of the n_groups={m.n_groups} SSM groups"),
            "mamba_head_dim": Axis(m.head_dim, grid=(1.0, 0.75), grid_multiple=8 if m.head_dim >= 64 else 2, rank=1)}


def _changes(config, mamba_heads: int | None = None, mamba_head_dim: int | None = None) -> dict:
    m = config.mamba
    return {"mamba": {"num_heads": m.num_heads if mamba_heads is None else mamba_heads,
                      "head_dim": m.head_dim if mamba_head_dim is None else mamba_head_dim}}


def _slice(layer: dict, name: str, config, read, options: dict, mamba_heads: int | None = None,
           mamba_head_dim: int | None = None) -> None:
    """Keeps heads per group (or globally with group_aware=False, the ablation baseline) and channels; the kept
    inner channels k_inner = (k_heads[:, None] * P + k_P[None, :]).ravel() for z, x, the x conv, the norm and
    out_proj's input; B/C (projections and convs) whole; dt and the per-head params by head.

    options["order"] == "importance" (for the targets given, full size included): heads in descending score inside
    each SSM group (groups in their order) and channels in descending score (the same order in every head); every
    head keeps its group, so the gated norm's groups and the B/C broadcast are unchanged. Needs group_aware (a
    global order would move heads across groups)."""
    m = config.mamba
    heads = m.num_heads if mamba_heads is None else mamba_heads
    head_dim = m.head_dim if mamba_head_dim is None else mamba_head_dim
    # in importance order, an axis whose target was given is permuted even at its full size
    order_heads = importance_order(options) and mamba_heads is not None
    order_channels = importance_order(options) and mamba_head_dim is not None
    group_aware = options.get("group_aware", True)
    if order_heads and not group_aware:
        raise ValueError("order='importance' with group_aware=False is invalid: Mamba heads are ordered within "
                         "their SSM group, so group_aware must be True")
    if heads == m.num_heads and head_dim == m.head_dim and not (order_heads or order_channels):
        return
    k_P = np.arange(m.head_dim) if head_dim == m.head_dim and not order_channels else keep_top(
        read(f"{name}/mamba_channels", (m.head_dim,)), head_dim, order_channels)
    if heads == m.num_heads and not order_heads:
        k_heads = np.arange(m.num_heads)
    else:
        # with the per-channel map S_x [H, P] at hand, heads are scored on the kept channels only
        s_x = read.optional(f"{name}/mamba_x", (m.num_heads, m.head_dim))
        head_score = (np.sqrt(np.sum(np.square(s_x[:, k_P]), axis=1)) if s_x is not None and head_dim < m.head_dim
                      else read(f"{name}/mamba_heads", (m.num_heads,)))
        k_heads = (keep_top_grouped(head_score, m.n_groups, heads, order_heads) if group_aware
                   else keep_top(head_score, heads))
    record(options, f"{name}/mamba_heads", k_heads)
    record(options, f"{name}/mamba_channels", k_P)
    k_inner = (k_heads[:, None] * m.head_dim + k_P[None, :]).ravel()
    for part, keep in (("z", k_inner), ("x", k_inner), ("dt", k_heads)):
        take(layer, f"mixer/in_proj_{part}/kernel", keep, 1)
        take(layer, f"mixer/in_proj_{part}/bias", keep, 0)
    take(layer, "mixer/conv1d_x/kernel", k_inner, 1)
    take(layer, "mixer/conv1d_x/bias", k_inner, 0)
    for param in ("A_log", "D", "dt_bias"):
        take(layer, f"mixer/{param}", k_heads, 0)
    take(layer, "mixer/norm/scale", k_inner, 0)
    take(layer, "mixer/out_proj/kernel", k_inner, 0)


def mask(config, live: dict, out: dict) -> dict:
    """The first live["mamba_heads"]/n_groups heads of every SSM group and the first live["mamba_head_dim"]
    channels of every head (masked forward; see `LayerKind.mask`). x is masked after its convolution (whose bias
    would revive a dead channel): a dead channel's x is then zero through the scan and the D skip, so is its gated
    value y * silu(z), and the gated norm averages each group over its live channels only. B, C, dt and z stay
    whole: they only ever multiply x's zeros. The gated output is masked again before out_proj, carrying the
    router multipliers (after the norm, which would cancel a scale)."""
    m = config.mamba
    if "mamba_heads" not in live and "mamba_head_dim" not in live:
        return {}
    heads = live.get("mamba_heads", m.num_heads)
    channels = live.get("mamba_head_dim", m.head_dim)
    inner = outer(grouped_prefix(m.num_heads, m.n_groups, heads), prefix(m.head_dim, channels))
    multiplier = out.get("mamba_heads", 1.0) * out.get("mamba_head_dim", 1.0)
    return {"x": inner, "out_proj_in": inner * multiplier, "norm": {"live": (heads // m.n_groups) * channels}}


KIND = register_kind(LayerKind(
    char="M", name="mamba", label="Mamba", mixer=Mamba2Mixer, hf_names=("linear_attention", "mamba"),
    config_field="mamba",
    mixes_tokens=True, cache=cache, cache_bytes=cache_bytes, flops=flops, importance=importance, scores=scores,
    linears=(*IN_PROJ, "out_proj"),
    fused={**{f"in_proj_{p}": ("in_proj", i) for i, p in enumerate(IN_PROJ_PARTS)},
           **{f"conv1d_{p}": ("conv1d", i) for i, p in enumerate(CONV_PARTS)}},
    residual_in=IN_PROJ, residual_out=("out_proj",),
    slice_hidden=lambda layer, k, config: slice_linear_hidden(layer, k, IN_PROJ, ("out_proj",)),
    # compile work: a Mamba block cost 5-9 s of the Nemotron-H-8B train step's compile (8 CPU devices, 2-core
    # host), an MLP block well under one
    compile_cost=8.0,
    width=(WidthRule(("mamba_heads", "mamba_head_dim"), _changes, _slice, _axes),), mask=mask,
))
