"""Validation loss: the token-weighted mean next-token NLL (nats/token, no z-loss) of a model over batches.

The jobs report it for every model they produce on the batches their config names
(`nemojax.jobs.common.validation_loss`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from nemojax.config import ModelConfig
from nemojax.model import Model
from nemojax.train.step import eval_step, lm_loss


def mean_nll(model: Model, batches: Iterable[dict[str, Any]]) -> float:
    """Token-weighted mean NLL of `model` over `batches` (the pipeline's dicts: tokens, targets, loss_mask, ...
    each [b, L]). Raises ValueError when the batches hold no scored token."""
    run = _eval_step(model.config)
    nll_sum, tokens = 0.0, 0.0
    for batch in batches:
        metrics = jax.device_get(run(model.params, {k: np.asarray(v) for k, v in batch.items()}))
        nll_sum += float(metrics["nll"]) * float(metrics["tokens"])
        tokens += float(metrics["tokens"])
    if tokens == 0:
        raise ValueError("batches is empty or fully masked: no token to score")
    return nll_sum / tokens



@functools.lru_cache(maxsize=16)
def _eval_step(config: ModelConfig):
    """The jitted eval step of a config, built once: a job scores the same models several times (a teacher before
    and after, a student before and after)."""
    return jax.jit(eval_step(lm_loss(config)))
