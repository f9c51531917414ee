"""AdamW with the Nemotron recipe's pieces: a weight-decay mask, global-norm clipping, and warmup-stable-decay
(WSD) or cosine learning-rate schedules."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nemojax.lowp.recipe import is_state

# Params that are not decayed: norm scales, biases, and the SSM's per-head A_log, D and dt_bias (and the router's
# correction bias, which is never trained by gradients at all).
NO_DECAY = frozenset({"scale", "bias", "A_log", "D", "dt_bias", "e_score_correction_bias"})
SCHEDULES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule over `total_steps`."""

    lr: float = 3e-4
    total_steps: int = 1000
    warmup_steps: int = 100
    schedule: str = "wsd"
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays to min_lr_ratio * lr
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule={self.schedule!r} is invalid: must be one of {SCHEDULES}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"optimizer.decay_shape={self.decay_shape!r} is invalid: must be one of {DECAY_SHAPES}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} is invalid: must be in "
                             f"[0, total_steps={self.total_steps}]")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"optimizer.decay_fraction={self.decay_fraction} is invalid: must be in [0, 1]")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr={self.lr} is invalid: must be positive")
        if self.total_steps <= 0:
            raise ValueError(f"optimizer.total_steps={self.total_steps} is invalid: must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio} is invalid: must be in [0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay} is invalid: must be >= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optimizer.{name}={getattr(self, name)} is invalid: must be in [0, 1)")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optimizer.clip_norm={self.clip_norm} is invalid: must be positive or None")


def wsd_schedule(lr: float, total_steps: int, warmup_steps: int, decay_fraction: float, min_lr_ratio: float = 0.0,
                 decay_shape: str = "linear") -> optax.Schedule:
    """Linear warmup to `lr`, constant, then a decay over the last `decay_fraction` of the steps to
    `min_lr_ratio * lr` (linear, cosine or 1-sqrt)."""
    decay_steps = int(round(total_steps * decay_fraction))
    decay_start = max(total_steps - decay_steps, warmup_steps)
    floor = lr * min_lr_ratio

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1) / max(warmup_steps, 1))
        progress = jnp.clip((step - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
        if decay_shape == "linear":
            frac = 1.0 - progress
        elif decay_shape == "cosine":
            frac = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            frac = 1.0 - jnp.sqrt(progress)
        decayed = floor + (lr - floor) * frac
        return jnp.where(step < warmup_steps, warm, jnp.where(step < decay_start, lr, decayed))

    return schedule


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    if cfg.schedule == "wsd":
        return wsd_schedule(cfg.lr, cfg.total_steps, cfg.warmup_steps, cfg.decay_fraction, cfg.min_lr_ratio,
                            cfg.decay_shape)
    if cfg.schedule == "cosine":
        if cfg.warmup_steps == 0:
            return optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps, 1), alpha=cfg.min_lr_ratio)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps,
                                                  end_value=cfg.lr * cfg.min_lr_ratio)
    return optax.constant_schedule(cfg.lr)


def _leaf_name(path: tuple) -> str | None:
    return getattr(path[-1], "key", None)


def weight_decay_mask(params: Any) -> Any:
    """True for every param that is decayed: all but norm scales, biases, A_log, D, dt_bias, router bias and
    frozen quantization state."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY and not is_state(_leaf_name(path) or ""), params)


def frozen_mask(params: Any) -> Any:
    """True for the params no optimizer may change: quantization state (calibrated amaxes, static block scales)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_state(_leaf_name(path) or ""), params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the decay mask; frozen params get no update."""
    adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=weight_decay_mask)
    chain = [adamw, optax.masked(optax.set_to_zero(), frozen_mask)]
    if cfg.clip_norm is not None:
        chain.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
    return optax.chain(*chain)
