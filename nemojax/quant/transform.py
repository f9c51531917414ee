"""Quantization as a transform of `Model` values: `apply(model, recipe) -> Model` and its inverse `strip`.

The returned model has the same weights; its config carries the recipe, so every linear layer the recipe names
fake-quantizes its operands in the forward pass (straight-through gradients), and its params gain the frozen
quantization state the recipe asks for (calibrated amaxes, static block scales; zero = not calibrated yet, see
`nemojax.lowp.recipe`). `calibrate` fills that state in.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from nemojax import families
from nemojax.lowp import named_recipes
from nemojax.lowp.recipe import QuantRecipe, is_state
from nemojax.model import Model, abstract_params


def apply(model: Model, recipe: str | QuantRecipe, **overrides: Any) -> Model:
    """`model` with the low-precision formats of `recipe` (a `QuantRecipe` or a name in `quant.recipes`;
    `overrides` go to a named recipe's factory, e.g. keep_last_fraction=0.2).

    Weights are shared with the input. Quantization state that both the old and the new recipe keep (same
    name and shape) carries over; new state starts uncalibrated (zero).
    """
    recipe = named_recipes.get(recipe, **overrides)
    config = model.config.replace(runtime={"quant": recipe})
    old = flatten_dict(model.params)
    params = {}
    for path, leaf in flatten_dict(abstract_params(config)).items():
        if path in old and tuple(old[path].shape) == tuple(leaf.shape):
            params[path] = old[path]
        elif is_state(path[-1]):
            params[path] = jnp.zeros(leaf.shape, leaf.dtype)
        else:
            raise ValueError(f"param {'/'.join(path)} of the quantized model is missing from model.params")
    return Model(config, unflatten_dict(params))


def strip(model: Model) -> Model:
    """The high-precision model: no recipe, no quantization state (the weights are the same arrays)."""
    params = {path: leaf for path, leaf in flatten_dict(model.params).items() if not is_state(path[-1])}
    return Model(model.config.replace(runtime={"quant": None}), unflatten_dict(params))


def quantized_layers(model: Model) -> dict[str, str]:
    """{weight path: "W nvfp4 / A nvfp4" or "high precision"} for every linear weight of the model."""
    if model.config.runtime.quant is None:
        raise ValueError("model.config.runtime.quant is None: apply a recipe first (nemojax.quant.apply)")
    weights = families.linear_weights(model.config, flatten_dict(model.params))
    paths = ["/".join(path[:-1]) if path[-1] == "kernel" else "/".join(path) for path in weights]
    return model.config.runtime.quant.describe(paths, model.config.pattern)
