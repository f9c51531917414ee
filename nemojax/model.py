"""The Model value: `Model(config, params)`.

`config` is a frozen `ModelConfig`; `params` is a plain nested dict of arrays named like the checkpoint
(`layers_3/mixer/out_proj/kernel` for `backbone.layers.3.mixer.out_proj.weight`). `Model` is a pytree whose only
leaves are the params, so it passes through `jax.jit`, `jax.tree.map`, Orbax and sharding untouched, and every
method of the papers is a function from one `Model` to another.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.models.hybrid import NemotronH

Params = dict[str, Any]


def module(config: ModelConfig) -> NemotronH:
    """The Flax module of a config (a pure definition; params live outside it)."""
    return NemotronH(config)


def _init_tokens(config: ModelConfig) -> jax.Array:
    length = 1 + (config.mtp.num_layers if config.mtp else 0)
    return jnp.zeros((1, length), jnp.int32)


def _init_method(config: ModelConfig):
    return NemotronH.forward_with_mtp if config.mtp else NemotronH.__call__


@functools.partial(jax.jit, static_argnums=0)
def _init_boxed(config: ModelConfig, rng: jax.Array) -> Params:
    return module(config).init(rng, _init_tokens(config), method=_init_method(config))["params"]


def logical_axes(config: ModelConfig) -> Params:
    """A tree like `params` whose leaves are `PartitionSpec`s of logical axis names (for the sharding rules)."""
    boxed = jax.eval_shape(_init_boxed, config, jax.random.key(0))
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params: Params, tokens: jax.Array,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens: [b, L] int -> logits [b, L, vocab] float32. segment_ids: [b, L] packed documents (see
    `NemotronH.hidden`)."""
    return module(config).apply({"params": params}, tokens, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def forward_with_mtp(config: ModelConfig, params: Params, tokens: jax.Array,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """tokens: [b, L] -> (logits [b, L, vocab], per MTP depth d logits [b, L - depths, vocab]); see NemotronH."""
    return module(config).apply({"params": params}, tokens, segment_ids, method=NemotronH.forward_with_mtp)


def _optional(segment_ids: jax.Array | None) -> jax.Array | None:
    return None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
    """A network as a value: a validated config (static) and its params (the pytree's leaves)."""

    config: ModelConfig = dataclasses.field(metadata=dict(static=True))
    params: Params

    @classmethod
    def init(cls, config: ModelConfig, rng: jax.Array | int = 0) -> Model:
        """Random initial weights (the reference initialisation: A_log = log(1..H), D = 1, dt_bias from dt)."""
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        return cls(config, nn.meta.unbox(_init_boxed(config, rng)))

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens: [b, L] int -> logits [b, L, vocab] float32. segment_ids: [b, L] int, the packed documents of
        each row, which then do not see each other (see `NemotronH.hidden`)."""
        return forward(self.config, self.params, jnp.asarray(tokens), _optional(segment_ids))

    def with_mtp(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """tokens: [b, L] -> (logits, MTP logits per depth). Requires a config with `mtp`."""
        if self.config.mtp is None:
            raise ValueError("config.mtp is None: this model has no MTP head")
        return forward_with_mtp(self.config, self.params, jnp.asarray(tokens), _optional(segment_ids))

    def replace(self, **changes: Any) -> Model:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    # Checkpoint interop lives in nemojax.interop.hf; these are the documented entry points.
    @classmethod
    def from_hf_state_dict(cls, config: ModelConfig, state_dict: Mapping[str, Any]) -> Model:
        """Builds a Model from torch-layout tensors (str -> array); see `nemojax.interop.hf`."""
        from nemojax.interop import hf

        return hf.model_from_state_dict(config, state_dict)

    def to_hf_state_dict(self) -> dict[str, np.ndarray]:
        """Hub-named torch-layout numpy tensors, one per expert, each in its param's dtype."""
        from nemojax.interop import hf

        return hf.state_dict_from_params(self.config, self.params)


def abstract_params(config: ModelConfig) -> Params:
    """The params tree as `jax.ShapeDtypeStruct`s; nothing is allocated."""
    return jax.eval_shape(lambda: nn.meta.unbox(_init_boxed(config, jax.random.key(0))))


def param_count(config: ModelConfig) -> int:
    """Number of parameters of a config, from shapes alone (jax.eval_shape; nothing allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
