"""Checkpoint naming: nemojax params <-> Hugging Face checkpoint tensors, shown here for NemotronH
(docs/numerics.md 10; names as NVIDIA-NeMo/Megatron-Bridge@067f987d:src/megatron/bridge/models/nemotronh/
nemotron_h_bridge.py maps them). Each family gives its prefixes (`nemojax.families.Family`) and each layer kind
its fused checkpoint parts (`LayerKind.fused`); the rest is generic.

nemojax params mirror the checkpoint names, so the table is a rename plus a layout change per leaf:

    params path                                   checkpoint tensor (torch layout)          layout
    embeddings/embedding                          backbone.embeddings.weight                same
    layers_{i}/norm/scale                         backbone.layers.{i}.norm.weight           same
    layers_{i}/mixer/in_proj_{p}/kernel [in,out]  backbone.layers.{i}.mixer.in_proj.weight  rows of part p, transposed
    layers_{i}/mixer/conv1d_{p}/kernel [K,C_p]    backbone.layers.{i}.mixer.conv1d.weight   channels of part p [C_p,1,K]
    layers_{i}/mixer/gate/kernel [D,E]        backbone.layers.{i}.mixer.gate.weight    transposed [E,D]
    layers_{i}/mixer/experts/up_proj [E,D,F]  backbone.layers.{i}.mixer.experts.{e}.up_proj.weight, e < E: [F,D]
    mtp/layers_{j}/...                        mtp.layers.{j}....
    norm_f/scale, lm_head/kernel              backbone.norm_f.weight, lm_head.weight

The Mamba mixer holds the checkpoint's fused `in_proj` (rows [z | x | B | C | dt]) and `conv1d` (channels
[x | B | C]), weights and biases alike, as one param per part p (`in_proj_z` ... `in_proj_dt`, `conv1d_x`,
`conv1d_B`, `conv1d_C`; see nemojax.nn.mamba2), so each part shards over the tensor axis by its own heads or
groups. Their rules carry `part`, the position along the checkpoint tensor's first dimension: saving concatenates
the parts in that order, loading cuts the tensor at the parts' widths. The params, and so Orbax checkpoints, do
not depend on the mesh.

`checkpoint_name` normalises the other spellings met in the wild: transformers-native `model.` for `backbone.`,
`embedding.weight` for `embeddings.weight` and a multimodal `language_model.` prefix.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from nemojax import families

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one param leaf maps to one checkpoint tensor, or to one tensor per expert."""

    path: Path
    names: tuple[str, ...]
    layout: str  # "same" | "transpose" | "conv" | "experts"
    # Position of this leaf among the parts of a fused checkpoint tensor (along its first dimension), or None
    # when the leaf is the whole tensor.
    part: int | None = None

    def to_checkpoint(self, value: np.ndarray) -> list[np.ndarray]:
        """The param leaf in torch layout: one array per name in `names`."""
        if self.layout == "same":
            return [value]
        if self.layout == "transpose":
            return [value.T]
        if self.layout == "conv":
            return [value.T[:, None, :]]
        return [value[e].T for e in range(value.shape[0])]

    def from_checkpoint(self, tensors: list[np.ndarray]) -> np.ndarray:
        """Inverse of `to_checkpoint`."""
        if self.layout == "same":
            return tensors[0]
        if self.layout == "transpose":
            return tensors[0].T
        if self.layout == "conv":
            return tensors[0][:, 0, :].T
        return np.stack([t.T for t in tensors])

    def checkpoint_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.layout == "same":
            return param_shape
        if self.layout == "transpose":
            return param_shape[::-1]
        if self.layout == "conv":
            return (param_shape[1], 1, param_shape[0])
        return param_shape[:0:-1]


_LAYER = re.compile(r"layers_(\d+)$")


def fused_parts() -> dict[str, tuple[str, int]]:
    """{param module: (checkpoint module, part index)} over every registered layer kind (the Mamba mixer's
    in_proj_z ... in_proj_dt are parts of `in_proj`, conv1d_x ... conv1d_C of `conv1d`)."""
    return {module: part for char in families.known_kinds() for module, part in families.kind(char).fused.items()}


def _prefix(path: Path, family: families.Family) -> tuple[str, Path]:
    """Splits a param path into its checkpoint prefix (the family's table) and the rest under that module."""
    if path[0] in family.layer_prefixes and len(path) > 1 and _LAYER.match(path[1]):  # nested: mtp/layers_{j}
        return f"{family.layer_prefixes[path[0]]}{_LAYER.match(path[1]).group(1)}.", path[2:]
    if _LAYER.match(path[0]) and "layers" in family.layer_prefixes:
        return f"{family.layer_prefixes['layers']}{_LAYER.match(path[0]).group(1)}.", path[1:]
    if path[0] in family.prefixes:
        return family.prefixes[path[0]], path[1:]
    raise ValueError(f"no checkpoint name for param {'/'.join(path)} in the {family.model_type} naming table")


def rule_for(path: Path, ndim: int, num_experts: int | None = None,
             family: families.Family | None = None) -> TensorRule:
    """The checkpoint mapping of the param at `path` (with `ndim` dimensions) in `family`'s naming table
    (default: nemotron_h)."""
    prefix, rest = _prefix(path, family or families.family("nemotron_h"))
    *modules, leaf = rest
    part = None
    fused = fused_parts()
    if modules and modules[-1] in fused:
        modules[-1], part = fused[modules[-1]]
    stem = prefix + "".join(f"{m}." for m in modules)
    if modules and modules[-1] == "experts":
        return TensorRule(path, tuple(f"{stem}{e}.{leaf}.weight" for e in range(num_experts)), "experts")
    if leaf == "kernel" and modules and modules[-1] == "conv1d":
        return TensorRule(path, (stem + "weight",), "conv", part)
    if leaf == "kernel":
        return TensorRule(path, (stem + "weight",), "transpose" if ndim == 2 else "same", part)
    if leaf in ("scale", "embedding"):
        return TensorRule(path, (stem + "weight",), "same", part)
    return TensorRule(path, (stem + leaf,), "same", part)


_STACKED_EXPERTS = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")


def checkpoint_name(name: str) -> str:
    """Maps the name spellings of docs/numerics.md 10 onto the Hub spelling used by `rule_for`."""
    if name.startswith("language_model."):
        name = name[len("language_model."):]
    if name.startswith("model."):
        name = "backbone." + name[len("model."):]
    if name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    return name


def split_stacked_experts(name: str, value: np.ndarray) -> dict[str, np.ndarray] | None:
    """transformers-native stacked experts `...mixer.experts.up_proj` [E, out, in] -> per-expert tensors."""
    match = _STACKED_EXPERTS.match(name)
    if match is None:
        return None
    if value.ndim != 3:
        raise ValueError(f"stacked expert tensor {name} has shape {tuple(value.shape)}, expected [experts, out, in]")
    stem, leaf = match.groups()
    return {f"{stem}.{e}.{leaf}.weight": value[e] for e in range(value.shape[0])}
