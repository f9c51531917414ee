"""The mixture-of-experts layer kind ('E'): sigmoid router, stacked relu^2 experts, shared expert, optional latent
projections (LatentMoE). Stateless.

Experts are pruned by their routing scores, group-aware per routing group (the same number of experts kept in
every group when moe.n_group > 1); each kept expert keeps its own top hidden units; the shared expert's hidden
units are pruned like an MLP's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.families import Axis, LayerKind, WidthRule, register_kind
from nemojax.kinds.masking import grouped_prefix, prefix
from nemojax.kinds.pruning import (
    WIDTH_FRACTIONS,
    hardware_multiple,
    importance_order,
    keep_top,
    keep_top_grouped,
    record,
    slice_linear_hidden,
    slice_mlp,
    take,
)
from nemojax.nn.linear import dtypes
from nemojax.nn.mlp import relu2
from nemojax.nn.moe import MoE

f32 = jnp.float32


def flops(config, seq_len: int) -> float:
    """Router, top_k routed experts per token, shared experts and latent projections."""
    del seq_len
    e, D = config.moe, config.hidden_size
    d_in = e.latent_size or D
    total = 2.0 * D * e.num_experts + e.top_k * 2 * (2.0 * d_in * e.intermediate_size)
    total += 2 * (2.0 * D * e.n_shared_experts * e.shared_intermediate_size) if e.n_shared_experts else 0
    return total + (2 * (2.0 * D * e.latent_size) if e.latent_size else 0)


def _routing_weights(config, taps: dict, params: dict) -> jax.Array | None:
    """[T, k] float32: the weight the layer multiplies each chosen expert's output by (normalised, scaled), for the
    experts in taps["expert_ids"]. Read from the "expert_weights" tap when the mixer sows it; otherwise recomputed
    from the router params when the router reads the expert input itself (no latent projection); else None."""
    if "expert_weights" in taps:
        return taps["expert_weights"].astype(f32)
    e = config.moe
    if e.latent_size is not None:
        return None  # the router's input (the block's normed x) is not among the mixer's taps
    logits = jnp.dot(taps["expert_in"].astype(f32), params["gate"]["kernel"].astype(f32))
    # the weights of the experts the forward chose (its ids), as `nemojax.nn.moe.route` computes them
    weights = jnp.take_along_axis(jax.nn.sigmoid(logits), taps["expert_ids"], axis=-1)
    if e.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * e.routed_scaling_factor


def _expert_taps(config, x: jax.Array, ids: jax.Array, weights: jax.Array | None, up: jax.Array, down: jax.Array,
                 b: int, stat):
    """x: [T = b*L, D_in] expert input, ids: [T, k], weights: [T, k] routing weights or None, up: [E, D_in, F],
    down: [E, F, D_in] -> (down_proj-input row stats [b, E, F] over the tokens routed to each expert,
     sum over routed tokens of ||expert output||_2 [E], routed token count [E],
     sum over routed tokens of routing weight * ||expert output||_2 [E] (zeros when weights is None))."""
    dtype, _ = dtypes(config)
    T = x.shape[0]
    L = T // b
    E = up.shape[0]
    onehot_tke = (ids[:, :, None] == jnp.arange(E)[None, None, :]).astype(f32)
    routed_te = jnp.max(onehot_tke, axis=1)  # [T, E]
    weight_te = jnp.zeros_like(routed_te) if weights is None else jnp.sum(onehot_tke * weights[:, :, None], axis=1)
    x = x.astype(dtype)

    def one(args):
        up_e, down_e, m_t, w_t = args
        h_tf = relu2(jnp.einsum("td,df->tf", x, up_e.astype(dtype)))
        y_td = jnp.einsum("tf,fd->td", h_tf, down_e.astype(dtype)).astype(f32)
        stat_bf = stat(h_tf.reshape(b, L, -1), m_t.reshape(b, L))
        norm_t = jnp.linalg.norm(y_td, axis=-1)
        return stat_bf, jnp.sum(m_t * norm_t), jnp.sum(m_t), jnp.sum(m_t * w_t * norm_t)

    stat_ebf, l2sum_e, count_e, reapsum_e = jax.lax.map(one, (up, down, routed_te.T, weight_te.T))
    return jnp.transpose(stat_ebf, (1, 0, 2)), l2sum_e, count_e, reapsum_e


def importance(config, taps: dict, params: dict, stat) -> dict:
    """shared_mlp: the shared expert's down_proj input statistic; expert_ffn / expert_l2sum / expert_count:
    each expert's hidden units over its routed tokens, its output norm and its load; expert_reapsum: its output
    norm weighted by its routing weight (REAP), when the routing weights are at hand (`_routing_weights`)."""
    out = {}
    if "shared_experts" in taps:
        out["shared_mlp"] = stat(taps["shared_experts"]["down_proj_in"])
    experts = params["experts"]
    weights = _routing_weights(config, taps, params)
    ffn, l2sum, count, reapsum = _expert_taps(config, taps["expert_in"], taps["expert_ids"], weights,
                                              experts["up_proj"], experts["down_proj"], taps["batch"], stat)
    out = {**out, "expert_ffn": ffn, "expert_l2sum": l2sum, "expert_count": count}
    if weights is not None:
        out["expert_reapsum"] = reapsum
    return out


def scores(config, stats: dict) -> dict:
    """experts [E] = sum over routed tokens of ||expert output||_2 / (routed count + 1e-8) over all batches;
    experts_reap [E] = sum over routed tokens of (routing weight x ||expert output||_2) / (routed count + 1e-8),
    the REAP score (router-weighted expert activation pruning, arXiv 2510.13999: the mean over the tokens routed
    to the expert; Star Elastic, arXiv 2605.07182, ranks experts by it; present when the routing weights were at
    hand); expert_ffn [E, F]; shared_mlp [F_shared] when there is a shared
    expert."""
    out = {"experts": stats["expert_l2sum"] / (stats["expert_count"] + 1e-8), "expert_ffn": stats["expert_ffn"]}
    if "expert_reapsum" in stats:
        out["experts_reap"] = stats["expert_reapsum"] / (stats["expert_count"] + 1e-8)
    if "shared_mlp" in stats:
        out["shared_mlp"] = stats["shared_mlp"]
    return out


def _slice_hidden(layer: dict, k_hidden: np.ndarray, config) -> None:
    ins, outs = ["shared_experts/up_proj"], ["shared_experts/down_proj"]
    take(layer, "mixer/gate/kernel", k_hidden, 0)
    if config.moe.latent_size is not None:
        ins.append("fc1_latent_proj")
        outs.append("fc2_latent_proj")
    else:
        take(layer, "mixer/experts/up_proj", k_hidden, 1)
        take(layer, "mixer/experts/down_proj", k_hidden, 2)
    slice_linear_hidden(layer, k_hidden, ins, outs)


def _expert_axes(config) -> dict[str, Axis]:
    e = config.moe
    minimum = max(e.top_k, 2 * e.n_group if e.n_group > 1 else 1)
    if e.n_group > 1:
        minimum = max(minimum, -(-e.top_k * e.n_group // e.topk_group))
    return {"experts": Axis(e.num_experts, e.n_group, minimum=minimum, grid=(1.0, 0.875, 0.75),
                            why=f"the same number of experts in each of the moe.n_group={e.n_group} routing groups, "
                                f"and room for top_k={e.top_k}"),
            "expert_ffn": Axis(e.intermediate_size, grid=WIDTH_FRACTIONS,
                               grid_multiple=hardware_multiple(e.intermediate_size))}


def _expert_changes(config, experts: int | None = None, expert_ffn: int | None = None) -> dict:
    changes = {}
    if experts is not None:
        changes["num_experts"] = experts
    if expert_ffn is not None:
        changes["intermediate_size"] = expert_ffn
    return {"moe": changes}


def _expert_slice(layer: dict, name: str, config, read, options: dict, experts: int | None = None,
                  expert_ffn: int | None = None) -> None:
    """experts keeps the top experts (router columns, correction-bias entries and expert tensors together; per
    routing group when moe.n_group > 1); expert_ffn keeps, for every kept expert, its own top hidden units.
    options["order"] == "importance" (for the targets given, full size included): experts in descending score
    inside each routing group (groups in their order, so the group-limited routing is unchanged) and each expert's
    hidden units in descending score."""
    e = config.moe
    order_experts = importance_order(options) and experts is not None
    order_ffn = importance_order(options) and expert_ffn is not None
    k_E = None
    if experts is not None and (experts < e.num_experts or order_experts):
        k_E = keep_top_grouped(read(f"{name}/experts", (e.num_experts,)), e.n_group, experts, order_experts)
        record(options, f"{name}/experts", k_E)
        take(layer, "mixer/gate/kernel", k_E, 1)
        take(layer, "mixer/gate/e_score_correction_bias", k_E, 0)
        take(layer, "mixer/experts/up_proj", k_E, 0)
        take(layer, "mixer/experts/down_proj", k_E, 0)
    if expert_ffn is not None and (expert_ffn < e.intermediate_size or order_ffn):
        scores = read(f"{name}/expert_ffn", (e.num_experts, e.intermediate_size))
        if k_E is not None:
            scores = scores[k_E]
        k_F = np.stack([keep_top(row, expert_ffn, order_ffn) for row in scores])
        record(options, f"{name}/expert_ffn", k_F)  # [kept experts (new order), expert_ffn]
        stacked = layer["mixer"]["experts"]
        stacked["up_proj"] = np.take_along_axis(stacked["up_proj"], k_F[:, None, :], axis=2)  # [E, D, F]
        stacked["down_proj"] = np.take_along_axis(stacked["down_proj"], k_F[:, :, None], axis=1)  # [E, F, D]


def _shared_axes(config) -> dict[str, Axis]:
    e = config.moe  # not in the default search grid
    return {"shared_ffn": Axis(e.shared_intermediate_size)} if e.n_shared_experts == 1 else {}


def _shared_changes(config, shared_ffn: int) -> dict:
    e = config.moe
    if e.n_shared_experts != 1:
        raise ValueError(f"shared_ffn={shared_ffn!r} is invalid: shared-expert pruning needs "
                         f"moe.n_shared_experts=1 (found {e.n_shared_experts})")
    return {"moe": {"shared_intermediate_size": shared_ffn}}


def _shared_slice(layer: dict, name: str, config, read, options: dict, shared_ffn: int) -> None:
    """Keeps the shared expert's top hidden units (in descending score when options["order"] is "importance")."""
    e = config.moe
    ordered = importance_order(options)
    if shared_ffn < e.shared_intermediate_size or ordered:
        k_shared = keep_top(read(f"{name}/shared_mlp", (e.shared_intermediate_size,)), shared_ffn, ordered)
        record(options, f"{name}/shared_mlp", k_shared)
        slice_mlp(layer, k_shared, prefix="mixer/shared_experts")


