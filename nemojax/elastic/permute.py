"""Importance-ordered permutation of every elastic width axis (Nemotron Elastic, arXiv 2511.16664; Star Elastic,
arXiv 2605.07182).

Nested submodels share the parent's weights: a submodel keeps the first k of each width axis (per group where
groups exist). `permute` makes that prefix the top k by importance, by reordering every axis in descending score:

    scores = compress.importance(model, calib_batches)
    parent = permute(model, scores)                     # same config, same logits, prefixes = top k

It is `compress.prune` with every width target at its full size in importance order (`order="importance"`), so
pruning and permutation share one set of slicing rules (each layer kind's `WidthRule`):

  * hidden channels: every tensor with a hidden axis (embeddings, lm_head, the final norm, every block's norm and
    residual-side linears, the MTP head's norms and fusion projection);
  * attention query heads, within their KV group; Mamba heads within their SSM group and Mamba head channels
    (the same channel order in every head); '-' FFN neurons;
  * MoE experts (router columns, correction bias and expert tensors together; within their routing group when
    moe.n_group > 1), each expert's FFN neurons, the shared expert's neurons.

Score keys are those of `compress.importance` (see `compress.prune`). Experts are ranked by "layers_{i}/experts"
(ModelOpt's mean routed-output norm) by default; `expert_score="reap"` ranks them by "layers_{i}/experts_reap"
(REAP, arXiv 2510.13999: mean over routed tokens of routing weight x output norm), as Star Elastic does. The MTP
head is not scored by `importance`: its layers' own axes keep their order unless `scores` holds their "mtp/..."
keys (their hidden channels follow the model's).

Every reordering moves whole units together with everything that reads them (a head with its K/V group, B/C group,
norm group and per-head params), so the permuted model computes the parent's function: its logits equal the
parent's up to float summation order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from nemojax.compress.prune import prune, width_targets
from nemojax.model import Model

__all__ = ["EXPERT_SCORES", "full_widths", "permute", "permute_with_orders"]

# expert_score -> the suffix of the per-layer score key experts are ranked by
EXPERT_SCORES = {"experts": "experts", "reap": "experts_reap"}
_EXPERTS_KEY = re.compile(r"^layers_\d+/experts$")


def full_widths(config: Any) -> dict[str, int]:
    """{width target: its full size} for every width target the model's layer kinds offer (prune's keywords)."""
    rules = {id(rule): rule for rule in width_targets(config).values()}.values()
    return {target: axis.full for rule in rules for target, axis in rule.axes(config).items()}


class _PermutationScores(Mapping[str, Any]):
    """The caller's scores as prune reads them for a permutation: "layers_{i}/experts" answered from the chosen
    expert score, and a constant stand-in (ties keep the current order) for the unscored MTP layers' axes."""

    def __init__(self, scores: Any, expert_key: str):
        self._scores = scores
        self._expert_key = expert_key

    def _source(self, key: str) -> str:
        if _EXPERTS_KEY.match(key):
            return f"{key.rpartition('/')[0]}/{self._expert_key}"
        return key

    def __getitem__(self, key: str) -> Any:
        source = self._source(key)
        try:
            return self._scores[source]
        except (KeyError, IndexError, TypeError):
            getter = getattr(self._scores, "get", None)
            value = getter(source) if callable(getter) else None
        if value is None and source != key:  # name the key that is really missing
            raise ValueError(f"scores[{source!r}] is missing: experts are ranked by it (expert_score); "
                             "compress.importance gives experts_reap when the MoE routing weights are at hand")
        if value is None:
            raise KeyError(key)
        return value

    def default(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Zeros for an MTP layer's missing score (equal scores keep the current order: ties go to the lower
        index); None (missing) for every other key."""
        return np.zeros(shape) if key.startswith("mtp/") else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)


def permute_with_orders(model: Model, scores: Any, *,
                        expert_score: str = "experts") -> tuple[Model, dict[str, np.ndarray]]:
    """`permute`, plus the orders it applied: {score key: int indices into the parent's axis, new order}, e.g.
    orders["hidden"] [hidden] (new channel c is parent channel orders["hidden"][c]), "layers_{i}/heads" [heads],
    ".../mlp", ".../mamba_heads", ".../mamba_channels", ".../experts", ".../expert_ffn" [E, F] (row r for new
    expert r), "<layer>/shared_mlp", and the MTP layers' under "mtp/"."""
    if expert_score not in EXPERT_SCORES:
        raise ValueError(f"expert_score={expert_score!r} is invalid: must be one of "
                         f"{', '.join(map(repr, EXPERT_SCORES))}")
    cfg = model.config
    if cfg.layer_configs:
        raise ValueError("model.config.layer_configs is set: an elastic parent is one full-width model (its nested "
                         "submodels may be heterogeneous, the parent is not)")
    orders: dict[str, np.ndarray] = {}
    permuted = prune(model, _PermutationScores(scores, EXPERT_SCORES[expert_score]), hidden=cfg.hidden_size,
                     order="importance", kept=orders, **full_widths(cfg))
    return permuted, orders


def permute(model: Model, scores: Any, *, expert_score: str = "experts") -> Model:
    """The parent with every elastic width axis reordered by descending importance (see the module docstring).

    model: the parent; scores: `compress.importance(model, ...)` (or any str -> array map with its keys; higher =
    more important). expert_score: "experts" (default) or "reap". Returns a Model with the same config whose
    logits equal the parent's (to float summation order) and whose first k entries of every axis (per KV / SSM /
    routing group where groups exist) are the top k by score. Raises ValueError for a missing score key.
    """
    return permute_with_orders(model, scores, expert_score=expert_score)[0]
