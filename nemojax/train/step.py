"""The train step: one optimizer update from a batch, with the loss function as a parameter.

    state, metrics = train_step(state, batch)

`batch` is a dict of `[B, L]` arrays (`tokens`, `targets`, `loss_mask`, ...). With `grad_accum > 1` the batch is
split into that many micro-batches along B, whose gradients are averaged (in float32) before one update. The loss
function has the signature `loss_fn(params, batch, rng, *frozen) -> (loss, LossAux)`, where `frozen` are inputs
that are not trained (a distillation teacher's params): LM training, distillation and QAD differ only in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nemojax.config import ModelConfig
from nemojax.model import Model, apply
from nemojax.train import moe_balance
from nemojax.train.losses import cross_entropy

Params = dict[str, Any]
Batch = dict[str, jax.Array]


class LossAux(NamedTuple):
    """What a loss function reports besides the loss: scalar metrics, and per-router expert loads (for the
    aux-loss-free bias update; empty without MoE)."""

    metrics: dict[str, jax.Array]
    expert_load: dict[tuple[str, ...], jax.Array]


LossFn = Callable[..., tuple[jax.Array, LossAux]]  # (params, batch, rng, *frozen) -> (loss, aux)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: params (float32 masters), optimizer state, step count and the rng."""

    params: Params
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_state(model: Model, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(model.params, optimizer.init(model.params), jnp.zeros((), jnp.int32), rng)


def lm_loss(config: ModelConfig, *, z_loss: float = 0.0, moe_aux_loss: float = 0.0,
            mtp_weight: float = 0.0, document_mask: bool = False) -> LossFn:
    """Next-token cross entropy (+ z-loss, + MoE load-balancing loss, + MTP loss) of the model `config` describes.

    mtp_weight > 0 (config `train.mtp_loss_weight`; needs `config.mtp`) adds mtp_weight times the mean over MTP
    depths d of the cross entropy of depth d's logits [B, L - D, V], which at position t predict token t + d + 2,
    i.e. targets[:, d + 1 : d + 1 + L - D] under loss_mask[:, d + 1 : d + 1 + L - D] (docs/numerics.md 9). The MTP
    head's MoE routers then also feed the balance loss and the correction-bias update. Metrics add "mtp_nll" (mean
    over depths) and, with several depths, "mtp_nll_{d}".

    document_mask (config `train.document_mask`): the batch's `segment_ids` [B, L] (packed documents) keep Mamba
    state, convolutions and attention within each document, so a packed row trains like its documents run one by
    one; an MTP prediction whose target lies in the next document is left out of the MTP loss. Off, a packed row
    is one long sequence (the usual pretraining choice).
    """
    if mtp_weight < 0:
        raise ValueError(f"train.mtp_loss_weight={mtp_weight!r} is invalid: must be >= 0")
    if mtp_weight > 0 and config.mtp is None:
        raise ValueError(f"train.mtp_loss_weight={mtp_weight!r} needs a model with an MTP head, but config.mtp is "
                         "None; set it to 0 or use a config with mtp")
    with_mtp = mtp_weight > 0

    def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, LossAux]:
        rngs = {"quant": rng}  # stochastic rounding of quantized-training recipes (no dropout in these models)
        tokens = batch["tokens"]
        if document_mask and "segment_ids" not in batch:
            raise ValueError(f"train.document_mask=True needs batches with 'segment_ids' (packed documents); this "
                             f"batch has {sorted(batch)}")
        segments = batch["segment_ids"] if document_mask else None
        if with_mtp:
            depths = config.mtp.num_layers
            if tokens.shape[1] <= depths:
                raise ValueError(f"sequence length {tokens.shape[1]} is too short for train.mtp_loss_weight > 0: "
                                 f"must exceed mtp.num_layers={depths}")
        out = apply(config, params, tokens, segment_ids=segments, mtp=with_mtp, collect=("intermediates",),
                    rngs=rngs)
        logits, mtp_logits = out.logits, out.mtp_logits
        loss, metrics = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        if with_mtp:
            # depth d at position t predicts token t + d + 2 = targets[:, t + d + 1]
            L = tokens.shape[1] - depths

            def mtp_mask(d: int) -> jax.Array:
                mask = batch["loss_mask"][:, d + 1:d + 1 + L]
                if segments is None:
                    return mask
                return mask * (segments[:, d + 1:d + 1 + L] == segments[:, :L]).astype(mask.dtype)

            nlls = [cross_entropy(depth_logits, batch["targets"][:, d + 1:d + 1 + L], mtp_mask(d))[0]
                    for d, depth_logits in enumerate(mtp_logits)]
            mtp_nll = jnp.mean(jnp.stack(nlls))
            loss = loss + mtp_weight * mtp_nll
            metrics = {**metrics, "mtp_nll": mtp_nll}
            if depths > 1:
                metrics.update({f"mtp_nll_{d}": nll for d, nll in enumerate(nlls)})
        inter = out.collected["intermediates"]
        if moe_aux_loss:
            balance = moe_balance.load_balancing_loss(inter)
            loss = loss + moe_aux_loss * balance
            metrics = {**metrics, "moe_balance": balance}
        return loss, LossAux(metrics, moe_balance.expert_loads(inter))

    return loss_fn


def make_train_step(optimizer: optax.GradientTransformation, loss_fn: LossFn, *, grad_accum: int = 1,
                    moe_bias_rate: float = 0.0) -> Callable[..., tuple[TrainState, dict]]:
    """A pure step function `step(state, batch, *frozen) -> (state, metrics)`; `frozen` goes to the loss function
    after the rng. Jit it with the shardings of your mesh (see nemojax.train.fit and nemojax.train.sharding)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum={grad_accum} is invalid: must be >= 1")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batches(batch: Batch) -> Batch:
        def split(x: jax.Array) -> jax.Array:
            if x.shape[0] % grad_accum:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}")
            return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

        return jax.tree.map(split, batch)

    def step(state: TrainState, batch: Batch, *frozen: Any) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, step_rng, *frozen)
        else:
            def accumulate(carry, micro):
                grads_sum, i = carry
                (loss, aux), grads = grad_fn(state.params, micro, jax.random.fold_in(step_rng, i), *frozen)
                grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
                return (grads_sum, i + 1), (loss, aux)

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, _), (losses, auxes) = jax.lax.scan(accumulate, (zeros, 0), micro_batches(batch))
            grads = jax.tree.map(lambda g, p: (g / grad_accum).astype(p.dtype), grads, state.params)
            loss = jnp.mean(losses)
            # Micro-batches weigh equally (means of means); token counts and expert loads add up.
            metrics = {k: jnp.sum(v) if k == "tokens" else jnp.mean(v) for k, v in auxes.metrics.items()}
            aux = LossAux(metrics, jax.tree.map(lambda x: x.sum(0), auxes.expert_load))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = moe_balance.update_correction_bias(params, aux.expert_load, moe_bias_rate)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux.metrics}
        return TrainState(params, opt_state, state.step + 1, rng), metrics

    return step


def eval_step(loss_fn: LossFn) -> Callable[[Params, Batch], dict]:
    """Validation: the loss function's metrics without gradients."""

    def run(params: Params, batch: Batch) -> dict:
        loss, aux = loss_fn(params, batch, jax.random.key(0))
        return {"loss": loss, **aux.metrics}

    return run
