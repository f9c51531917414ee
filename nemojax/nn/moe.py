"""NemotronH mixture of experts (docs/numerics.md 8; LatentMoE: arXiv 2512.20856).

    router (float32): s = sigmoid(x @ W_gate); choose top-k by s + e_score_correction_bias, within the best
        topk_group of n_group groups; weights are the unbiased s of the chosen experts, normalised
        (norm_topk_prob) and multiplied by routed_scaling_factor
    routed: r = sum_k w_k * expert_k(fc1_latent(x)), accumulated in float32, then fc2_latent
    output: r + shared_expert(x)          (shared expert and router see the full-width x)

Two dispatches compute the routed sum and are equal to round-off: `dense` runs every expert on every token and
combines with a one-hot weight matrix (simple and fast for a handful of experts); `ragged` sorts the token-expert
pairs by expert and runs two `jax.lax.ragged_dot` calls (dropless; the work is top_k per token, not E).
Quantized experts (a recipe reaching `experts/up_proj`, `experts/down_proj`) use the same choice: the ragged path
fake-quantizes each expert's weight and each expert's group of token rows (per-expert amaxes) and then runs the
same ragged_dot (`experts_ragged_quantized`); quantized training and stochastic rounding keep the dense path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.lowp.matmul import HIGHEST, fake_quant_operand
from nemojax.nn.linear import (
    calibrating,
    dense,
    dtypes,
    logical_param,
    quant_key,
    quant_spec,
    quant_state,
    quantized_dot,
    record_amax,
    weight_quant_state,
)
from nemojax.nn.live import keep, live
from nemojax.nn.mlp import MLP, relu2

f32 = jnp.float32


def route(logits: jax.Array, bias: jax.Array, *, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, scaling: float, live_experts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """logits: [T, E] float32, bias: [E] -> (weights [T, k] float32, expert ids [T, k] int32).

    live_experts: [E] bool, the experts a masked (elastic) forward keeps: the others are never chosen (their selection
    score is -inf, as Star Elastic masks router logits, arXiv 2605.07182), which equals routing the sliced model."""
    T, E = logits.shape
    scores = jax.nn.sigmoid(logits.astype(f32))
    choice = scores + bias.astype(f32)  # the bias steers selection only
    if live_experts is not None:
        choice = jnp.where(live_experts, choice, -jnp.inf)
    if n_group > 1:
        grouped = choice.reshape(T, n_group, E // n_group)
        group_score = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, kept = jax.lax.top_k(group_score, topk_group)
        keep = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], kept].set(True)
        choice = jnp.where(jnp.repeat(keep, E // n_group, axis=-1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, ids.astype(jnp.int32)


def _hidden(h: jax.Array, units: jax.Array | None) -> jax.Array:
    """relu2 of an expert's up projection h [..., F], times the live-units mask [F] of a nested submodel (None:
    all units; `nemojax.nn.live`)."""
    h = relu2(h)
    return h if units is None else h * units.astype(h.dtype)


def experts_dense(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, ids: jax.Array,
                  units: jax.Array | None = None) -> jax.Array:
    """Every expert on every token. x: [T, D], up: [E, D, F], down: [E, F, D], weights/ids: [T, k] -> [T, D] f32.
    units: [F] mask of the live hidden units (a masked elastic forward) or None."""
    combine_te = jnp.sum(jax.nn.one_hot(ids, up.shape[0], dtype=f32) * weights[..., None], axis=1)
    h_tef = _hidden(jnp.einsum("td,edf->tef", x, up), units)
    y_ted = jnp.einsum("tef,efd->ted", h_tef, down)
    return jnp.einsum("ted,te->td", y_ted.astype(f32), combine_te)


def experts_ragged(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, ids: jax.Array,
                   units: jax.Array | None = None) -> jax.Array:
    """Dropless grouped matmul over the token-expert pairs sorted by expert. Shapes as `experts_dense`."""
    T, k = ids.shape
    E = up.shape[0]
    flat_ids = ids.reshape(T * k)
    order = jnp.argsort(flat_ids)
    x_sorted = x[order // k]
    group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    h = _hidden(jax.lax.ragged_dot(x_sorted, up, group_sizes), units)
    y_sorted = jax.lax.ragged_dot(h, down, group_sizes)
    y_tkd = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd.astype(f32), weights)


def _routed_inputs(x: jax.Array, weights: jax.Array, ids: jax.Array, E: int) -> tuple[jax.Array, jax.Array]:
    """(combine weights [T, E], each expert's input [E, T, D] with the tokens not routed to it zeroed)."""
    combine_te = jnp.sum(jax.nn.one_hot(ids, E, dtype=f32) * weights[..., None], axis=1)
    routed_et = (combine_te > 0).T
    return combine_te, jnp.where(routed_et[..., None], x[None], jnp.zeros((), x.dtype))


def experts_quantized(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, ids: jax.Array,
                      quantized: tuple, units: jax.Array | None = None) -> jax.Array:
    """`experts_dense` with each expert's GEMMs in low precision. `quantized` holds (spec, state, key) for
    up_proj and for down_proj (a None spec: high precision); states carry per-expert entries ([E] amaxes).

    Each expert sees only the tokens routed to it (the others are zeroed), so a per-tensor amax computed on the
    fly is the amax of the expert's own input, as with one Linear per expert.
    """
    E = up.shape[0]
    combine_te, x_etd = _routed_inputs(x, weights, ids, E)

    def per_expert(h_etx: jax.Array, w_exy: jax.Array, spec, state, key) -> jax.Array:
        if spec is None:
            return jnp.einsum("etx,exy->ety", h_etx, w_exy)
        keys = None if key is None else jax.random.split(key, E)
        return jax.vmap(lambda h, w, st, k: quantized_dot(h, w, spec, st, k))(h_etx, w_exy, state, keys)

    (up_spec, up_state, up_key), (down_spec, down_state, down_key) = quantized
    h_etf = _hidden(per_expert(x_etd, up, up_spec, up_state, up_key), units)
    y_etd = per_expert(h_etf, down, down_spec, down_state, down_key)
    return jnp.einsum("etd,te->td", y_etd.astype(f32), combine_te)


def ragged_quantizable(spec) -> bool:
    """Whether an expert GEMM under `spec` (a LinearQuant or None) can run on the ragged path: high precision, or
    fake quantization (QAT / QAD / PTQ) with round-to-nearest operands. Quantized training (spec.grad) quantizes
    its backward GEMMs per expert, and stochastic rounding draws per-expert keys: both keep the dense path."""
    if spec is None:
        return True
    operands = [t for t in (spec.input, spec.weight) if t is not None]
    return spec.grad is None and all(t.rounding == "rne" for t in operands)


def _group_amax(h: jax.Array, group: jax.Array, E: int) -> jax.Array:
    """Per-expert max |h| over the finite values of its rows (h: [R, K], group: [R] expert of each row) -> [E]
    float32; 0 for an expert without rows."""
    hf = h.astype(f32)
    row_amax = jnp.max(jnp.where(jnp.isfinite(hf), jnp.abs(hf), 0.0), axis=-1)
    return jnp.maximum(jax.ops.segment_max(row_amax, group, num_segments=E), 0.0)


def _grouped_quantized_dot(h: jax.Array, w: jax.Array, group_sizes: jax.Array, group: jax.Array, spec,
                           state) -> jax.Array:
    """h: [R, K] rows sorted by expert (group: [R] their experts, group_sizes: [E]) @ w: [E, K, N] per expert,
    each GEMM in the formats of `spec` -> [R, N] in h's dtype.

    The operands are what one `quantized_dot` per expert sees (nemojax.nn.linear): each expert's weight
    fake-quantized with its own amax and block scales, and each expert's rows with the amax of that expert (its
    calibrated [E] entry where > 0, else the max |x| over its own rows), passed to the quantizer row by row.
    """
    if spec is None:
        return jax.lax.ragged_dot(h, w, group_sizes)
    E = w.shape[0]
    if spec.weight is not None:
        def one_weight(w_e: jax.Array, st_e: dict) -> jax.Array:
            amax, block_scale = weight_quant_state(w_e, spec, st_e)
            return fake_quant_operand(w_e, spec.weight, axis=0, amax=amax, block_scale=block_scale)

        w = jax.vmap(one_weight)(w, state)
    if spec.input is not None:
        static = state["input_amax"]  # [E] or None
        if static is None:
            amax = _group_amax(h, group, E)
        else:  # as `calibrated`: the calibrated amax where set, else the current max |x| of the expert's rows
            current = jnp.maximum(jax.ops.segment_max(jnp.max(jnp.abs(h.astype(f32)), -1), group, num_segments=E),
                                  0.0)
            amax = jnp.where(static > 0, static, current)
        h = fake_quant_operand(h, spec.input, axis=-1, amax=amax[group])
    # y[r, n] = sum_k h[r, k] w[group[r], k, n], float32 accumulation as the dense path's dot
    y = jax.lax.ragged_dot(h.astype(f32), w.astype(f32), group_sizes, precision=HIGHEST,
                           preferred_element_type=f32)
    return y.astype(h.dtype)


def experts_ragged_quantized(x: jax.Array, up: jax.Array, down: jax.Array, weights: jax.Array, ids: jax.Array,
                             quantized: tuple, units: jax.Array | None = None) -> jax.Array:
    """`experts_ragged` with each expert's GEMMs in low precision (fake quantization); `quantized` as in
    `experts_quantized` (keys unused: round-to-nearest only, see `ragged_quantizable`). Equal to
    `experts_quantized` to f32 summation order, with top_k rows per token instead of E."""
    T, k = ids.shape
    E = up.shape[0]
    flat_ids = ids.reshape(T * k)
    order = jnp.argsort(flat_ids)
    group = flat_ids[order]
    x_sorted = x[order // k]
    group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    (up_spec, up_state, _), (down_spec, down_state, _) = quantized
    h = _hidden(_grouped_quantized_dot(x_sorted, up, group_sizes, group, up_spec, up_state), units)
    y_sorted = _grouped_quantized_dot(h, down, group_sizes, group, down_spec, down_state)
    y_tkd = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(T, k, -1)
    return jnp.einsum("tkd,tk->td", y_tkd.astype(f32), weights)


class Router(nn.Module):
    """x: [T, hidden] -> (weights [T, k], ids [T, k]). Kernel and correction bias are kept in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, e = self.config, self.config.moe
        kernel = logical_param(self, "kernel", nn.initializers.normal(cfg.initializer_range), ("embed", None),
                               (cfg.hidden_size, e.num_experts), f32)
        bias = logical_param(self, "e_score_correction_bias", nn.initializers.zeros_init(), (None,),
                             (e.num_experts,), f32)
        logits = jnp.dot(x.astype(f32), kernel)
        weights, ids = route(logits, bias, top_k=e.top_k, n_group=e.n_group, topk_group=e.topk_group,
                             norm_topk_prob=e.norm_topk_prob, scaling=e.routed_scaling_factor,
                             live_experts=live(self, "experts"))
        # Statistics for the load-balancing loss and the aux-loss-free bias update (nemojax.train.moe_balance);
        # sow is a no-op unless the caller makes "intermediates" mutable.
        scores = jax.nn.sigmoid(logits)
        self.sow("intermediates", "expert_load", jnp.sum(jax.nn.one_hot(ids, e.num_experts, dtype=f32), (0, 1)))
        self.sow("intermediates", "expert_prob", jnp.mean(scores / jnp.sum(scores, -1, keepdims=True), axis=0))
        return weights, ids


class Experts(nn.Module):
    """Stacked routed experts: `up_proj` [E, D_in, F] and `down_proj` [E, F, D_in] ([in, out] per expert)."""

    config: ModelConfig
    input_size: int

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        cfg, e = self.config, self.config.moe
        dtype, param_dtype = dtypes(cfg)
        init = nn.initializers.normal(cfg.initializer_range)
        up = logical_param(self, "up_proj", init, ("experts", "embed", "mlp"),
                           (e.num_experts, self.input_size, e.intermediate_size), param_dtype)
        down = logical_param(self, "down_proj", init, ("experts", "mlp", "embed"),
                             (e.num_experts, e.intermediate_size, self.input_size), param_dtype)
        specs = {name: quant_spec(self, name) for name in ("up_proj", "down_proj")}
        units = live(self, "units")  # a nested submodel's live hidden units of every expert (nemojax.nn.live)
        if all(spec is None for spec in specs.values()):
            run = experts_dense if cfg.runtime.resolved_moe_impl(e.num_experts) == "dense" else experts_ragged
            return run(x.astype(dtype), up.astype(dtype), down.astype(dtype), weights, ids, units)
        # Low precision: every expert sees its own routed tokens; ragged when the config asks for it and every GEMM
        # is fake-quantized with round-to-nearest (ragged_quantizable), else the dense dispatch.
        axes = {"up_proj": ("experts", "embed", "mlp"), "down_proj": ("experts", "mlp", "embed")}
        quantized = tuple(
            (spec, None, None) if spec is None else
            (spec, quant_state(self, name, spec, w.shape, 1, axes[name]), quant_key(self, spec))
            for (name, spec), w in zip(specs.items(), (up, down), strict=True))
        if calibrating(self):
            _, x_etd = _routed_inputs(x.astype(dtype), weights, ids, e.num_experts)
            h_etf = _hidden(jnp.einsum("etd,edf->etf", x_etd, up.astype(dtype)), units)
            for (name, spec), h in zip(specs.items(), (x_etd, h_etf), strict=True):
                if spec is not None and spec.input is not None:
                    record_amax(self, f"{name}_input_amax", jnp.max(jnp.abs(h), axis=(1, 2)))
            return experts_dense(x.astype(dtype), up.astype(dtype), down.astype(dtype), weights, ids, units)
        ragged = cfg.runtime.resolved_moe_impl(e.num_experts) == "ragged" and \
            all(ragged_quantizable(spec) for spec in specs.values())
        run = experts_ragged_quantized if ragged else experts_quantized
        return run(x.astype(dtype), up.astype(dtype), down.astype(dtype), weights, ids, quantized, units)


class MoE(nn.Module):
    """x: [b, L, hidden] (the block's normed input) -> (y [b, L, hidden], state); stateless (state stays None)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, state: None = None, step: Any = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, None]:
        del step, segment_ids  # per token
        cfg, e = self.config, self.config.moe
        dtype, _ = dtypes(cfg)
        b, L, D = x.shape
        tokens = x.reshape(b * L, D)
        weights, ids = Router(cfg, name="gate")(tokens)
        v = tokens
        if e.latent_size is not None:
            v = dense(cfg, e.latent_size, ("embed", "mlp"), name="fc1_latent_proj", use_bias=cfg.mlp_bias)(v)
        self.sow("taps", "expert_in", v)  # activation importance (nemojax.compress.importance)
        self.sow("taps", "expert_ids", ids)
        routed = Experts(cfg, e.latent_size or D, name="experts")(v, weights, ids).astype(dtype)
        routed = keep(self, "routed", routed)  # the experts axis's router multiplier (nemojax.nn.live)
        if e.latent_size is not None:
            routed = dense(cfg, D, ("mlp", "embed"), name="fc2_latent_proj", use_bias=cfg.mlp_bias)(routed)
        out = routed.reshape(b, L, D)
        if e.n_shared_experts:
            out = out + MLP(cfg, e.n_shared_experts * e.shared_intermediate_size, name="shared_experts")(x)[0]
        return out, state
