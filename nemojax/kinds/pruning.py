"""Array slicing shared by every kind's pruning rules: keep vectors, in-place takes; the default grid's widths.

Params here are nested dicts of numpy arrays (the pruner's private copy), edited in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ORDERS = ("ascending", "importance")


def keep_top(score: np.ndarray, k: int, ordered: bool = False) -> np.ndarray:
    """Indices of the k highest scores (ties go to the lower index). score: [n] -> [k] int.

    ordered=False: the kept indices ascending (their original order, as pruning keeps them); ordered=True: in
    descending score (ties: lower index first), so that the first j of them are the top j for every j."""
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")[:k]
    return order if ordered else np.sort(order)


def keep_top_grouped(score: np.ndarray, groups: int, k: int, ordered: bool = False) -> np.ndarray:
    """Group-aware keep: score [n] is `groups` contiguous groups of n/groups; the top k/groups of every group are
    kept (ranked within the group). Returns [k] global indices, group after group in their original order, each
    group's k/groups contiguous: ascending inside the group (ordered=False) or in descending score (ordered=True,
    ties to the lower index), so that every group's first j are its top j."""
    score = np.asarray(score, np.float64)
    size = score.shape[0] // groups
    per = k // groups
    kept = [g * size + keep_top(score[g * size:(g + 1) * size], per, ordered) for g in range(groups)]
    return np.concatenate(kept).astype(np.int64)


def importance_order(options: dict) -> bool:
    """Whether a width rule keeps its indices in importance order: prune's `order` option (see `ORDERS`) is
    "importance" (descending score, per group where groups exist) rather than "ascending" (the default). A rule
    must then slice its axes even when they keep their full size (that is a permutation)."""
    order = options.get("order", "ascending")
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is invalid: must be one of {', '.join(map(repr, ORDERS))}")
    return order == "importance"


def record(options: dict, key: str, keep: np.ndarray) -> None:
    """Notes the indices an axis kept (into the input model's axis, in their new order) under `key` (its score
    key, e.g. "layers_3/heads") when the caller of prune asked for them (options["kept"] is a dict)."""
    kept = options.get("kept")
    if kept is not None:
        kept[key] = np.asarray(keep, np.int64)


def expand(keep: np.ndarray, width: int) -> np.ndarray:
    """(keep[:, None] * width + arange(width)).ravel(): the channels of the kept heads."""
    return (keep[:, None] * width + np.arange(width)[None, :]).ravel()


# The default search grid's fractions of a width (ModelOpt's Minitron search keeps >= ~60% of a width).
WIDTH_FRACTIONS = (1.0, 0.875, 0.75, 0.625)


def hardware_multiple(full: int) -> int:
    """What the default search grid rounds a width to: 256 / 64 / 8 for sizes >= 2048 / >= 512 / smaller."""
    return 256 if full >= 2048 else 64 if full >= 512 else 8


def take(tree: dict, path: str, keep: np.ndarray, axis: int) -> None:
    """tree[path] = take(tree[path], keep, axis), if that leaf exists (biases are optional)."""
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
        if key not in node:
            return
        node = node[key]
    if leaf in node:
        node[leaf] = np.take(node[leaf], keep, axis=axis)


def slice_linear_hidden(layer: dict, k_hidden: np.ndarray, residual_in: Sequence[str],
                        residual_out: Sequence[str]) -> None:
    """Hidden-size pruning of a mixer's linears: the input axis of `residual_in` kernels, the output axis (and
    bias) of `residual_out` kernels, all under `mixer/`."""
    for name in residual_in:
        take(layer, f"mixer/{name}/kernel", k_hidden, 0)
    for name in residual_out:
        take(layer, f"mixer/{name}/kernel", k_hidden, 1)
        take(layer, f"mixer/{name}/bias", k_hidden, 0)


def slice_mlp(layer: dict, k_ffn: np.ndarray, prefix: str = "mixer") -> None:
    """The hidden units `k_ffn` of an up_proj / down_proj pair under `prefix`."""
    take(layer, f"{prefix}/up_proj/kernel", k_ffn, 1)
    take(layer, f"{prefix}/up_proj/bias", k_ffn, 0)
    take(layer, f"{prefix}/down_proj/kernel", k_ffn, 0)
