"""Minitron width and depth pruning of a NemotronH `Model`, with group-aware Mamba-2 slicing (Minitron,
arXiv 2407.14679 and 2408.11796; Minitron-SSM, arXiv 2504.11409). The slicing rules are those of ModelOpt's
Minitron plugin ("ModelOpt" below: NVIDIA/Model-Optimizer@a2fbac7:modelopt/torch/prune/plugins/mcore_minitron.py).

    small = prune(model, scores, hidden=48, ffn=96, heads=2, mamba_heads=4, mamba_head_dim=8, layers=6)

`prune` is a pure transform: it returns a new `Model` (a new, validated config and sliced params) and never
edits its input. Every axis keeps the `target` highest-scoring indices and puts them back in ascending order,
so the kept channels stay in their original order (equal to ModelOpt's importance-ordered slicing
up to a permutation). Ties go to the lower index.

`scores` maps a name to a numpy-convertible vector (higher = more important); the keys read are

    "hidden"                   [hidden_size]           embedding channels (the residual stream)
    "layers_{i}/heads"         [num_heads]             attention layer i, query heads
    "layers_{i}/mlp"           [intermediate_size]     '-' layer i
    "layers_{i}/mamba_heads"   [H]                     Mamba layer i, heads (ranked within their SSM group)
    "layers_{i}/mamba_channels" [P]                    Mamba layer i, head channels (the same P' kept in every head)
    "layers_{i}/mamba_x"       [H, P]   optional       per-channel map; when present and channels are pruned too,
                                                       heads are scored on the kept channels only (Minitron-SSM)
    "layers_{i}/shared_mlp"    [shared_intermediate_size]  MoE layer i, shared-expert hidden units
    "layers_{i}/experts"       [E]                     MoE layer i, routed experts
    "layers_{i}/expert_ffn"    [E, F]                  MoE layer i, each expert's hidden units
    "layer/block"              [num_layers]            depth pruning: the lowest-scoring layers are dropped

and, for the layers of an MTP head, the same per-layer keys under "mtp/" ("mtp/layers_{k}/heads", ...). A key
is read only for an axis that actually shrinks; a missing one raises a ValueError that names it. Layer indices
are those of the input model (width pruning happens before the depth renumbering).

Decisions:
  * Attention heads are pruned group-aware (as ModelOpt): the query heads of each KV group are ranked
    within the group and the top heads/num_kv_heads of every group are kept, so each kept query head keeps
    reading the same K/V head. num_kv_heads and head_dim never change (KV-group pruning is not offered).
  * Mamba heads are kept per SSM group (arXiv 2504.11409): the top mamba_heads/n_groups of each group, so every head
    keeps its B/C group; n_groups and state_size never change. mamba_head_dim keeps the same channels in every
    head. The gated norm keeps n_groups groups, each now (mamba_heads/G) * mamba_head_dim wide.
    `group_aware=False` is the ablation baseline (Minitron-SSM's point, arXiv 2504.11409): the top
    mamba_heads heads are ranked globally, ignoring groups, and kept in ascending order; the config still has
    n_groups groups of mamba_heads/G heads, so the kept heads are re-packed contiguously into the groups and a
    head whose group lost more (or fewer) heads than others ends up reading another group's B/C. The paper gives
    no exact recipe for the paper's unconstrained baseline; this is what slicing by a global ranking yields when
    the group structure is ignored (forcing each group to k/G by rank order instead would just reproduce the
    group-aware keep). When the global top-k happens to be balanced over the groups both modes agree.
  * MoE: `experts` keeps the top experts (group-aware per routing group when moe.n_group > 1: the same number of
    experts in every group); `expert_ffn` keeps, for every kept expert, its own top expert_ffn hidden units.
    `shared_ffn` slices the shared expert's hidden units ("layers_{i}/shared_mlp"); the latent projections keep
    their widths (only their hidden-size axis is sliced).
  * Depth: `layers` keeps that many layers with the highest "layer/block" scores; `drop_layers` names the
    layers to drop instead. Survivors are renumbered layers_0.. and the pattern string follows. The MTP head is
    never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.model import Model

__all__ = ["prune", "keep_top", "keep_top_grouped"]


# ------------------------------------------------------------------------------------------- keep vectors


def keep_top(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ascending (ties go to the lower index). score: [n] -> [k] int."""
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:k])


