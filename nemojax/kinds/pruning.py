"""Array slicing shared by every kind's pruning rules: keep vectors, target checks, in-place takes.

Params here are nested dicts of numpy arrays (the pruner's private copy), edited in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


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


def expand(keep: np.ndarray, width: int) -> np.ndarray:
    """(keep[:, None] * width + arange(width)).ravel(): the channels of the kept heads."""
    return (keep[:, None] * width + np.arange(width)[None, :]).ravel()


def _allowed(values: Sequence[int], limit: int = 16) -> str:
    values = list(values)
    if len(values) <= limit:
        return str(values)
    head = ", ".join(str(v) for v in values[:limit // 2])
    tail = ", ".join(str(v) for v in values[-limit // 2:])
    return f"[{head}, ..., {tail}]"


def check_target(name: str, value: Any, full: int, multiple_of: int = 1, minimum: int = 1, why: str = "") -> int:
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
