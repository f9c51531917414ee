"""Checkpoint tensors <-> params: a config.json dict's config, and a state dict's tensors as a Model and back.

A state dict maps tensor names to arrays in torch layout. Loading accepts Hub (`backbone.`) and
transformers-native (`model.`, stacked experts) names, checks the set of tensors and every shape against the
config, and fails with a `CheckpointError` naming each missing, unexpected or mis-shaped tensor. `mtp.` tensors
are optional: a checkpoint without any drops the MTP head from the config (transformers drops them on save),
and a config without MTP ignores them, as transformers does. The folder formats built on this are
`nemojax.interop.hf` (high precision) and `nemojax.interop.modelopt` (NVIDIA's quantized layout).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.errors import CheckpointError  # raised here for tensors that do not fit the config
from nemojax.interop.naming import TensorRule, rule_for, split_stacked_experts
from nemojax.lowp.recipe import is_state
from nemojax.model import Model, Params, abstract_params

log = logging.getLogger(__name__)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The config of a config.json dict, by the family its `model_type` names (default nemotron_h); an unknown
    model_type raises naming the known ones."""
    return families.family(hf_config.get("model_type", "nemotron_h")).config.from_hf(hf_config, **overrides)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def tensor_rules(config: ModelConfig) -> list[tuple[TensorRule, jax.ShapeDtypeStruct]]:
    """Every param leaf of `config` with its checkpoint mapping and abstract value (shape, dtype). Frozen
    quantization state (calibrated amaxes; nemojax.quant) has no place in a high-precision checkpoint and is
    left out: `nemojax.quant.save_quantized` writes it in NVIDIA's quantized layout."""
    experts = config.moe.num_experts if config.moe else None
    family = families.family_of(config)
    return [(rule_for(path, len(leaf.shape), experts, family), leaf)
            for path, leaf in _flatten(abstract_params(config)).items() if not is_state(path[-1])]


def _uncalibrated_state(config: ModelConfig) -> dict[tuple[str, ...], jax.Array]:
    """The quantization-state leaves of `config` at their "not calibrated" value (zero)."""
    return {path: jnp.zeros(leaf.shape, leaf.dtype) for path, leaf in _flatten(abstract_params(config)).items()
            if is_state(path[-1])}


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy, jax or torch array (torch bfloat16 goes through float32, exactly)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.float().numpy().astype(jnp.bfloat16)
        return value.numpy()
    return np.asarray(value)


def fused_parts(rules: Iterable[tuple[TensorRule, jax.ShapeDtypeStruct]]
                ) -> dict[str, list[tuple[TensorRule, int, int]]]:
    """{fused checkpoint tensor name: [(rule, start, stop), ...]}: the params that are parts of one checkpoint
    tensor (the Mamba mixer's in_proj and conv1d), in part order, with the rows each one covers."""
    parts: dict[str, list[tuple[TensorRule, jax.ShapeDtypeStruct]]] = {}
    for rule, leaf in rules:
        if rule.part is not None:
            parts.setdefault(rule.names[0], []).append((rule, leaf))
    out = {}
    for name, found in parts.items():
        found.sort(key=lambda item: item[0].part)
        if [rule.part for rule, _ in found] != list(range(len(found))):
            raise ValueError(f"checkpoint tensor {name}: parts {[r.part for r, _ in found]} are not 0..n-1")
        start, spans = 0, []
        for rule, leaf in found:
            rows = rule.checkpoint_shape(leaf.shape)[0]
            spans.append((rule, start, start + rows))
            start += rows
        out[name] = spans
    return out


