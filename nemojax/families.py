"""The registries: layer kinds (one pattern character each) and model families (one `model_type` each).

A layer kind is everything the library needs to know about one kind of mixer, in one entry (`LayerKind`): how
to build it, its inference cache and its bytes, its FLOPs, the linear layers a quantization recipe may reach,
how pruning slices it and which of its params form one fused checkpoint tensor. A family is a config class
(whose `KINDS` are the kinds its pattern may use), a linen module and a checkpoint naming table (`Family`).
Callers (nn blocks, infer, train, compress, quant, interop) look both up here and never branch on a kind or
import a family by name.

The built-in entries live beside the code they describe (`nemojax.kinds.*`, `nemojax.interop.nemotron_h`) and are
loaded by module name on first lookup, as big_vision finds its models, so this module stays at the bottom of the
import ladder. A new kind or family is one `register_kind` / `register_family` call in its own file:

    register_kind(LayerKind(char="R", name="recurrence", mixer=Recurrence, flops=..., ...))
    register_family(Family(model_type="toy", config=ToyConfig, module=ToyLM, prefixes=...))
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Axis", "Family", "LayerKind", "WidthRule", "family", "family_of", "kind", "known_families", "known_kinds",
           "linear_weights", "register_family", "register_kind"]


@dataclasses.dataclass(frozen=True)
class Axis:
    """The range of one pruning target in a config, as `nemojax.compress.prune` accepts it and
    `nemojax.compress.search` grids it.

    Allowed sizes: integers in [max(minimum, multiple_of), full] divisible by multiple_of (`why` says what the
    multiple keeps equal, for error messages). grid: the fractions of `full` the default search grid tries (empty:
    searched only when a grid names it), rounded to multiples of grid_multiple (None: multiple_of). rank: axes with
    rank > 0 break the search's ties before the hidden size, larger kept sizes first (highest rank first).
    """

    full: int
    multiple_of: int = 1
    minimum: int = 1
    why: str = ""
    grid: tuple[float, ...] = ()
    grid_multiple: int | None = None
    rank: int = 0

    def allowed(self) -> list[int]:
        return [v for v in range(max(self.minimum, self.multiple_of), self.full + 1) if v % self.multiple_of == 0]

    def check(self, name: str, value: Any) -> int:
        """`value` as an int if it is an allowed size; else ValueError naming `name` and the allowed values."""
        allowed = self.allowed()
        # numbers.Integral: Python and numpy integers (bool is one too, and is refused)
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in allowed
        if not ok:
            low = max(self.minimum, self.multiple_of)
            rule = f"must be an integer in [{low}, {self.full}]"
            if self.multiple_of > 1:
                rule += f" divisible by {self.multiple_of}{' (' + self.why + ')' if self.why else ''}"
            elif self.why:
                rule += f" ({self.why})"
            raise ValueError(f"{name}={value!r} is invalid: {rule}; allowed values: {_shorten(allowed)}")
        return int(value)


def _shorten(values: list[int], limit: int = 16) -> str:
    if len(values) <= limit:
        return str(values)
    head = ", ".join(str(v) for v in values[:limit // 2])
    tail = ", ".join(str(v) for v in values[-limit // 2:])
    return f"[{head}, ..., {tail}]"


@dataclasses.dataclass(frozen=True)
class WidthRule:
    """Width-pruning targets of a kind (keywords of `nemojax.compress.prune`, e.g. `heads`), pruned together.

    axes(config) -> {target: Axis}: each target's size now and what it may become, for the targets the config can
    prune (a target missing here is refused by `changes`, with the reason). changes(config, **targets) -> {config
    field: value or dict of sub-config changes}: the new sizes for the targets that were given (not None), each
    already checked against its Axis. slice(layer, name, config, read, options, **targets) slices the params of
    one layer of the old config (a nested dict of numpy arrays, edited in place) to the new sizes; `read(key,
    shape)` returns the score array `key` ("layers_3/heads" ...), raising ValueError when it is missing; options:
    prune's other keywords (e.g. group_aware).
    """

    targets: tuple[str, ...]
    changes: Callable[..., dict[str, Any]]
    slice: Callable[..., None]
    axes: Callable[[Any], dict[str, Axis]]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of mixer: the contract every caller relies on.

    char: its pattern character. name: a word for messages and config.json's layer-type list (`hf_names`: the
    spellings read, the first one written). config_field: the `ModelConfig` field the kind needs (None: none).
    mixer(config, name="mixer") -> a linen module called as `mixer(x, state, step, segment_ids) -> (y, state)`
    with x, y: [b, T, hidden]; it is built with name "mixer". mixes_tokens: whether it mixes across positions
    (then it is given packed-document segment ids); stateless kinds keep `state` None.
    cache(config, batch, max_len, dtype) -> the zero inference state of one layer (None: stateless).
    cache_bytes(config, batch, context, itemsize) -> {"kv"|"ssm"|"conv"|...: bytes}, matching `cache` exactly.
    flops(config, seq_len) -> forward FLOPs per token of one layer (2 per multiply-add).
    importance(config, taps, mixer_params, stat) -> {score name: per-row statistic [b, ...]}: the activation
    importance of the layer's prunable axes, from what its mixer sows into the "taps" collection (stat(a [b, L,
    C], mask [b, L] | None) -> [b, C] reduces one activation). Each statistic is aggregated over batch rows as
    the caller's `agg` asks, except those named in `summed`, which are summed over batches. scores(config,
    stats) -> {score name: array} turns one layer's aggregated statistics into the scores pruning reads (None:
    the statistics are the scores).
    linears: params paths under the mixer of its linear layers, the weights a quantization recipe may reach
    (`kernel` of a dense layer, or stacked experts `experts/up_proj`); every other param is never quantized.
    fused: {param module: (checkpoint module, part index)} for modules stored as parts of one checkpoint tensor.
    residual_in / residual_out: the linears whose input / output axis is the residual stream; slice_hidden(layer,
    k_hidden, config) slices every param of one layer that touches the residual stream (hidden-size pruning).
    width: the kind's width-pruning targets. mask(config, live, out) -> elastic entries: the masked (elastic)
    forward's counterpart of `width` (`nemojax.kinds.masking`): from the sizes in `live` ({width target: traced
    int}, one size for this layer; a missing target stays full) and the router multipliers `out` ({target:
    multiplier}, scaling each target's output side), what its modules read from the "elastic" collection
    (`nemojax.nn.live`): masks they multiply into their activations, live widths, as a tree under the block's
    "mixer" scope. The hidden size is the block's (the residual stream is zero on dead hidden channels). The
    masked layer must compute exactly what the layer pruned to those sizes computes.
    compile_cost: rough relative XLA compile work of one block (forward,
    backward and remat recompute of a train step), which `nemojax.models.scan` weighs when it plans scans.
    """

    char: str
    name: str
    mixer: Callable[[Any], Any]
    hf_names: tuple[str, ...] = ()
    config_field: str | None = None
    label: str = ""  # how messages name its layers ("MoE"); default: name
    mixes_tokens: bool = False
    cache: Callable[..., Any] | None = None
    cache_bytes: Callable[..., dict[str, int]] | None = None
    flops: Callable[[Any, int], float] | None = None
    importance: Callable[..., dict] | None = None
    summed: tuple[str, ...] = ()
    scores: Callable[[Any, dict], dict] | None = None
    linears: tuple[str, ...] = ()
    fused: Mapping[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    residual_in: tuple[str, ...] = ()
    residual_out: tuple[str, ...] = ()
    slice_hidden: Callable[..., None] | None = None
    width: tuple[WidthRule, ...] = ()
    mask: Callable[..., dict] | None = None
    compile_cost: float = 1.0

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if not isinstance(self.char, str) or len(self.char) != 1 or self.char.isspace() or self.char in "|/":
            raise ValueError(f"LayerKind.char={self.char!r} is invalid: must be one printable character other "
                             "than '|' and '/'")



@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: `model_type` (config.json's), its config class (with `from_hf(dict)` and `to_hf()`), its
    linen module class (built as `module(config)`), its checkpoint naming (`prefixes`: params top-level name ->
    checkpoint prefix, `layer_prefixes`: layer-list name -> checkpoint prefix of its numbered layers) and its
    linear layers outside the mixers (`linears`: module paths, at the top level or
    under a block).

    The module provides: hidden(tokens, segment_ids, skip_layer) -> final normed hidden [b, L, hidden] (sowing it
    as the "taps" `final_normed`), extend(tokens, states, step) -> (hidden, states), logits(hidden) -> float32
    logits, embed(tokens); with an MTP head also mtp_logits(hidden, tokens, segment_ids) and mtp.extend_depth.
    Its blocks are `nemojax.nn.blocks.Block`s (or sow the same "blocks" / "taps")."""

    model_type: str
    config: type
    module: Callable[[Any], Any]
    prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    layer_prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    linears: tuple[str, ...] = ("lm_head",)
    # maps the checkpoint name spellings met in the wild onto the table's (None: names are read as they are)
    normalize_name: Callable[[str], str] | None = None


_KINDS: dict[str, LayerKind] = {}
_FAMILIES: dict[str, Family] = {}
# Built-in entries, imported on first lookup (module name -> it registers its entries when imported).
_BUILTIN_KINDS = {"M": "nemojax.kinds.mamba", "*": "nemojax.kinds.attention", "-": "nemojax.kinds.mlp",
                  "E": "nemojax.kinds.moe"}
_BUILTIN_FAMILIES = {"nemotron_h": "nemojax.interop.nemotron_h"}


def _register(table: dict, key: str, entry: Any, what: str) -> Any:
    """Adds `entry` under `key`; a key is taken once (re-registering the same entry is a no-op)."""
    current = table.get(key)
    if current is not None and current is not entry:
        raise ValueError(f"{what} {key!r} is already registered")
    table[key] = entry
    return entry


def register_kind(entry: LayerKind) -> LayerKind:
    """Adds a layer kind under its pattern character."""
    return _register(_KINDS, entry.char, entry, "layer kind")


def register_family(entry: Family) -> Family:
    """Adds a family under its model_type."""
    return _register(_FAMILIES, entry.model_type, entry, "model family")


def _load_builtins(table: dict[str, str], key: str | None) -> None:
    for name in ([table[key]] if key in table else table.values() if key is None else ()):
        importlib.import_module(name)


def known_kinds() -> str:
    """Every registered pattern character, built-ins first."""
    _load_builtins(_BUILTIN_KINDS, None)
    return "".join(_KINDS)


def kind(char: str) -> LayerKind:
    """The entry of pattern character `char`; ValueError naming the known kinds for any other."""
    if char not in _KINDS:
        _load_builtins(_BUILTIN_KINDS, char)
    if char not in _KINDS:
        names = ", ".join(f"{c!r} ({_KINDS[c].name})" for c in known_kinds())
        raise ValueError(f"layer kind {char!r} is unknown: the known kinds are {names}")
    return _KINDS[char]


def known_families() -> tuple[str, ...]:
    _load_builtins(_BUILTIN_FAMILIES, None)
    return tuple(_FAMILIES)


def family(model_type: str) -> Family:
    """The family of a config.json `model_type`; ValueError naming the known ones for any other."""
    if model_type not in _FAMILIES:
        _load_builtins(_BUILTIN_FAMILIES, model_type)
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type={model_type!r} is unknown: the known model types are "
                         f"{', '.join(map(repr, known_families()))}")
    return _FAMILIES[model_type]


def family_of(config: Any) -> Family:
    """The family whose config class `config` is an instance of (the most derived registered one)."""
    known_families()
    matches = [f for f in _FAMILIES.values() if isinstance(config, f.config)]
    if not matches:
        raise ValueError(f"{type(config).__name__} is not the config of a registered family (known: "
                         f"{', '.join(f.config.__name__ for f in _FAMILIES.values())})")
    return max(matches, key=lambda f: len(f.config.__mro__))


def _layer_kind(config: Any, path: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(kind char, path under the block) of a param path inside a numbered layer of the main stack or the MTP
    head; None elsewhere."""
    head, *rest = path
    if head.startswith("layers_") and head[len("layers_"):].isdigit():
        return config.pattern[int(head[len("layers_"):])], tuple(rest)
    if head == "mtp" and rest and rest[0].startswith("layers_") and getattr(config, "mtp", None) is not None:
        k = int(rest[0][len("layers_"):])
        return config.mtp.pattern[k % len(config.mtp.pattern)], tuple(rest[1:])
    return None


def linear_weights(config: Any, paths: Any) -> list[tuple[str, ...]]:
    """The param paths among `paths` that are linear-layer weights a quantization recipe may reach: each kind's
    `linears` under its blocks' `mixer` (`.../kernel`, or stacked experts `.../experts/up_proj`), plus the family's
    own (`Family.linears`: lm_head, the MTP fusion projection)."""
    family = family_of(config)
    out = []
    for path in paths:
        path = tuple(path)
        found = _layer_kind(config, path)
        if found is None:
            under, names = path, family.linears
        else:
            char, under = found
            names = family.linears + tuple(f"mixer/{name}" for name in kind(char).linears)
        module = "/".join(under[:-1]) if under[-1] == "kernel" else "/".join(under)
        if module in names:
            out.append(path)
    return out