def keep_top_grouped(score: np.ndarray, groups: int, k: int) -> np.ndarray:
    """Group-aware keep: score [n] is `groups` contiguous groups of n/groups; the top k/groups of every group are
    kept (ranked within the group). Returns [k] ascending global indices."""
    score = np.asarray(score, np.float64)
    size = score.shape[0] // groups
    per = k // groups
    kept = [g * size + keep_top(score[g * size:(g + 1) * size], per) for g in range(groups)]
    return np.concatenate(kept).astype(np.int64)


def _expand(keep: np.ndarray, width: int) -> np.ndarray:
    """expand(k, d) = (k[:, None] * d + arange(d)).ravel(): the channels of the kept heads."""
    return (keep[:, None] * width + np.arange(width)[None, :]).ravel()


# ----------------------------------------------------------------------------------------------- checking


def _allowed(values: Sequence[int], limit: int = 16) -> str:
    values = list(values)
    if len(values) <= limit:
        return str(values)
    head = ", ".join(str(v) for v in values[:limit // 2])
    tail = ", ".join(str(v) for v in values[-limit // 2:])
    return f"[{head}, ..., {tail}]"


def _check_target(name: str, value: Any, full: int, multiple_of: int = 1, minimum: int = 1,
                  why: str = "") -> int:
    """A target size: an int in [minimum, full] that divides by `multiple_of`; else ValueError with allowed values."""
    allowed = [v for v in range(max(minimum, multiple_of), full + 1) if v % multiple_of == 0]
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in allowed
    if not ok:
        rule = f"must be an integer in [{max(minimum, multiple_of)}, {full}]"
        if multiple_of > 1:
            rule += f" divisible by {multiple_of}{' (' + why + ')' if why else ''}"
        elif why:
            rule += f" ({why})"
        raise ValueError(f"{name}={value!r} is invalid: {rule}; allowed values: {_allowed(allowed)}")
    return int(value)


class _MissingScore(ValueError):
    """A score array the requested pruning needs is not in `scores`."""


class _Scores:
    """Uniform read access to a mapping (or any object with __getitem__ / get) of score vectors."""

    def __init__(self, scores: Any):
        self._scores = scores

    def optional(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The score array under `key`, or None when there is none."""
        try:
            return self(key, shape)
        except _MissingScore:
            return None

    def __call__(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        value = None
        try:
            value = self._scores[key]
        except (KeyError, IndexError, TypeError):
            getter = getattr(self._scores, "get", None)
            if callable(getter):
                value = getter(key)
        if value is None:
            raise _MissingScore(f"scores[{key!r}] is missing: it is needed to prune this axis "
                             f"(expected an array of shape {list(shape)})")
        array = np.asarray(value, np.float64)
        if array.shape != tuple(shape):
            raise ValueError(f"scores[{key!r}] has shape {list(array.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"scores[{key!r}] has non-finite values")
        return array


# ------------------------------------------------------------------------------------------ param slicing


def _take(tree: dict, path: str, keep: np.ndarray, axis: int) -> None:
    """tree[path] = take(tree[path], keep, axis), if that leaf exists (biases are optional)."""
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
        if key not in node:
            return
        node = node[key]
    if leaf in node:
        node[leaf] = np.take(node[leaf], keep, axis=axis)


def _copy_tree(tree: Mapping) -> dict:
    """A fresh nested dict with numpy leaves (the input's arrays are never written to)."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def _slice_hidden(layer: dict, kind: str, k_H: np.ndarray, cfg: ModelConfig, hidden_full: int) -> None:
    """Every tensor of one block (or MTP sub-layer) that touches the residual stream."""
    for norm in ("norm", "enorm", "hnorm", "final_layernorm"):
        _take(layer, f"{norm}/scale", k_H, 0)
    if "eh_proj" in layer:  # input is concat[enorm(e), hnorm(h)]: slice both halves
        _take(layer, "eh_proj/kernel", np.concatenate([k_H, hidden_full + k_H]), 0)
        _take(layer, "eh_proj/kernel", k_H, 1)
        _take(layer, "eh_proj/bias", k_H, 0)
    if kind == "M":
        ins, outs = [f"in_proj_{part}" for part in ("z", "x", "B", "C", "dt")], ["out_proj"]
    elif kind == "*":
        ins, outs = ["q_proj", "k_proj", "v_proj"], ["o_proj"]
    elif kind == "-":
        ins, outs = ["up_proj"], ["down_proj"]
    else:
        ins, outs = ["shared_experts/up_proj"], ["shared_experts/down_proj"]
        _take(layer, "mixer/gate/kernel", k_H, 0)
        if cfg.moe.latent_size is not None:
            ins.append("fc1_latent_proj")
            outs.append("fc2_latent_proj")
        else:
            _take(layer, "mixer/experts/up_proj", k_H, 1)
            _take(layer, "mixer/experts/down_proj", k_H, 2)
    for name in ins:
        _take(layer, f"mixer/{name}/kernel", k_H, 0)
    for name in outs:
        _take(layer, f"mixer/{name}/kernel", k_H, 1)
        _take(layer, f"mixer/{name}/bias", k_H, 0)


def _slice_attention(layer: dict, k_heads: np.ndarray, head_dim: int) -> None:
    k_q = _expand(k_heads, head_dim)
    _take(layer, "mixer/q_proj/kernel", k_q, 1)
    _take(layer, "mixer/q_proj/bias", k_q, 0)
    _take(layer, "mixer/o_proj/kernel", k_q, 0)


def _slice_mlp(layer: dict, k_F: np.ndarray, prefix: str = "mixer") -> None:
    _take(layer, f"{prefix}/up_proj/kernel", k_F, 1)
    _take(layer, f"{prefix}/up_proj/bias", k_F, 0)
    _take(layer, f"{prefix}/down_proj/kernel", k_F, 0)


def _slice_mamba(layer: dict, k_heads: np.ndarray, k_P: np.ndarray, cfg: ModelConfig) -> None:
    """Group-aware SSM pruning (Minitron-SSM, arXiv:2504.11409): the kept channels
    k_inner = (k_heads[:, None] * P + k_P[None, :]).ravel() for z, x, the x conv, the norm and out_proj's input;
    B/C (projections and convs) kept whole; dt and the per-head params by head."""
    m = cfg.mamba
    k_inner = (k_heads[:, None] * m.head_dim + k_P[None, :]).ravel()
    for part, keep in (("z", k_inner), ("x", k_inner), ("dt", k_heads)):
        _take(layer, f"mixer/in_proj_{part}/kernel", keep, 1)
        _take(layer, f"mixer/in_proj_{part}/bias", keep, 0)
    _take(layer, "mixer/conv1d_x/kernel", k_inner, 1)
    _take(layer, "mixer/conv1d_x/bias", k_inner, 0)
    for name in ("A_log", "D", "dt_bias"):
        _take(layer, f"mixer/{name}", k_heads, 0)
    _take(layer, "mixer/norm/scale", k_inner, 0)
    _take(layer, "mixer/out_proj/kernel", k_inner, 0)


def _slice_moe(layer: dict, k_E: np.ndarray | None, k_F: np.ndarray | None) -> None:
    """k_E: [E'] kept experts or None; k_F: [E', F'] kept hidden units per kept expert, or None."""
    if k_E is not None:
        _take(layer, "mixer/gate/kernel", k_E, 1)
        _take(layer, "mixer/gate/e_score_correction_bias", k_E, 0)
        _take(layer, "mixer/experts/up_proj", k_E, 0)
        _take(layer, "mixer/experts/down_proj", k_E, 0)
    if k_F is not None:
        experts = layer["mixer"]["experts"]
        up, down = experts["up_proj"], experts["down_proj"]  # [E, D, F], [E, F, D]
        experts["up_proj"] = np.take_along_axis(up, k_F[:, None, :], axis=2)
        experts["down_proj"] = np.take_along_axis(down, k_F[:, :, None], axis=1)


# ------------------------------------------------------------------------------------------------ prune


def prune(model: Model, scores: Any, *, hidden: int | None = None, ffn: int | None = None,
          heads: int | None = None, mamba_heads: int | None = None, mamba_head_dim: int | None = None,
          experts: int | None = None, expert_ffn: int | None = None, shared_ffn: int | None = None,
          layers: int | None = None, drop_layers: Sequence[int] | None = None, group_aware: bool = True) -> Model:
    """Width and depth pruning: a new Model with the given sizes (None keeps a size); see the module docstring.

    model: the parent; scores: str -> score array (keys in the module docstring; higher = more important).
    hidden: new hidden_size; ffn: new intermediate_size of '-' layers; heads: new attention num_heads (a multiple
    of num_kv_heads); mamba_heads: new mamba.num_heads (a multiple of n_groups); mamba_head_dim: new
    mamba.head_dim; experts: new moe.num_experts; expert_ffn: new moe.intermediate_size; shared_ffn: new
    moe.shared_intermediate_size (one shared expert only; scored by "layers_{i}/shared_mlp"); layers: number of
    layers to keep (by "layer/block"); drop_layers: explicit layer indices to drop (exclusive with `layers`).
    group_aware: rank Mamba heads within their SSM group (True, Minitron-SSM) or globally, re-packing the kept heads
    into the groups (False, the ablation baseline; see the module docstring).
    Raises ValueError for a target that breaks a constraint, naming it and the allowed values.
    """
    cfg = model.config
    read = _Scores(scores)
    kinds = set(cfg.pattern) | (set(cfg.mtp.pattern) if cfg.mtp else set())
    changes: dict[str, Any] = {}

    def needs(field: str, char: str, what: str) -> None:
        if char not in kinds:
            raise ValueError(f"{field} is invalid: the model has no {what} layers (pattern {cfg.pattern!r})")

    # --- targets (checked before any slicing, so a bad call fails fast and names the field)
    if hidden is not None:
        hidden = _check_target("hidden", hidden, cfg.hidden_size)
        changes["hidden_size"] = hidden
    if ffn is not None:
        needs("ffn", "-", "'-' MLP")
        ffn = _check_target("ffn", ffn, cfg.intermediate_size)
        changes["intermediate_size"] = ffn
    if heads is not None:
        needs("heads", "*", "attention")
        a = cfg.attention
        heads = _check_target("heads", heads, a.num_heads, a.num_kv_heads,
                              why=f"the same number of query heads in each of the num_kv_heads={a.num_kv_heads} "
                                  "KV groups")
        changes["attention"] = {"num_heads": heads}
    if mamba_heads is not None or mamba_head_dim is not None:
        needs("mamba_heads/mamba_head_dim", "M", "Mamba")
        m = cfg.mamba
        mamba_heads = m.num_heads if mamba_heads is None else _check_target(
            "mamba_heads", mamba_heads, m.num_heads, m.n_groups,
            why=f"the same number of heads in each of the n_groups={m.n_groups} SSM groups")
        mamba_head_dim = m.head_dim if mamba_head_dim is None else _check_target(
            "mamba_head_dim", mamba_head_dim, m.head_dim)
        changes["mamba"] = {"num_heads": mamba_heads, "head_dim": mamba_head_dim}
    if experts is not None or expert_ffn is not None:
        needs("experts/expert_ffn", "E", "MoE")
        e = cfg.moe
        moe_changes = {}
        if experts is not None:
            minimum = max(e.top_k, 2 * e.n_group if e.n_group > 1 else 1)
            if e.n_group > 1:
                minimum = max(minimum, -(-e.top_k * e.n_group // e.topk_group))
            experts = _check_target("experts", experts, e.num_experts, e.n_group, minimum=minimum,
                                    why=f"the same number of experts in each of the moe.n_group={e.n_group} routing "
                                        f"groups, and room for top_k={e.top_k}")
            moe_changes["num_experts"] = experts
        if expert_ffn is not None:
            expert_ffn = _check_target("expert_ffn", expert_ffn, e.intermediate_size)
            moe_changes["intermediate_size"] = expert_ffn
        changes["moe"] = moe_changes
    if shared_ffn is not None:
        needs("shared_ffn", "E", "MoE")
        e = cfg.moe
        if e.n_shared_experts != 1:
            raise ValueError(f"shared_ffn={shared_ffn!r} is invalid: shared-expert pruning needs "
                             f"moe.n_shared_experts=1 (found {e.n_shared_experts})")
        shared_ffn = _check_target("shared_ffn", shared_ffn, e.shared_intermediate_size)
        changes.setdefault("moe", {})["shared_intermediate_size"] = shared_ffn
    if layers is not None and drop_layers is not None:
        raise ValueError("layers and drop_layers are exclusive: pass the number of layers to keep, or the layers "
                         "to drop")
    if layers is not None:
        layers = _check_target("layers", layers, cfg.num_layers)
        kept_layers = np.arange(cfg.num_layers) if layers == cfg.num_layers else keep_top(
            read("layer/block", (cfg.num_layers,)), layers)
    elif drop_layers is not None:
        drop = sorted({int(i) for i in drop_layers})
        bad = [i for i in drop if not 0 <= i < cfg.num_layers]
        if bad or len(drop) >= cfg.num_layers:
            raise ValueError(f"drop_layers={list(drop_layers)!r} is invalid: must be distinct indices in "
                             f"[0, {cfg.num_layers - 1}] leaving at least one layer")
        kept_layers = np.array([i for i in range(cfg.num_layers) if i not in drop])
    else:
        kept_layers = np.arange(cfg.num_layers)
    changes["pattern"] = "".join(cfg.pattern[i] for i in kept_layers)
    new_config = cfg.replace(**changes)  # validates the new sizes as a whole

    # --- slicing
    params = _copy_tree(model.params)
    blocks: list[tuple[str, str, dict]] = [(f"layers_{i}", kind, params[f"layers_{i}"])
                                           for i, kind in enumerate(cfg.pattern)]
    if cfg.mtp is not None:
        per = len(cfg.mtp.pattern)
        blocks += [(f"mtp/layers_{k}", cfg.mtp.pattern[k % per], params["mtp"][f"layers_{k}"])
                   for k in range(cfg.mtp.num_layers * per)]

    if hidden is not None and hidden < cfg.hidden_size:
        k_H = keep_top(read("hidden", (cfg.hidden_size,)), hidden)
        _take(params, "embeddings/embedding", k_H, 1)
        _take(params, "norm_f/scale", k_H, 0)
        _take(params, "lm_head/kernel", k_H, 0)
        for _, kind, layer in blocks:
            _slice_hidden(layer, kind, k_H, cfg, cfg.hidden_size)

    for name, kind, layer in blocks:
        if kind == "-" and ffn is not None and ffn < cfg.intermediate_size:
            _slice_mlp(layer, keep_top(read(f"{name}/mlp", (cfg.intermediate_size,)), ffn))
        elif kind == "*" and heads is not None and heads < cfg.attention.num_heads:
            a = cfg.attention
            k_heads = keep_top_grouped(read(f"{name}/heads", (a.num_heads,)), a.num_kv_heads, heads)
            _slice_attention(layer, k_heads, a.head_dim)
        elif kind == "M" and "mamba" in changes:
            m = cfg.mamba
            if mamba_heads == m.num_heads and mamba_head_dim == m.head_dim:
                continue
            k_P = np.arange(m.head_dim) if mamba_head_dim == m.head_dim else keep_top(
                read(f"{name}/mamba_channels", (m.head_dim,)), mamba_head_dim)
            if mamba_heads == m.num_heads:
                k_heads = np.arange(m.num_heads)
            else:
                # Minitron-SSM: with the per-channel map S_x [H, P] at hand, heads are scored on the kept channels only
                s_x = read.optional(f"{name}/mamba_x", (m.num_heads, m.head_dim))
                head_score = (np.sqrt(np.sum(np.square(s_x[:, k_P]), axis=1)) if s_x is not None
                              and mamba_head_dim < m.head_dim else read(f"{name}/mamba_heads", (m.num_heads,)))
                k_heads = (keep_top_grouped(head_score, m.n_groups, mamba_heads) if group_aware
                           else keep_top(head_score, mamba_heads))
            _slice_mamba(layer, k_heads, k_P, cfg)
        elif kind == "E" and "moe" in changes:
            e = cfg.moe
            k_E = None
            if experts is not None and experts < e.num_experts:
                k_E = keep_top_grouped(read(f"{name}/experts", (e.num_experts,)), e.n_group, experts)
            k_F = None
            if expert_ffn is not None and expert_ffn < e.intermediate_size:
                ffn_scores = read(f"{name}/expert_ffn", (e.num_experts, e.intermediate_size))
                if k_E is not None:
                    ffn_scores = ffn_scores[k_E]
                k_F = np.stack([keep_top(row, expert_ffn) for row in ffn_scores])
            _slice_moe(layer, k_E, k_F)
            if shared_ffn is not None and shared_ffn < e.shared_intermediate_size:
                _slice_mlp(layer, keep_top(read(f"{name}/shared_mlp", (e.shared_intermediate_size,)), shared_ffn),
                           prefix="mixer/shared_experts")

    # --- depth: keep the surviving blocks, renumbered
    if len(kept_layers) < cfg.num_layers:
        old = {f"layers_{i}": params.pop(f"layers_{i}") for i in range(cfg.num_layers)}
        for j, i in enumerate(kept_layers):
            params[f"layers_{j}"] = old[f"layers_{i}"]

    return Model(new_config, _to_jax(params))


def _to_jax(tree: dict) -> dict:
    return {k: _to_jax(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
