"""The masked forward of an elastic model (Nemotron Elastic, arXiv 2511.16664 sec. 3): the full-size params of a
permuted model (`nemojax.elastic.permute`) run with the dead channels of a nested submodel zeroed, so that one
compiled step runs any submodel with static shapes, and the submodel it runs is exactly the one `extract` slices
out.

    logits = forward(config, params, tokens, {"hidden": 48, "ffn": 96, "depth": 1}, removal_order=(5, 3)).logits

Sizes are as `nemojax.elastic.count` takes them (one per axis, or one per layer of the axis's kind), as ints or
traced int arrays; "depth" drops the first sizes["depth"] layers of `removal_order` by a zero gate on their
residual branch. The params are never touched: the masks go on the activations, through the "elastic" collection
the modules read (`nemojax.nn.live`), which costs a multiply over tokens x width instead of one over every param
per call. Each layer kind builds its own entries (`LayerKind.mask`); this module adds the hidden mask (embedding
and every residual branch), the live widths of the block norms and the final norm, and the depth gates.
`out` maps an axis to its router multiplier (value 1, gradient to the router; `nemojax.elastic.router`), which
scales the axis's output side. The MTP head is left as it is and not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nemojax import families
from nemojax.elastic.choices import layer_sizes
from nemojax.elastic.count import check_sizes, keep_weights
from nemojax.kinds.masking import prefix
from nemojax.model import Output, apply

__all__ = ["collection", "forward"]


def collection(config: Any, sizes: Mapping[str, Any], *, removal_order: Sequence[int] = (),
               out: Mapping[str, Any] | None = None) -> dict:
    """The "elastic" collection of the submodel `sizes` for `nemojax.model.apply(..., elastic=)`: run with the
    full-size params of a model whose axes are importance-ordered, it computes that submodel.

    sizes: see the module docstring (a missing axis stays full); out: {axis: router multiplier} (per layer for a
    heterogeneous axis). Raises ValueError naming a bad axis, size or depth."""
    if config.runtime.scan_layers:
        raise ValueError("runtime.scan_layers=True: the masked forward runs the unrolled layout "
                         "(config.replace(runtime={'scan_layers': False}))")
    check_sizes(config, sizes)
    out = dict(out or {})
    D = config.hidden_size
    live_hidden = sizes.get("hidden", D)
    hidden = prefix(D, live_hidden)
    elastic: dict[str, Any] = {"hidden": hidden, "head": hidden * out.get("hidden", 1.0),
                               "norm_f": {"live": live_hidden}}
    gammas = None
    if "depth" in sizes:
        gammas = keep_weights(jnp, config, sizes["depth"], removal_order) * out.get("depth", 1.0)
    per_layer = zip(config.pattern, layer_sizes(config, sizes), layer_sizes(config, out), strict=True)
    for i, (char, live, multipliers) in enumerate(per_layer):
        entry = families.kind(char)
        if entry.mask is None:
            raise ValueError(f"layer kind {char!r} ({entry.name}) has no masked form (LayerKind.mask): it cannot "
                             "be part of an elastic model")
        block = {"hidden": hidden, "norm": {"live": live_hidden}, "mixer": entry.mask(config, live, multipliers)}
        if gammas is not None:
            block["gamma"] = gammas[i]
        elastic[f"layers_{i}"] = block
    return elastic


def forward(config: Any, params: Mapping, tokens: jax.Array, sizes: Mapping[str, Any], *,
            removal_order: Sequence[int] = (), out: Mapping[str, Any] | None = None, **options: Any) -> Output:
    """`nemojax.model.apply` of the submodel `sizes` on the full-size `params` (masked). tokens: [b, L] int ->
    Output (logits [b, L, vocab] float32 ...); options: apply's other keywords (segment_ids, collect, rngs,
    logits)."""
    elastic = collection(config, sizes, removal_order=removal_order, out=out)
    return apply(config, params, tokens, elastic=elastic, **options)
