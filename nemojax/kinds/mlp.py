"""The MLP layer kind ('-'): NemotronH's squared-ReLU MLP, `intermediate_size` wide, stateless."""

from __future__ import annotations

from nemojax.families import Axis, LayerKind, WidthRule, register_kind
from nemojax.kinds.masking import prefix
from nemojax.kinds.pruning import (
    WIDTH_FRACTIONS,
    hardware_multiple,
    importance_order,
    keep_top,
    record,
    slice_linear_hidden,
    slice_mlp,
)
from nemojax.nn.mlp import MLP


def mixer(config, name: str | None = None) -> MLP:
    return MLP(config, config.intermediate_size, name=name)


def flops(config, seq_len: int) -> float:
    del seq_len
    return 2 * (2.0 * config.hidden_size * config.intermediate_size)


def importance(config, taps: dict, params: dict, stat) -> dict:
    """mlp: per-row statistic of down_proj's input [b, intermediate_size]."""
    del config, params
    return {"mlp": stat(taps["down_proj_in"])}


def _axes(config) -> dict[str, Axis]:
    full = config.intermediate_size
    return {"ffn": Axis(full, grid=WIDTH_FRACTIONS, grid_multiple=hardware_multiple(full))}


def _changes(config, ffn: int) -> dict:
    return {"intermediate_size": ffn}


def _slice(layer: dict, name: str, config, read, options: dict, ffn: int) -> None:
    """Keeps the top ffn hidden units (in descending score when options["order"] is "importance")."""
    ordered = importance_order(options)
    if ffn < config.intermediate_size or ordered:
        k_ffn = keep_top(read(f"{name}/mlp", (config.intermediate_size,)), ffn, ordered)
        record(options, f"{name}/mlp", k_ffn)
        slice_mlp(layer, k_ffn)


def mask(config, live: dict, out: dict) -> dict:
    """The first live["ffn"] hidden units (masked forward; see `LayerKind.mask`)."""
    if "ffn" not in live:
        return {}
    return {"units": prefix(config.intermediate_size, live["ffn"]) * out.get("ffn", 1.0)}


KIND = register_kind(LayerKind(
    char="-", name="mlp", label="'-' MLP", mixer=mixer, hf_names=("mlp",), config_field="intermediate_size",
    flops=flops,
    importance=importance, linears=("up_proj", "down_proj"), residual_in=("up_proj",), residual_out=("down_proj",),
    slice_hidden=lambda layer, k, config: slice_linear_hidden(layer, k, ("up_proj",), ("down_proj",)),
    width=(WidthRule(("ffn",), _changes, _slice, _axes),), mask=mask,
))
