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

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.nn.live import COLLECTION
from nemojax.nn.state import Extend

Params = dict[str, Any]
# Variable collections a forward can return (`collect`): MoE router statistics ("intermediates"), each block's
# input and output ("blocks"), the activations importance scoring reads ("taps") and the amaxes quantization
# calibration records ("quant_stats").
COLLECTIONS = ("intermediates", "blocks", "taps", "quant_stats")


@functools.lru_cache(maxsize=64)
def module(config: Any, inference: bool = False) -> nn.Module:
    """The linen module of a config's family (a pure definition; params live outside it). inference: without
    activation checkpointing (nothing to save for a backward pass; the same param tree)."""
    if inference and config.runtime.remat != "none":
        config = config.replace(runtime={"remat": "none"})
    return families.family_of(config).module(config)


def _init_tokens(config: ModelConfig) -> jax.Array:
    length = 1 + (config.mtp.num_layers if config.mtp else 0)
    return jnp.zeros((1, length), jnp.int32)


def _init_run(net: nn.Module, tokens: jax.Array):
    hidden = net.hidden(tokens)
    logits = net.logits(hidden)
    if net.config.mtp is not None:
        return logits, net.mtp_logits(hidden[:, :1], tokens)
    return logits


@functools.partial(jax.jit, static_argnums=0)
def _init_boxed(config: ModelConfig, rng: jax.Array) -> Params:
    return module(config).init(rng, _init_tokens(config), method=_init_run)["params"]


def logical_axes(config: ModelConfig) -> Params:
    """A tree like `params` whose leaves are `PartitionSpec`s of logical axis names (for the sharding rules)."""
    boxed = jax.eval_shape(_init_boxed, config, jax.random.key(0))
    return nn.get_partition_spec(boxed)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """What one forward returns.

    logits: [b, L, vocab] float32 (None with logits=False); hidden: [b, L, hidden] the final normed hidden states;
    mtp_logits: one [b, L - D, vocab] per MTP depth (with mtp=True); states: the layers' new cache entries (a
    cached extend); collected: {collection: tree} for each requested collection, leaves as flax sows them
    (tuples).
    """

    logits: jax.Array | None
    hidden: jax.Array
    mtp_logits: tuple[jax.Array, ...] | None = None
    states: tuple | None = None
    collected: dict = dataclasses.field(default_factory=dict)


def apply(config: ModelConfig, params: Params, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
          states: tuple | None = None, step: Extend | None = None, mtp: bool = False,
          collect: tuple[str, ...] = (), rngs: dict | None = None, skip_layer: jax.Array | None = None,
          logits: bool = True, elastic: Mapping | None = None) -> Output:
    """The one forward pass every part of the library runs (train, infer, compress, quant).

    tokens: [b, L] int. segment_ids: [b, L] packed documents (each computed as if alone in its row).
    states, step: continue every layer from its cache entry (`nemojax.infer.cache`; one per pattern character)
    over tokens at positions step.start[i] + t (see `nemojax.nn.state.Extend`); the new entries come back in
    `Output.states`. mtp: also the MTP head's logits: depth d at position t < L - D reads token t + d + 1 and
    predicts token t + d + 2 (logits and hidden still cover all L positions).
    collect: collection names among COLLECTIONS to return. rngs: e.g. {"quant": key} for stochastic rounding.
    skip_layer: an int32 scalar (traced is fine): that block passes its input through (layer ablation); or a
    [num_layers] bool mask of the blocks that do.
    logits: False skips the lm_head (decoding takes the logits of chosen positions itself, `lm_logits`).
    elastic: the live sizes of a masked forward (`nemojax.nn.live`; `nemojax.elastic` builds them with the masked
    params), a tree shaped like the module tree. Unrolled layout only.
    """
    unknown = [c for c in collect if c not in COLLECTIONS]
    if unknown:
        raise ValueError(f"collect={tuple(collect)!r} is invalid: collections must be among {COLLECTIONS}")
    if mtp and config.mtp is None:
        raise ValueError("mtp=True is invalid: config.mtp is None (this model has no MTP head)")
    if (states is None) != (step is None):
        raise ValueError("states and step go together: pass both (a cached extend) or neither")
    if elastic is not None and config.runtime.scan_layers:
        raise ValueError("elastic is given with runtime.scan_layers=True: a masked forward runs the unrolled layout "
                         "(config.replace(runtime={'scan_layers': False}))")

    def run(net: nn.Module):
        new_states = mtp_out = None
        if states is not None:
            hidden, new_states = net.extend(tokens, states, step)
        else:
            hidden = net.hidden(tokens, segment_ids, skip_layer)
        if mtp:
            L = tokens.shape[1] - config.mtp.num_layers
            mtp_out = tuple(net.mtp_logits(hidden[:, :L], tokens,
                                           None if segment_ids is None else segment_ids[:, :L]))
        return Output(net.logits(hidden) if logits else None, hidden, mtp_out, new_states)

    net = module(config, inference=states is not None)
    variables = {"params": params} if elastic is None else {"params": params, COLLECTION: elastic}
    if not collect:
        return net.apply(variables, method=run, rngs=rngs)
    out, variables = net.apply(variables, method=run, mutable=list(collect), rngs=rngs)
    return dataclasses.replace(out, collected={c: variables.get(c, {}) for c in collect})


