"""The elastic model value: one permuted full-size Model holding every nested submodel, its budget routers and
the choices they pick from (Nemotron Elastic, arXiv 2511.16664; Star Elastic, arXiv 2605.07182).

    em = elastify(model, scores, budgets=(1.0, 0.75, 0.5), removal_order=ranking.removal_order)
    logits = em(tokens, budget=0.75)          # the masked forward of the router's choice for that budget
    small = em.extract(0.5)                   # a plain Model: save_hf writes it, transformers loads it
    save(em, "runs/elastic/model"); em = load("runs/elastic/model")

A checkpoint is the permuted model's own (config.json + safetensors, so load_hf reads the full model) plus
elastic.json (budgets, choices, removal order, target, mode) and elastic_routers.safetensors; a quantized
elastic model adds its recipe (in elastic.json) and elastic_quant_state.safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from nemojax.elastic.choices import Choices, default_choices, layer_counts, make_choices
from nemojax.elastic.count import KINDS
from nemojax.elastic.extract import slice_sizes
from nemojax.elastic.masked import forward
from nemojax.elastic.permute import permute
from nemojax.elastic.router import (
    Schedule,
    budget_code,
    check_budgets,
    init_routers,
    router_logits,
    sample_all,
)
from nemojax.errors import CheckpointError
from nemojax.interop.hf import load_hf, write_hf
from nemojax.interop.safetensors_file import ELASTIC_NAMES, read_json, save_folder
from nemojax.lowp.recipe import QuantRecipe, is_state
from nemojax.model import Model, abstract_params

__all__ = ["ElasticModel", "elastify", "load", "save"]

ELASTIC_JSON, ROUTERS_FILE, QUANT_STATE_FILE = ELASTIC_NAMES
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ElasticModel:
    """model: the importance-ordered full-size Model (`nemojax.elastic.permute`); routers: {axis: {"W1", "W2"(,
    "b2")}} (`nemojax.elastic.router`); choices: the sizes each axis may take (index 0 = full); budgets: the
    trained budgets, fractions of the full `target` cost ("params" | "active_params" | "memory"), descending;
    removal_order: the layers "depth" drops, first first; heterogeneous: one choice per layer of each width axis's
    kind (else one per axis)."""

    model: Model
    routers: dict
    choices: Choices
    budgets: tuple[float, ...]
    removal_order: tuple[int, ...] = ()
    target: str = "params"
    heterogeneous: bool = False

    @property
    def config(self):
        return self.model.config

    def sizes(self, budget: float) -> dict[str, Any]:
        """The routers' hard choice for `budget` (argmax of their logits on its budget code): {axis: int}, or a
        tuple of ints per layer for a heterogeneous axis."""
        logits = router_logits(self.routers, budget_code(self.budgets, budget), 0, Schedule(1))
        picks = sample_all(logits, None)
        out = {}
        for axis, (index, _, _) in picks.items():
            index = np.asarray(index)
            values = self.choices[axis]
            out[axis] = values[int(index)] if index.ndim == 0 else tuple(values[int(i)] for i in index)
        return out

    def __call__(self, tokens: Any, budget: float = 1.0, *, sizes: Mapping[str, Any] | None = None) -> jax.Array:
        """tokens: [b, L] -> logits [b, L, vocab] float32 of the submodel of `budget` (the routers' choice) or of
        explicit `sizes` ({axis: size or per-layer sizes}, `nemojax.elastic.masked`), under masks."""
        chosen = self.sizes(budget) if sizes is None else sizes
        return forward(self.config, self.model.params, jnp.asarray(tokens), chosen,
                       removal_order=self.removal_order).logits

    def extract(self, budget: float | None = None, *, sizes: Mapping[str, Any] | None = None) -> Model:
        """The submodel of `budget` (or of explicit `sizes`, per-layer ones included) as a plain Model: prefix
        slices of every axis (a heterogeneous choice gives per-layer widths, `config.layer_configs`); its logits
        equal `self(tokens, budget)`."""
        if (budget is None) == (sizes is None):
            raise ValueError("extract takes a budget or sizes (exactly one)")
        chosen = self.sizes(budget) if sizes is None else sizes
        return slice_sizes(self.model, chosen, removal_order=self.removal_order)

    def replace(self, **changes: Any) -> ElasticModel:
        return dataclasses.replace(self, **changes)


def _check_target(target: str) -> str:
    if target not in KINDS:
        raise ValueError(f"target={target!r} is invalid: must be one of {KINDS}")
    return target


def elastify(model: Model, scores: Any, *, budgets: Sequence[float] = (1.0, 0.75, 0.5),
             axes: Sequence[str] | None = None, choices: Mapping[str, Sequence[int]] | None = None,
             removal_order: Sequence[int] = (), target: str = "params", heterogeneous: bool = False,
             key: Any = 0, router_hidden: int = 256, expert_score: str = "experts") -> ElasticModel:
    """An ElasticModel from a trained model: its axes permuted by `scores` (`compress.importance`), routers
    initialised (normal(0.1), the official code's default).

    axes: the elastic axes (default: every width axis of the model, and "depth" when removal_order is given);
    choices: explicit {axis: sizes} instead of the default fractions (1, 7/8, 3/4, 5/8, 1/2; depth: drop 0 ..
    len(removal_order)); removal_order: the layers depth drops, first first (`elastic.layer_ranking`); target:
    what a budget is a fraction of; heterogeneous: per-layer widths. Raises ValueError naming a bad budget, axis,
    choice or target."""
    budgets = check_budgets(budgets)
    _check_target(target)
    config = model.config
    removal_order = tuple(int(i) for i in removal_order)
    if choices is None:
        wanted = list(axes) if axes is not None else None
        if wanted is not None and "depth" in wanted and not removal_order:
            raise ValueError("axes names 'depth' but removal_order is empty: rank the layers first "
                             "(nemojax.elastic.layer_ranking) and pass its removal_order")
        table = default_choices(config, axes=None if wanted is None else [a for a in wanted if a != "depth"])
        if removal_order and (wanted is None or "depth" in wanted):
            table = make_choices(config, {**table, "depth": tuple(range(len(removal_order) + 1))})
    else:
        table = make_choices(config, choices)
        if "depth" in table and max(table["depth"]) > len(removal_order):
            raise ValueError(f"choices['depth'] drops up to {max(table['depth'])} layers but removal_order has "
                             f"{len(removal_order)}")
    if not table:
        raise ValueError("the elastic model has no axes: give axes or choices")
    key = jax.random.key(key) if isinstance(key, int) else key
    routers = init_routers(key, table, budgets, hidden=router_hidden, heterogeneous=heterogeneous,
                           layer_counts=layer_counts(config))
    return ElasticModel(permute(model, scores, expert_score=expert_score), routers, table, budgets, removal_order,
                        target, heterogeneous)


# ---------------------------------------------------------------------------------------------- save / load


def _flat_routers(routers: Mapping) -> dict[str, np.ndarray]:
    return {f"{axis}/{name}": np.asarray(value) for axis, router in routers.items() for name, value in router.items()}


def save(em: ElasticModel, directory: str | os.PathLike) -> Path:
    """Writes the elastic checkpoint (module docstring) into `directory` by the crash-safe save protocol of
    `save_hf` (other files of the folder stay; a failed save leaves the old checkpoint). A quantized em
    (`elastic.quantized.share`) keeps its high-precision weights (what QAD trains), its recipe (in elastic.json)
    and its quantization state (elastic_quant_state.safetensors), so `load` gives back the same quantized model."""
    meta = {"format": FORMAT_VERSION, "budgets": list(em.budgets),
            "choices": {axis: list(sizes) for axis, sizes in em.choices.items()},
            "removal_order": list(em.removal_order), "target": em.target, "heterogeneous": em.heterogeneous}
    recipe = em.config.runtime.quant
    flat = flatten_dict(em.model.params)
    state = {"/".join(path): np.asarray(leaf) for path, leaf in flat.items() if is_state(path[-1])}
    weights = Model(em.config.replace(runtime={"quant": None}),
                    unflatten_dict({path: leaf for path, leaf in flat.items() if not is_state(path[-1])}))
    if recipe is not None:  # the high-precision weights as a plain checkpoint, the formats and amaxes beside them
        meta["quant"] = recipe.to_dict()

    def fill(staging: Path) -> None:
        write_hf(weights, staging)
        (staging / ELASTIC_JSON).write_text(json.dumps(meta, indent=2))
        save_file(_flat_routers(em.routers), staging / ROUTERS_FILE)
        if recipe is not None:
            save_file(state, staging / QUANT_STATE_FILE)

    return save_folder(directory, fill)


def _with_quant_state(model: Model, recipe: QuantRecipe, file: Path) -> Model:
    """`model` under `recipe` with the quantization state of `file`; CheckpointError naming the file when it is
    missing or its entries are not exactly the state the recipe gives the model (names and shapes)."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the elastic checkpoint's elastic.json names a quantization recipe")
    config = model.config.replace(runtime={"quant": recipe})
    wanted = {path: tuple(leaf.shape) for path, leaf in flatten_dict(abstract_params(config)).items()
              if is_state(path[-1])}
    stored = {tuple(name.split("/")): value for name, value in load_file(file).items()}
    got = {path: tuple(value.shape) for path, value in stored.items()}
    if got != wanted:
        diff = sorted("/".join(p) for p in set(got).symmetric_difference(wanted)) or sorted(
            "/".join(p) for p in got if got[p] != wanted[p])
        raise CheckpointError(f"{file} does not hold the quantization state of its recipe (first differences: "
                              f"{diff[:3]})")
    params = {**flatten_dict(model.params), **{path: jnp.asarray(value) for path, value in stored.items()}}
    return Model(config, unflatten_dict(params))


def load(directory: str | os.PathLike) -> ElasticModel:
    """The ElasticModel `save` wrote. Raises CheckpointError naming the file when elastic.json or the routers are
    missing or do not fit the model."""
    directory = Path(directory)
    model = load_hf(directory)
    meta_file, routers_file = directory / ELASTIC_JSON, directory / ROUTERS_FILE
    for file in (meta_file, routers_file):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: {directory} is not an elastic checkpoint (nemojax.elastic.save "
                                  "writes it)")
    meta = read_json(meta_file)
    try:
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format={meta.get('format')!r} (this version reads {FORMAT_VERSION})")
        table = make_choices(model.config, meta["choices"])
        budgets = check_budgets(meta["budgets"])
        target = _check_target(meta["target"])
        recipe = None if meta.get("quant") is None else QuantRecipe.from_dict(meta["quant"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{meta_file} is invalid: {error}") from None
    if recipe is not None:
        model = _with_quant_state(model, recipe, directory / QUANT_STATE_FILE)
    flat = load_file(routers_file)
    routers: dict[str, dict[str, jax.Array]] = {}
    for name, value in flat.items():
        axis, _, part = name.partition("/")
        routers.setdefault(axis, {})[part] = jnp.asarray(value)
    if set(routers) != set(table):
        raise CheckpointError(f"{routers_file} has routers for {sorted(routers)} but {meta_file} lists the axes "
                              f"{sorted(table)}")
    return ElasticModel(model, routers, table, budgets, tuple(int(i) for i in meta.get("removal_order", ())), target,
                        bool(meta.get("heterogeneous", False)))