def mask(config, live: dict, out: dict) -> dict:
    """The first live["experts"]/n_group experts of every routing group, the first live["expert_ffn"] hidden
    units of every expert and the first live["shared_ffn"] of the shared expert (masked forward; see
    `LayerKind.mask`). Dead experts are never routed to: the router gets their mask and gives them a -inf
    selection score before its top-k, as Star Elastic does (arXiv 2605.07182); top_k is unchanged. The experts
    axis's router multiplier scales the routed sum."""
    e = config.moe
    entries: dict = {}
    if "experts" in live:
        entries["gate"] = {"experts": grouped_prefix(e.num_experts, e.n_group, live["experts"]) > 0}
        entries["routed"] = jnp.ones((1,), jnp.float32) * out.get("experts", 1.0)
    if "expert_ffn" in live:
        entries["experts"] = {"units": prefix(e.intermediate_size, live["expert_ffn"]) * out.get("expert_ffn", 1.0)}
    if "shared_ffn" in live:
        entries["shared_experts"] = {
            "units": prefix(e.shared_intermediate_size, live["shared_ffn"]) * out.get("shared_ffn", 1.0)}
    return entries


KIND = register_kind(LayerKind(
    char="E", name="moe", mixer=MoE, hf_names=("moe",), config_field="moe", label="MoE", flops=flops,
    importance=importance, summed=("expert_l2sum", "expert_count", "expert_reapsum"), scores=scores,
    linears=("fc1_latent_proj", "fc2_latent_proj", "shared_experts/up_proj", "shared_experts/down_proj",
             "experts/up_proj", "experts/down_proj"),
    residual_in=("shared_experts/up_proj", "fc1_latent_proj"),
    residual_out=("shared_experts/down_proj", "fc2_latent_proj"),
    slice_hidden=_slice_hidden,
    compile_cost=4.0,  # a guess between Mamba's and attention's
    width=(WidthRule(("experts", "expert_ffn"), _expert_changes, _expert_slice, _expert_axes),
           WidthRule(("shared_ffn",), _shared_changes, _shared_slice, _shared_axes)),
    mask=mask,
))