def lm_logits(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """hidden: [..., hidden] -> [..., vocab] float32 through the lm_head."""
    return module(config, inference=True).apply({"params": params}, hidden, method="logits")


def embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """tokens: [b, T] -> embeddings [b, T, hidden] (compute dtype)."""
    return module(config, inference=True).apply({"params": params}, tokens, method="embed")


def mtp_extend(config: ModelConfig, params: Params, depth: int, hidden: jax.Array, embedded: jax.Array,
               states: tuple, step: Extend) -> tuple[jax.Array, tuple]:
    """One MTP depth over T new positions from its caches: hidden, embedded: [b, T, hidden] -> ([b, T, hidden],
    new states); see the family module's `mtp.extend_depth`."""
    run = lambda net: net.mtp.extend_depth(depth, hidden, embedded, states, step)  # noqa: E731
    return module(config, inference=True).apply({"params": params}, method=run)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params: Params, tokens: jax.Array,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens: [b, L] int -> logits [b, L, vocab] float32 (jitted `apply`)."""
    return apply(config, params, tokens, segment_ids=segment_ids).logits


@functools.partial(jax.jit, static_argnums=0)
def forward_with_mtp(config: ModelConfig, params: Params, tokens: jax.Array,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """tokens: [b, L] -> (logits [b, L, vocab], per MTP depth d logits [b, L - depths, vocab]) (jitted `apply`)."""
    out = apply(config, params, tokens, segment_ids=segment_ids, mtp=True)
    return out.logits, list(out.mtp_logits)


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
        """tokens: [b, L] int -> logits [b, L, vocab] float32 (jitted). segment_ids: [b, L] int, the packed
        documents of each row, which then do not see each other."""
        return forward(self.config, self.params, jnp.asarray(tokens), _optional(segment_ids))

    def apply(self, tokens: jax.Array, **options: Any) -> Output:
        """The full forward with its options (segment_ids, states/step, mtp, collect, rngs, skip_layer,
        logits, elastic): see `nemojax.model.apply`. Not jitted: call it inside your own `jax.jit`."""
        return apply(self.config, self.params, tokens, **options)

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


def abstract_params(config: ModelConfig) -> Params:
    """The params tree as `jax.ShapeDtypeStruct`s; nothing is allocated."""
    return jax.eval_shape(lambda: nn.meta.unbox(_init_boxed(config, jax.random.key(0))))


def param_count(config: ModelConfig) -> int:
    """Number of parameters of a config, from shapes alone (jax.eval_shape; nothing allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
