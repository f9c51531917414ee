"""Keeping MoE experts evenly loaded: the auxiliary load-balancing loss and the aux-loss-free bias update.

Both read the router statistics each MoE layer sows into the "intermediates" collection (`nemojax.nn.moe.Router`):
`expert_load` [E], the number of (token, slot) assignments per expert, and `expert_prob` [E], the mean over tokens
of the per-token normalised sigmoid scores.

    aux loss (Switch / Megatron "aux_loss"):  E * sum_e f_e * P_e,  f_e = load_e / (tokens * top_k)
    bias update (DeepSeek-V3 aux-loss-free):  b_e <- b_e + rate * sign(mean(load) - load_e)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Stats = dict[tuple[str, ...], jax.Array]


def router_stats(intermediates: Any, name: str) -> Stats:
    """{router module path: sown value} for every router that sowed `name`."""
    stats = {}
    for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if name in keys:
            router_path = keys[:keys.index(name)]
            stats[router_path] = value
    return stats


def load_balancing_loss(intermediates: Any) -> jax.Array:
    """Mean over MoE layers of E * sum_e f_e * P_e (1.0 when perfectly balanced); 0 if there is no MoE layer.

    A router's statistics are [E], or [R, E] for the R layers of a scanned stack (one router path, stacked)."""
    loads = router_stats(intermediates, "expert_load")
    probs = router_stats(intermediates, "expert_prob")
    losses = []
    for path, load in loads.items():
        num_experts = load.shape[-1]
        fraction = jax.lax.stop_gradient(load / jnp.maximum(jnp.sum(load, -1, keepdims=True), 1.0))
        losses.append(num_experts * jnp.sum(fraction * probs[path], -1).reshape(-1))
    return jnp.mean(jnp.concatenate(losses)) if losses else jnp.zeros((), jnp.float32)


def expert_loads(intermediates: Any) -> Stats:
    return {path: jax.lax.stop_gradient(load) for path, load in router_stats(intermediates, "expert_load").items()}


def update_correction_bias(params: Any, loads: Stats, rate: float) -> Any:
    """Moves each router's e_score_correction_bias towards balance: up for under-loaded experts, down for
    over-loaded ones, by `rate` per step. Returns new params."""
    if rate == 0 or not loads:
        return params

    def visit(tree: Any, prefix: tuple[str, ...]) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = {k: visit(v, prefix + (k,)) for k, v in tree.items()}
        if prefix in loads and "e_score_correction_bias" in out:
            load = loads[prefix]
            bias = out["e_score_correction_bias"]
            balanced = jnp.mean(load, -1, keepdims=True)  # per layer ([R, E] loads of a scanned stack)
            out["e_score_correction_bias"] = bias + rate * jnp.sign(balanced - load).astype(bias.dtype)
        return out

    return visit(params, ())