def state_dict_from_params(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Hub-named tensors in torch layout, one per expert, each in its param's dtype; the parts of a fused tensor
    (the Mamba mixer's in_proj and conv1d) concatenated in their checkpoint order."""
    flat = _flatten(params)
    rules = tensor_rules(config)
    state_dict = {}
    for rule, _ in rules:
        if rule.part is None:
            for name, tensor in zip(rule.names, rule.to_checkpoint(np.asarray(flat[rule.path])), strict=True):
                state_dict[name] = np.ascontiguousarray(tensor)
    for name, spans in fused_parts(rules).items():
        state_dict[name] = np.ascontiguousarray(np.concatenate(
            [rule.to_checkpoint(np.asarray(flat[rule.path]))[0] for rule, _, _ in spans], axis=0))
    return state_dict


def to_hf_state_dict(model: Model) -> dict[str, np.ndarray]:
    """`model`'s Hub-named torch-layout numpy tensors (`state_dict_from_params` of its config and params)."""
    return state_dict_from_params(model.config, model.params)


def _normalise_names(state_dict: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The family's spelling of every tensor name (`Family.normalize_name`), stacked experts split."""
    normalize = families.family_of(config).normalize_name or (lambda name: name)
    normalised: dict[str, Any] = {}
    for raw_name, value in state_dict.items():
        name = normalize(raw_name)
        split = split_stacked_experts(name, value)
        for key, tensor in (split or {name: value}).items():
            if key in normalised:
                raise CheckpointError(f"tensor {key} appears twice (as {raw_name} and another spelling)")
            normalised[key] = tensor
    return normalised


def _list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_dtype(name: str, tensor: np.ndarray, want: Any) -> None:
    """Checkpoint tensors are cast only between floating dtypes (or kept in the param's own dtype): an integer or
    bool tensor for a float param (or the reverse) is a wrong checkpoint, not something to round silently."""
    got, want = np.dtype(tensor.dtype), np.dtype(want)
    if got != want and not (jnp.issubdtype(got, jnp.floating) and jnp.issubdtype(want, jnp.floating)):
        raise CheckpointError(f"tensor {name} is {got}, expected a floating dtype for its {want} param"
                              if jnp.issubdtype(want, jnp.floating) else
                              f"tensor {name} is {got}, expected {want}")


def nonfinite_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
    """{name: number of NaN/inf elements} of the floating tensors that hold any."""
    counts = {}
    for name, tensor in tensors.items():
        if jnp.issubdtype(tensor.dtype, jnp.floating):
            bad = int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
            if bad:
                counts[name] = bad
    return counts


def _report_nonfinite(tensors: Mapping[str, np.ndarray], strict: bool) -> None:
    """Warns (strict: raises CheckpointError) naming the tensors that hold NaN or inf."""
    counts = nonfinite_tensors(tensors)
    if not counts:
        return
    message = "checkpoint tensors hold NaN/inf: " + _list(f"{name} ({n} elements)" for name, n in counts.items())
    if strict:
        raise CheckpointError(message)
    warnings.warn(message, stacklevel=3)


def model_from_state_dict(config: ModelConfig, state_dict: Mapping[str, Any], *, strict: bool = False) -> Model:
    """A Model from torch-layout tensors; see the module docstring for the names accepted.

    Tensors are cast to their param's dtype only between floating dtypes (an integer or bool tensor for a float
    param raises a CheckpointError naming it). Tensors holding NaN or inf are named in a warning, or with
    `strict=True` in a CheckpointError.
    """
    tensors = _normalise_names(state_dict, config)
    has_mtp = any(name.startswith("mtp.") for name in tensors)
    if config.mtp is not None and not has_mtp:
        log.warning("checkpoint has no mtp.* tensors: loading without the MTP head")
        config = config.replace(mtp=None)
    elif config.mtp is None and has_mtp:
        log.warning("config has no MTP head: ignoring the checkpoint's mtp.* tensors")
        tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}

    rules = tensor_rules(config)
    fused = fused_parts(rules)
    expected = {name: rule.checkpoint_shape(leaf.shape) for rule, leaf in rules for name in rule.names}
    for name, spans in fused.items():  # the whole tensor: its parts' rows, stacked
        expected[name] = (spans[-1][2], *expected[name][1:])
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing tensors: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_list(unexpected)}")
    for name in sorted(expected.keys() & tensors.keys()):
        want, got = expected[name], tuple(tensors[name].shape)
        if want != got:
            problems.append(f"tensor {name} has shape {list(got)}, expected {list(want)}")
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

    arrays_by_name = {name: _to_numpy(tensors[name]) for name in expected}
    for rule, leaf in rules:
        for name in rule.names:
            _check_dtype(name, arrays_by_name[name], leaf.dtype)
    _report_nonfinite(arrays_by_name, strict)

    rows = {rule.path: (start, stop) for spans in fused.values() for rule, start, stop in spans}
    flat = {}
    for rule, leaf in rules:
        arrays = [arrays_by_name[name] for name in rule.names]
        if rule.part is not None:  # this part's rows of the fused tensor
            start, stop = rows[rule.path]
            arrays = [arrays[0][start:stop]]
        value = rule.from_checkpoint(arrays)
        flat[rule.path] = jnp.asarray(value.astype(leaf.dtype))
    flat.update(_uncalibrated_state(config))
    return Model(config, _unflatten(flat))
