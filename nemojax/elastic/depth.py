"""Layer ranking for elastic depth by normalised logit MSE with iterative removal (Nemotron Elastic,
arXiv 2511.16664, depth importance).

The score of layer j, given the set R of layers already removed, is the normalised MSE of the logits against the
FULL model's:

    s_j = sum_{B,L} (M_full - M_{-(R + j)})^2 / sum_{B,L} M_full^2

where M_{-S} are the logits with every layer of S skipped through its residual (its block returns its input). Each
round scores the remaining layers, removes the lowest-scoring one (ties: the lower index) and repeats; the paper
reports this iterative ranking as more reliable than a single-shot one. Round 0 is the single-shot score
(`compress.importance`'s "layer/logits_mse").

One compiled forward serves every candidate of every round: the skipped layers are a traced [num_layers] bool
mask (`skip_layer` of `Model.apply`).

    ranking = layer_ranking(model, calib_batches)
    ranking.removal_order          # (j0, j1, ...): the layer removed first comes first
    ranking.kept(6)                # the 6 layers a depth-6 submodel keeps, ascending
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.data.batch_tokens import batch_tokens
from nemojax.model import Model, apply

__all__ = ["LayerRanking", "layer_ranking"]

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LayerRanking:
    """removal_order: every layer index once, the least important (removed first) first. round_scores: [rounds,
    num_layers] float64, the scores s_j of round r (NaN for the layers removed before it); rounds = num_layers - 1
    when iterative (the last layer is never scored alone), 1 for single shot (then the order is by that round's
    score, ascending)."""

    removal_order: tuple[int, ...]
    round_scores: np.ndarray

    def kept(self, num_layers: int) -> tuple[int, ...]:
        """The `num_layers` most important layers (the last ones to be removed), ascending."""
        n = len(self.removal_order)
        if not 1 <= num_layers <= n:
            raise ValueError(f"num_layers={num_layers!r} is invalid: must be in [1, {n}]")
        return tuple(sorted(self.removal_order[n - num_layers:]))


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: ModelConfig, params: dict, tokens: jax.Array, skip: jax.Array) -> jax.Array:
    """Logits [b, L, vocab] f32 with the layers where skip ([num_layers] bool, traced) is True passed through."""
    return apply(config, params, tokens, skip_layer=skip).logits


@functools.partial(jax.jit, static_argnums=0)
def _squared_error(config: ModelConfig, params: dict, tokens: jax.Array, skip: jax.Array,
                   ref_logits: jax.Array) -> jax.Array:
    """sum (logits with `skip` - ref_logits)^2, a f32 scalar: the skipped forward's logits never leave the device."""
    return jnp.sum(jnp.square(_logits(config, params, tokens, skip) - ref_logits))


def _round(config: ModelConfig, params: dict, batches: list[jax.Array], removed: np.ndarray) -> np.ndarray:
    """[num_layers] float64 summed squared logit errors of skipping removed + {j} for every j not in `removed`
    (0 for the removed), summed over all batches. removed: [num_layers] bool."""
    n = config.num_layers
    errors = np.zeros(n, np.float64)
    candidates = [j for j in range(n) if not removed[j]]
    for tokens in batches:
        ref = _logits(config, params, tokens, jnp.zeros(n, bool))
        masks = [removed | (np.arange(n) == j) for j in candidates]
        # dispatch every candidate's forward before reading any back: one host sync per batch
        terms = jax.device_get([_squared_error(config, params, tokens, jnp.asarray(m), ref) for m in masks])
        for j, term in zip(candidates, terms, strict=True):
            errors[j] += float(term)
    return errors


def layer_ranking(model: Model, batches: Iterable, *, iterative: bool = True,
                  rounds: int | None = None) -> LayerRanking:
    """Ranks the layers of `model` for depth by normalised logit MSE (see the module docstring).

    batches: calibration batches, each the data pipeline's dict (its "tokens" are read) or [b, L] int tokens; they
    are kept for every round. iterative: remove one layer per round and re-score the rest against the full model
    (True), or rank by the first round's scores alone (False). rounds: stop the iterative removal after this many
    rounds (default num_layers - 1: all); the layers never removed follow in ascending last-round score.
    Returns a `LayerRanking`.
    """
    config = model.config
    if config.runtime.remat != "none":
        config = config.replace(runtime={"remat": "none"})  # forward only
    if config.runtime.scan_layers:
        raise ValueError("layer_ranking runs on the unrolled layout: convert with nemojax.models.scan.to_unrolled "
                         "and config.replace(runtime={'scan_layers': False})")
    n = config.num_layers
    total = n - 1 if iterative else 1
    if rounds is not None:
        if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= max(total, 1):
            raise ValueError(f"rounds={rounds!r} is invalid: must be an integer in [1, {max(total, 1)}]")
        total = rounds
    token_batches = [jnp.asarray(batch_tokens(batch, "layer_ranking")) for batch in batches]
    if not token_batches:
        raise ValueError("batches is empty: layer_ranking needs at least one calibration batch")
    params = model.params
    ref_sq = sum(float(jnp.sum(jnp.square(_logits(config, params, t, jnp.zeros(n, bool))))) for t in token_batches)

    removed = np.zeros(n, bool)
    order: list[int] = []
    history = []
    for _ in range(total if n > 1 else 0):
        scores = np.where(removed, np.nan, _round(config, params, token_batches, removed) / ref_sq)
        history.append(scores)
        if not iterative:
            break
        least = int(np.argmin(np.where(removed, np.inf, scores)))  # ties: the lower index
        removed[least] = True
        order.append(least)
    rest = [j for j in range(n) if not removed[j]]
    last = history[-1] if history else np.zeros(n)
    order += sorted(rest, key=lambda j: (last[j], j))
    return LayerRanking(tuple(order), np.stack(history) if history else np.zeros((0, n)))
