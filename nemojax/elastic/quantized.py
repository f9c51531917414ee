"""Quantized nesting (Star Elastic, arXiv 2605.07182): one FP8 or NVFP4 elastic model holds every nested model.

    full = quant.calibrate(quant.apply(em.model, "nvfp4"), calib_batches)   # the full model, calibrated once
    qem = elastic.quantized.share(em, full)                                    # every nested model shares its scales
    logits = qem(tokens, budget=0.5)                                           # masked, fake-quantized
    small = qem.extract(0.5)                                                   # a quantized plain Model
    qem, history = elastic.quantized.qad(qem, teacher, data, ElasticConfig(steps=200))

Per-tensor scales are not sliced, only the weight tensors are (the Star Elastic model card): the full model is
calibrated once and a nested model reuses its weight, input and KV amaxes. `extract` (through `compress.prune`)
keeps the per-tensor amaxes, slices per-expert amaxes and static NVFP4 block scales with their weights, and keeps
every surviving layer in its parent's format; so the extracted model is `quant.apply` of the extracted
high-precision model with the parent's amaxes put in.

The masked forward of a quantized elastic model runs the full weights, fake-quantized with the shared amaxes, and
zeroes a dead channel's activation (`nemojax.elastic.masked`). A per-tensor format (FP8) quantizes every element on
its own given the amax, and a dynamic amax (max |x|) is the same over a masked activation as over its slice, so
the masked forward equals the extracted model's. Block formats (NVFP4: 16 elements per scale along the contraction
axis, MX: 32) compute a scale per block, so a live size must be a whole number of blocks: then every weight block
the masked model reads is one the extracted model has, whole. A prefix axis (hidden, ffn, expert_ffn, shared_ffn)
whose live size ends inside a block gives that block a scale that also sees dead weights; a grouped axis keeps a
prefix in every group, and when a group's live width or its stride is not a whole number of blocks the extracted
model packs channels of two groups (two attention heads, two Mamba heads) into one block that the masked model
keeps apart. `misaligned_choices` names those sizes (experts and depth are always exact); static block scales
cannot be sliced across blocks at all (`extract` raises for them).

`qad` is `elastic.train` with a fake-quantized student and its high-precision teacher: the KD of every sampled
nested model reaches the weights through the quantizers' straight-through estimator, the quantization state stays
frozen (the optimizer's frozen mask), and the routers keep training on their budget loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax.traverse_util import flatten_dict

from nemojax import families
from nemojax.elastic.model import ElasticModel
from nemojax.elastic.train import ElasticConfig, train
from nemojax.lowp.formats import check_format
from nemojax.lowp.recipe import LinearQuant, is_state
from nemojax.model import Model

__all__ = ["QAD_CONFIG", "misaligned_choices", "qad", "share"]

# elastic QAD's default run: hard (straight-through) router samples, see `qad`
QAD_CONFIG = ElasticConfig(hard=True)


def share(em: ElasticModel, quantized: Model) -> ElasticModel:
    """`em` holding `quantized`, its full model quantized and calibrated once (`quant.calibrate(quant.apply(
    em.model, recipe), batches)`): every nested model then runs with those scales.

    Raises ValueError when `quantized` has no recipe, another architecture than em.model, or other weights (names
    and shapes; the values are the caller's: a QAD'd model is fine)."""
    if quantized.config.runtime.quant is None:
        raise ValueError("quantized.config.runtime.quant is None: quantize em.model first (nemojax.quant.apply, "
                         "then nemojax.quant.calibrate on the full model)")
    if quantized.config.replace(runtime={"quant": None}) != em.config.replace(runtime={"quant": None}):
        raise ValueError("quantized.config differs from em.config beyond runtime.quant: it must be em.model "
                         "quantized")
    ours = {p: tuple(v.shape) for p, v in flatten_dict(em.model.params).items() if not is_state(p[-1])}
    theirs = {p: tuple(v.shape) for p, v in flatten_dict(quantized.params).items() if not is_state(p[-1])}
    if ours != theirs:
        diff = sorted("/".join(p) for p in set(ours).symmetric_difference(theirs)) or sorted(
            "/".join(p) for p in ours if ours[p] != theirs[p])
        raise ValueError(f"quantized.params do not hold em.model's weights (first differences: {diff[:3]})")
    return em.replace(model=quantized)


# ---------------------------------------------------------------------------------------------- block alignment


def _block(fmt: str | None) -> int:
    """Elements per scale block of a format, 0 for a per-tensor one."""
    return 0 if fmt is None else check_format(fmt).block or 0


def _contraction_block(spec: LinearQuant | None) -> int:
    """Elements per scale block along the contraction axis of a linear (weight or input blocked), 0 if none."""
    if spec is None:
        return 0
    return max(_block(t.fmt) if t is not None else 0 for t in (spec.weight, spec.input))


def _output_block(spec: LinearQuant | None) -> int:
    """Elements per scale block along the output axis: only 2D-blocked weights (16x16 tiles) have one."""
    if spec is None or spec.weight is None or not check_format(spec.weight.fmt).two_d:
        return 0
    return _block(spec.weight.fmt)


def _layer_blocks(config: Any, char: str, contraction: str, outputs: tuple[str, ...]) -> set[int]:
    """The block sizes the recipe gives the linears that read (contraction) or write (outputs) a grouped axis of
    the layers of kind `char`."""
    recipe, blocks = config.runtime.quant, set()
    for i, c in enumerate(config.pattern):
        if c != char:
            continue
        blocks.add(_contraction_block(recipe.linear(f"layers_{i}/mixer/{contraction}", config.pattern)))
        blocks.update(_output_block(recipe.linear(f"layers_{i}/mixer/{name}", config.pattern)) for name in outputs)
    return blocks - {0}


def _misaligned(blocks: set[int], runs: list[int]) -> bool:
    return any(run % block for block in blocks for run in runs)


def _prefix_blocks(config: Any, axis: str) -> set[int]:
    """The block sizes the recipe gives the linears that read (contraction) or write (2D tiles) the prefix axis
    `axis`: the residual stream's readers and writers for "hidden", an MLP's down / up projections for the others."""
    recipe, blocks = config.runtime.quant, set()
    for i, char in enumerate(config.pattern):
        entry = families.kind(char)
        reads, writes = {
            "hidden": (entry.residual_in, entry.residual_out),
            "ffn": (("down_proj",), ("up_proj",)) if char == "-" else ((), ()),
            "expert_ffn": (("experts/down_proj",), ("experts/up_proj",)) if char == "E" else ((), ()),
            "shared_ffn": (("shared_experts/down_proj",), ("shared_experts/up_proj",)) if char == "E" else ((), ()),
        }[axis]
        if axis == "hidden" and char == "E" and config.moe.latent_size is None:  # stacked experts read the stream
            reads, writes = (*reads, "experts/up_proj"), (*writes, "experts/down_proj")
        blocks.update(_contraction_block(recipe.linear(f"layers_{i}/mixer/{n}", config.pattern)) for n in reads)
        blocks.update(_output_block(recipe.linear(f"layers_{i}/mixer/{n}", config.pattern)) for n in writes)
    if axis == "hidden":
        blocks.add(_contraction_block(recipe.linear("lm_head", config.pattern)))
    return blocks - {0}


def misaligned_choices(em: ElasticModel) -> dict[str, tuple[int, ...]]:
    """{axis: sizes} of the choices whose masked forward may differ from the extracted model's under em's block-
    scaled formats (module docstring): a prefix axis ("hidden", "ffn", "expert_ffn", "shared_ffn") when its live
    size is not a whole number of the blocks of the linears reading it; attention "heads" when a KV group's live or
    full width (heads x head_dim) is not a whole number of o_proj's (or 2D-tiled q_proj's) blocks, "mamba_heads"
    likewise for a Mamba SSM group on out_proj (in_proj_z/x when 2D-tiled), "mamba_head_dim" when the live or full
    head width is not. Empty for an unquantized em or a per-tensor recipe."""
    config = em.config
    if config.runtime.quant is None:
        return {}
    out: dict[str, tuple[int, ...]] = {}
    a, m = config.attention, config.mamba
    checks = {
        "heads": lambda h: ("*", "o_proj", ("q_proj",), [h // a.num_kv_heads * a.head_dim,
                                                        a.num_heads // a.num_kv_heads * a.head_dim]),
        "mamba_heads": lambda h: ("M", "out_proj", ("in_proj_z", "in_proj_x"),
                                  [h // m.n_groups * m.head_dim, m.num_heads // m.n_groups * m.head_dim]),
        "mamba_head_dim": lambda p: ("M", "out_proj", ("in_proj_z", "in_proj_x"), [p, m.head_dim]),
    }
    for axis in ("hidden", "ffn", "expert_ffn", "shared_ffn"):
        checks[axis] = lambda size, axis=axis: (None, axis, (), [size])
    for axis, check in checks.items():
        if axis not in em.choices:
            continue
        bad = []
        for size in em.choices[axis][1:]:  # index 0 is the full size: no mask
            char, contraction, outputs, runs = check(size)
            blocks = _prefix_blocks(config, contraction) if char is None else \
                _layer_blocks(config, char, contraction, outputs)
            if _misaligned(blocks, runs):
                bad.append(size)
        if bad:
            out[axis] = tuple(bad)
    return out


# ---------------------------------------------------------------------------------------------- elastic QAD


def qad(em: ElasticModel, teacher: Model, data: Any, config: ElasticConfig = QAD_CONFIG, *,
        workdir: str | Path | None = None, stop_after: int | None = None, checkpoint_every: int | None = None,
        progress: bool = False, mesh: dict[str, int] | None = None) -> tuple[ElasticModel, list[dict[str, float]]]:
    """Quantization-aware distillation of every nested model of the quantized `em` (`share`) from the frozen high-
    precision `teacher` (arXiv 2601.20088; Star Elastic's NVFP4 QAD, a budget per step): `elastic.train` with
    metrics split "elastic_qad". The default config samples hard choices (`ElasticConfig.hard`): a soft Gumbel
    sample scales an axis's activations by its probability before the next linear fake-quantizes them against the
    calibrated amax, which the deployed model never does. Raises ValueError for an unquantized em or a quantized
    teacher."""
    if em.config.runtime.quant is None:
        raise ValueError("em.config.runtime.quant is None: quantize em.model and share it first "
                         "(nemojax.elastic.quantized.share)")
    if teacher.config.runtime.quant is not None:
        raise ValueError("teacher.config.runtime.quant is set: the QAD teacher is the high-precision model "
                         "(nemojax.quant.strip gives it)")
    return train(em, teacher, data, config, workdir=workdir, stop_after=stop_after,
                 checkpoint_every=checkpoint_every, progress=progress, mesh=mesh, desc="elastic_qad")
