"""Minitron width and depth pruning of a NemotronH `Model`, with group-aware Mamba-2 slicing (Minitron,
arXiv 2407.14679 and 2408.11796; Minitron-SSM, arXiv 2504.11409). The slicing rules are those of ModelOpt's
Minitron plugin ("ModelOpt" below: NVIDIA/Model-Optimizer@a2fbac7:modelopt/torch/prune/plugins/mcore_minitron.py).

    small = prune(model, scores, hidden=48, ffn=96, heads=2, mamba_heads=4, mamba_head_dim=8, layers=6)

`prune` is a pure transform: it returns a new `Model` (a new, validated config and sliced params) and never
edits its input. Every axis keeps the `target` highest-scoring indices and puts them back in ascending order,
so the kept channels stay in their original order (equal to ModelOpt's importance-ordered slicing
up to a permutation). Ties go to the lower index. With `order="importance"` the kept indices of every axis given
are instead laid out in descending score (per group where groups exist: attention KV groups, SSM groups, routing
groups), and an axis given at its full size is permuted rather than left alone, so that the first k of each axis
(per group) are its top k; the function is unchanged by the reordering (`nemojax.elastic.permute` builds on it).

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
is read only for an axis that actually shrinks (or is given, in importance order); a missing one raises a
ValueError that names it, unless the scores object has a `default(key, shape)` method returning a stand-in.
Layer indices are those of the input model (width pruning happens before the depth renumbering).

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
  * A quantized model (`nemojax.quant.apply`) stays quantized, each surviving linear layer in its own format:
    per-tensor amaxes (weight, input, KV) are kept as they are (a submodel shares its parent's scales, as Star
    Elastic's nested FP8 / NVFP4 checkpoints do, arXiv 2605.07182); per-expert amaxes and static NVFP4 block
    scales are sliced with their weight (a block scale follows its 16-element block, so a slice must keep whole
    blocks: ValueError otherwise). When dropping layers would move a layer across a recipe's positional rules
    (keep_first_layers, keep_last_layers, keep_last_fraction, keep_before_attention), the pruned config's recipe
    names every layer's format explicitly instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nemojax import families
from nemojax.kinds.pruning import ORDERS, keep_top, keep_top_grouped, record, take
from nemojax.lowp.formats import check_format
from nemojax.lowp.recipe import STATE_SUFFIXES, QuantRecipe
from nemojax.model import Model

__all__ = ["prune", "pruned_config", "keep_top", "keep_top_grouped", "width_targets"]


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
            default = getattr(self._scores, "default", None)
            value = default(key, tuple(shape)) if callable(default) else None
        if value is None:
            raise _MissingScore(f"scores[{key!r}] is missing: it is needed to prune this axis "
                                f"(expected an array of shape {list(shape)})")
        array = np.asarray(value, np.float64)
        if array.shape != tuple(shape):
            raise ValueError(f"scores[{key!r}] has shape {list(array.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"scores[{key!r}] has non-finite values")
        return array


def _copy_tree(tree: Mapping) -> dict:
    """A fresh nested dict with numpy leaves (the input's arrays are never written to)."""
    return {k: _copy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def _to_jax(tree: dict) -> dict:
    return {k: _to_jax(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}


# ------------------------------------------------------------------------------------ quantization state

STATIC_BLOCK = check_format("nvfp4").block  # static block scales are NVFP4's (lowp.recipe.BLOCKED_FORMATS): 16


def _track_state(params: dict) -> dict[tuple[str, ...], tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Swaps every weight that has non-scalar quantization state beside it (per-expert amaxes [E], static block
    scales) for the flat index of each of its elements, in place, so that the slicing rules move indices instead
    of values; returns {weight path: (the weight, {state leaf name: state})}. Scalar state needs no slicing."""
    tracked = {}

    def visit(node: dict, path: tuple[str, ...]) -> None:
        for name, leaf in list(node.items()):
            if isinstance(leaf, dict):
                visit(leaf, (*path, name))
                continue
            state = {name + s: node[name + s] for s in STATE_SUFFIXES
                     if name + s in node and np.ndim(node[name + s]) > 0}
            if state and not name.endswith(STATE_SUFFIXES):
                tracked[(*path, name)] = (leaf, state)
                node[name] = np.arange(leaf.size, dtype=np.int64).reshape(leaf.shape)

    visit(params, ())
    return tracked


def _state_axes(path: str, state: np.ndarray, weight_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(weight axis, elements per state entry along it) for each axis of a state leaf: per-expert amaxes cover the
    weight's leading axes one to one; block scales cover every axis, a blocked one (or two, for 16x16 tiles) in
    STATIC_BLOCK blocks, ceil(n / 16) of them (the quantizer zero-pads the last)."""
    if not path.endswith("_block_scale"):
        if state.shape != weight_shape[:state.ndim]:
            raise ValueError(f"quantization state {path} has shape {list(state.shape)}: expected the leading dims "
                             f"of its weight {list(weight_shape)}")
        return [(axis, 1) for axis in range(state.ndim)]
    if state.ndim != len(weight_shape):
        raise ValueError(f"block scales {path} have shape {list(state.shape)}: expected one dim per weight dim "
                         f"{list(weight_shape)}")
    steps = []
    for axis, (s, w) in enumerate(zip(state.shape, weight_shape, strict=True)):
        step = 1 if s == w else STATIC_BLOCK
        if -(-w // step) != s:
            raise ValueError(f"block scales {path} have shape {list(state.shape)}, which does not block its weight "
                             f"{list(weight_shape)}")
        steps.append((axis, step))
    return steps


def _slice_state(path: str, state: np.ndarray, weight_shape: tuple[int, ...], index: np.ndarray) -> np.ndarray:
    """The state of a sliced weight: index [sliced weight shape] holds each element's flat index in the original
    weight [weight_shape]; every entry of the new state must cover elements of a single original entry (one
    expert's, one block's), whose value it takes."""
    axes = _state_axes(path, state, weight_shape)
    old = np.unravel_index(index, weight_shape)
    new = np.indices(index.shape, sparse=True)
    new_shape = tuple(-(-index.shape[axis] // step) for axis, step in axes)
    source = np.ravel_multi_index(tuple(old[axis] // step for axis, step in axes), state.shape).ravel()
    target = np.broadcast_to(np.ravel_multi_index(tuple(new[axis] // step for axis, step in axes), new_shape),
                             index.shape).ravel()
    picked = np.zeros(int(np.prod(new_shape)), np.int64)
    picked[target] = source
    if np.any(picked[target] != source):
        raise ValueError(f"{path} cannot follow this slice of its weight: one entry of the pruned state would cover "
                         "elements of different experts or 16-element blocks (keep whole blocks: sizes and group "
                         "widths that are multiples of the block size)")
    return state.reshape(-1)[picked].reshape(new_shape)


def _untrack_state(params: dict, tracked: dict) -> None:
    """Puts the values back into the weights `_track_state` swapped for indices and slices their state alike."""
    for path, (weight, state) in tracked.items():
        *parents, name = path
        node = params
        for key in parents:
            node = node[key]
        index = node[name]
        node[name] = weight.reshape(-1)[index]
        for leaf, value in state.items():
            node[leaf] = _slice_state("/".join((*parents, leaf)), value, weight.shape, index)


def _pinned_recipe(recipe: QuantRecipe, config: Any, params: Mapping, kept_layers: np.ndarray,
                   pattern: str) -> QuantRecipe:
    """`recipe`, or, when the pruned model's layer numbering (`pattern`, the survivors `kept_layers`) would move a
    layer across its positional rules, a recipe that names the format of every linear of the kept layers
    explicitly (each keeps its format in the parent) and has no positional rules."""
    renumber = {int(i): j for j, i in enumerate(kept_layers)}
    pinned, moved = [], False
    for path in families.linear_weights(config, _leaf_paths(params)):
        if not path[0].startswith("layers_") or int(path[0][len("layers_"):]) not in renumber:
            continue
        module = path[1:-1] if path[-1] == "kernel" else path[1:]
        before = "/".join((path[0], *module))
        after = "/".join((f"layers_{renumber[int(path[0][len('layers_'):])]}", *module))
        spec = recipe.linear(before, config.pattern)
        moved |= spec != recipe.linear(after, pattern)
        pinned.append((after, spec))
    if not moved:
        return recipe
    return dataclasses.replace(recipe, rules=(*pinned, *recipe.rules), keep_first_layers=0, keep_last_layers=0,
                               keep_last_fraction=0.0, keep_before_attention=False)


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The leaf paths of a nested dict."""
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_leaf_paths(value, (*prefix, key)))
        else:
            out.append((*prefix, key))
    return out


# ------------------------------------------------------------------------------------ widths


def width_targets(config: Any) -> dict[str, families.WidthRule]:
    """{prune keyword: its kind's WidthRule} for every kind in the pattern (and the MTP pattern)."""
    kinds = dict.fromkeys(config.pattern + (config.mtp.pattern if config.mtp else ""))
    return {target: rule for char in kinds for rule in families.kind(char).width for target in rule.targets}


def _all_width_targets() -> dict[str, str]:
    """{prune keyword: name of the kind that owns it} over every registered kind."""
    return {target: families.kind(c).label for c in families.known_kinds() for rule in families.kind(c).width
            for target in rule.targets}


def _merge(changes: dict[str, Any], more: dict[str, Any]) -> None:
    """Adds a rule's config changes; dicts of sub-config changes merge (two rules may touch one sub-config)."""
    for field, value in more.items():
        if isinstance(value, dict) and isinstance(changes.get(field), dict):
            changes[field] = {**changes[field], **value}
        else:
            changes[field] = value


def _slice_hidden(layer: dict, char: str, k_hidden: np.ndarray, config: Any, hidden_full: int) -> None:
    """Every tensor of one block (or MTP sub-layer) that touches the residual stream: its norms, the MTP fusion
    projection, and the mixer's (its kind's `slice_hidden`)."""
    for norm in ("norm", "enorm", "hnorm", "final_layernorm"):
        take(layer, f"{norm}/scale", k_hidden, 0)
    if "eh_proj" in layer:  # input is concat[enorm(e), hnorm(h)]: slice both halves
        take(layer, "eh_proj/kernel", np.concatenate([k_hidden, hidden_full + k_hidden]), 0)
        take(layer, "eh_proj/kernel", k_hidden, 1)
        take(layer, "eh_proj/bias", k_hidden, 0)
    entry = families.kind(char)
    if entry.slice_hidden is None:
        raise ValueError(f"hidden pruning is not defined for layer kind {char!r} ({entry.name}): its LayerKind "
                         "has no slice_hidden")
    entry.slice_hidden(layer, k_hidden, config)


def _rules_of(config: Any, given: Mapping[str, int]) -> list[tuple[families.WidthRule, dict[str, int]]]:
    """The width rules the given targets belong to, each with its given targets."""
    owned = width_targets(config)
    rules = {id(owned[target]): owned[target] for target in given}.values()
    return [(rule, {t: given[t] for t in rule.targets if t in given}) for rule in rules]


def _layer_widths(config: Any, per_layer: Sequence[Mapping[str, int]]
                  ) -> list[tuple[Any, list[tuple[families.WidthRule, dict[str, int]]]]]:
    """Per main layer: (its new `layer_configs` entry, [(width rule, that layer's checked targets)]) for prune's
    `per_layer`. Raises ValueError naming the layer and target that is not allowed."""
    if len(per_layer) != config.num_layers:
        raise ValueError(f"per_layer has {len(per_layer)} entries: must have one per layer of pattern "
                         f"({config.num_layers}), each {{width target: size}}")
    out = []
    for i, (char, targets) in enumerate(zip(config.pattern, per_layer, strict=True)):
        entry, layer_config = families.kind(char), config.layer(i)
        mine = {t for rule in entry.width for t in rule.targets}
        foreign = sorted(set(targets) - mine)
        if foreign:
            raise ValueError(f"per_layer[{i}] has {foreign}: layer {i} is a {entry.label} layer, whose width "
                             f"targets are {sorted(mine)}")
        rules, changes = [], {}
        for rule in entry.width:
            values = {t: int(targets[t]) if isinstance(targets[t], np.integer) else targets[t]
                      for t in rule.targets if t in targets}
            if values:
                axes = rule.axes(layer_config)
                values = {t: axes[t].check(f"per_layer[{i}][{t!r}]", v) for t, v in values.items()}
                rules.append((rule, values))
                _merge(changes, rule.changes(layer_config, **values))
        field = entry.config_field
        value = config.layer_configs[i] if config.layer_configs else None
        if changes:
            value = getattr(layer_config.replace(**changes), field)
        out.append((value, rules))
    return out


def pruned_config(config: Any, *, hidden: int | None = None, pattern: str | None = None,
                  **widths: int | None) -> Any:
    """The config `prune` gives for these targets (checked: ValueError naming a bad one); nothing is sliced.
    pattern: the kept layers' pattern (default: all)."""
    given = {target: value for target, value in widths.items() if value is not None}
    owned = width_targets(config)
    for target in given:
        if target not in owned:
            everywhere = _all_width_targets()
            if target in everywhere:
                raise ValueError(f"{target} is invalid: the model has no {everywhere[target]} layers (pattern "
                                 f"{config.pattern!r})")
            raise ValueError(f"prune() got an unknown target {target!r}: the width targets are "
                             f"{', '.join(sorted(everywhere))} (plus hidden, layers, drop_layers)")
    changes: dict[str, Any] = {}
    if hidden is not None:
        changes["hidden_size"] = families.Axis(config.hidden_size).check("hidden", hidden)
    for rule, values in _rules_of(config, given):
        axes = rule.axes(config)
        values = {t: axes[t].check(t, v) if t in axes else v for t, v in values.items()}
        _merge(changes, rule.changes(config, **values))
    if pattern is not None:
        changes["pattern"] = pattern
    return config.replace(**changes)  # validates the new sizes as a whole


def prune(model: Model, scores: Any, *, hidden: int | None = None, layers: int | None = None,
          drop_layers: Sequence[int] | None = None, group_aware: bool = True, order: str = "ascending",
          kept: dict[str, np.ndarray] | None = None, per_layer: Sequence[Mapping[str, int]] | None = None,
          **widths: int | None) -> Model:
    """Width and depth pruning: a new Model with the given sizes (None keeps a size); see the module docstring.

    model: the parent; scores: str -> score array (keys in the module docstring; higher = more important).
    hidden: new hidden_size; layers: number of layers to keep (by "layer/block"); drop_layers: explicit layer
    indices to drop (exclusive with `layers`). widths: the width targets of the model's layer kinds (each kind
    declares its own; for the built-in ones): ffn: new intermediate_size of '-' layers; heads: new attention
    num_heads (a multiple of num_kv_heads); mamba_heads: new mamba.num_heads (a multiple of n_groups);
    mamba_head_dim: new mamba.head_dim; experts: new moe.num_experts; expert_ffn: new moe.intermediate_size;
    shared_ffn: new moe.shared_intermediate_size (one shared expert only; scored by "layers_{i}/shared_mlp").
    group_aware: rank Mamba heads within their SSM group (True) or globally, re-packing the kept heads into the
    groups (False, the ablation baseline; see the module docstring).
    order: "ascending" (kept indices in their original order) or "importance" (in descending score per group,
    every given axis permuted even at full size; needs group_aware=True for Mamba heads). Layers keep their order.
    kept: a dict to fill with what every sliced axis kept, as int indices into the input model's axis in their new
    order, under its score key: "hidden" [hidden], "layers_{i}/heads" [heads] (query heads), ".../mlp",
    ".../mamba_heads", ".../mamba_channels", ".../experts", ".../expert_ffn" [kept experts, expert_ffn] (row r for
    the r-th kept expert), "<layer>/shared_mlp" (MTP layers under "mtp/"), and "layers" [kept layers] after depth
    pruning.
    per_layer: instead of the width keywords, one {width target of its kind: size} per layer of the pattern (a
    missing target keeps that layer's size): a heterogeneous model, each layer's widths in `config.layer_configs`
    (Nemotron Elastic's per-layer submodels). A heterogeneous model's own widths are pruned this way only.
    Raises ValueError for a target that breaks a constraint or that no layer of the model has, naming it and the
    allowed values.
    """
    cfg = model.config
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is invalid: must be one of {', '.join(map(repr, ORDERS))}")
    ordered = order == "importance"
    read = _Scores(scores)
    given = {target: value for target, value in widths.items() if value is not None}
    if per_layer is not None and given:
        raise ValueError(f"per_layer and the width keywords {sorted(given)} are exclusive: give every layer's "
                         "widths in per_layer")
    if cfg.layer_configs and given:
        raise ValueError(f"{sorted(given)}: the model is heterogeneous (config.layer_configs), so one size per "
                         "target does not say which layer's size it is; give per_layer")
    uniform = cfg.replace(layer_configs=())  # the global fields, which the width keywords and hidden change
    pruned_config(uniform, hidden=hidden, **given)  # every target checked before anything else
    per_rule = _rules_of(cfg, given)
    if per_layer is not None:
        layer_widths = _layer_widths(cfg, per_layer)
    else:
        layer_widths = [(value, per_rule) for value in (cfg.layer_configs or (None,) * cfg.num_layers)]

    # --- targets (checked before any slicing, so a bad call fails fast and names the field)
    if layers is not None and drop_layers is not None:
        raise ValueError("layers and drop_layers are exclusive: pass the number of layers to keep, or the layers "
                         "to drop")
    if layers is not None:
        layers = families.Axis(cfg.num_layers).check("layers", layers)
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
    new_config = pruned_config(uniform, hidden=hidden, pattern="".join(cfg.pattern[i] for i in kept_layers),
                               **given)
    new_config = new_config.replace(layer_configs=[layer_widths[i][0] for i in kept_layers])
    if cfg.runtime.quant is not None and len(kept_layers) < cfg.num_layers:
        recipe = _pinned_recipe(cfg.runtime.quant, cfg, model.params, kept_layers, new_config.pattern)
        new_config = new_config.replace(runtime={"quant": recipe})

    # --- slicing
    params = _copy_tree(model.params)
    tracked = _track_state(params)  # weights with per-expert / per-block state move as indices until sliced
    blocks: list[tuple[str, str, dict]] = [(f"layers_{i}", kind, params[f"layers_{i}"])
                                           for i, kind in enumerate(cfg.pattern)]
    if cfg.mtp is not None:
        per = len(cfg.mtp.pattern)
        blocks += [(f"mtp/layers_{k}", cfg.mtp.pattern[k % per], params["mtp"][f"layers_{k}"])
                   for k in range(cfg.mtp.num_layers * per)]

    options = {"group_aware": group_aware, "order": order, "kept": kept}  # what every width rule is told
    if hidden is not None and (hidden < cfg.hidden_size or ordered):
        k_hidden = keep_top(read("hidden", (cfg.hidden_size,)), hidden, ordered)
        record(options, "hidden", k_hidden)
        take(params, "embeddings/embedding", k_hidden, 1)
        take(params, "norm_f/scale", k_hidden, 0)
        take(params, "lm_head/kernel", k_hidden, 0)
        for j, (_, kind, layer) in enumerate(blocks):
            _slice_hidden(layer, kind, k_hidden, cfg.layer(j) if j < cfg.num_layers else cfg, cfg.hidden_size)

    for j, (name, kind, layer) in enumerate(blocks):
        main = j < cfg.num_layers  # MTP layers follow the main ones and take the global widths
        for rule, values in (layer_widths[j][1] if main else per_rule):
            if rule in families.kind(kind).width:
                rule.slice(layer, name, cfg.layer(j) if main else cfg, read, options, **values)
    _untrack_state(params, tracked)

    # --- depth: keep the surviving blocks, renumbered
    if len(kept_layers) < cfg.num_layers:
        record(options, "layers", kept_layers)
        old = {f"layers_{i}": params.pop(f"layers_{i}") for i in range(cfg.num_layers)}
        for j, i in enumerate(kept_layers):
            params[f"layers_{j}"] = old[f"layers_{i}"]

    return Model(new_config, _to_jax(params))
