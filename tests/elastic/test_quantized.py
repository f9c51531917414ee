"""Quantized nesting (nemojax.elastic.quantized): the full model is calibrated once and every nested model shares
its per-tensor scales; extracting a quantized elastic model gives `quant.apply` of the extracted high-precision
model with the parent's scales, equal to the masked forward wherever the formats allow (per-tensor FP8 always,
NVFP4 on block-aligned sizes); prune slices per-expert and per-block state with the weights; a few steps of
elastic QAD on an NVFP4 student lower the KD loss and keep the routers' budgets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

import nemojax
from nemojax import elastic, quant
from nemojax.compress.distill import kd_logits
from nemojax.compress.prune import prune
from nemojax.elastic import quantized
from nemojax.elastic.choices import make_choices
from nemojax.elastic.extract import slice_sizes
from nemojax.elastic.masked import forward
from nemojax.elastic.train import ElasticConfig
from nemojax.errors import CheckpointError
from nemojax.lowp.recipe import is_state
from tests.elastic.test_permute import CALIB, TOKENS, _f32, _rel_err
from tests.hf_reference import perturbed

RTOL = 1e-5
PATTERN = "M-M*-"  # a short dense hybrid: dropping layer 2 makes layer 1 the one before attention
REMOVAL = (2,)
CHOICES = {"hidden": (64, 48, 32), "ffn": (128, 96, 64), "heads": (4, 2), "mamba_heads": (8, 6, 4), "depth": (0, 1)}
SIZES = {"hidden": 48, "ffn": 96, "heads": 2, "mamba_heads": 4, "mamba_head_dim": 12, "depth": 1}


def _random_scores(config: nemojax.ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Scores of every axis permute reads, random: a non-trivial importance order without the importance pass."""
    rng = np.random.default_rng(seed)
    out = {"hidden": rng.random(config.hidden_size)}
    for i, char in enumerate(config.pattern):
        name = f"layers_{i}"
        if char == "M":
            out[f"{name}/mamba_heads"] = rng.random(config.mamba.num_heads)
            out[f"{name}/mamba_channels"] = rng.random(config.mamba.head_dim)
        elif char == "-":
            out[f"{name}/mlp"] = rng.random(config.intermediate_size)
        elif char == "*":
            out[f"{name}/heads"] = rng.random(config.attention.num_heads)
        elif char == "E":
            e = config.moe
            out[f"{name}/experts"] = rng.random(e.num_experts)
            out[f"{name}/expert_ffn"] = rng.random((e.num_experts, e.intermediate_size))
            out[f"{name}/shared_mlp"] = rng.random(e.shared_intermediate_size)
    return out


def _pinned_routers(choices, picks: list[dict[str, int]], margin: float = 4.0) -> dict:
    """Routers whose hard choice for the b-th budget is index picks[b][axis] of every axis (hidden = one unit per
    budget: the budget's one-hot code passes LeakyReLU unchanged)."""
    n = len(picks)
    return {axis: {"W1": jnp.eye(n, dtype=jnp.float32),
                   "W2": jnp.asarray(np.stack([np.eye(len(sizes))[p[axis]] * margin for p in picks]), jnp.float32)}
            for axis, sizes in choices.items()}


@pytest.fixture(scope="module")
def em():
    """The dense hybrid PATTERN (hidden 64, ffn 128, 4 q / 2 kv heads of 16, Mamba 8 heads x 16 in 2 groups),
    elastic over CHOICES, with routers pinned to the full, the middle and the smallest sizes and budgets that are
    exactly those sizes' parameter fractions."""
    model = perturbed(nemojax.Model.init(_f32("nemotron-h-8b-tiny", pattern=PATTERN), 0), seed=3)
    em = elastic.elastify(model, _random_scores(model.config, 0), choices=CHOICES, removal_order=REMOVAL)
    picks = [{a: 0 for a in CHOICES}, {a: min(1, len(s) - 1) for a, s in CHOICES.items()},
             {a: len(s) - 1 for a, s in CHOICES.items()}]
    full = nemojax.param_count(em.config)
    budgets = tuple(elastic.count_exact(em.config, {a: CHOICES[a][p[a]] for a in CHOICES}, removal_order=REMOVAL)
                    / full for p in picks)
    return model, em.replace(routers=_pinned_routers(em.choices, picks), budgets=budgets)


def _quantized(em, recipe):
    return quantized.share(em, quant.calibrate(quant.apply(em.model, recipe), CALIB))


def _parent_path(path: str, kept_layers: list[int]) -> str:
    """The parent's module path of an extracted model's: layers_j is the parent's layers_{kept_layers[j]}."""
    head, _, rest = path.partition("/")
    return f"layers_{kept_layers[int(head[7:])]}/{rest}" if head.startswith("layers_") else path


def _with_parent_scales(child: nemojax.Model, parent: nemojax.Model, kept_layers: list[int]) -> nemojax.Model:
    """child with every quantization state leaf set from the parent's: layer j is the parent's kept_layers[j];
    extraction keeps prefixes, so a per-expert or per-block state is the parent's leading entries."""
    ours = flatten_dict(parent.params)
    flat = dict(flatten_dict(child.params))
    for path, leaf in flat.items():
        if is_state(path[-1]):
            source = tuple(_parent_path("/".join(path), kept_layers).split("/"))
            flat[path] = ours[source][tuple(slice(0, n) for n in leaf.shape)]
    return nemojax.Model(child.config, unflatten_dict(flat))


def test_fp8_extraction_is_apply_with_the_parents_scales_and_the_masked_forward(em):
    _, em = em
    # per-tensor W8A8 with calibrated FP8 KV amaxes, and a positional rule; the Mamba head width 12 is exact here
    recipe = dataclasses.replace(quant.recipes.get("fp8"), keep_before_attention=True)
    qem = _quantized(em, recipe)
    small = qem.extract(sizes=SIZES)
    # the layer that dropping layer 2 moves before the attention layer keeps its parent's (quantized) format
    kept = [0, 1, 3, 4]
    parent_formats, formats = quant.quantized_layers(qem.model), quant.quantized_layers(small)
    assert formats == {path: parent_formats[_parent_path(path, kept)] for path in formats}
    assert formats["layers_1/mixer/up_proj"] != "high precision"  # recipe.linear would keep it: it is pinned
    assert recipe.linear("layers_1/mixer/up_proj", small.config.pattern) is None
    oracle = _with_parent_scales(quant.apply(em.extract(sizes=SIZES), small.config.runtime.quant), qem.model, kept)
    assert small.config == oracle.config
    theirs = flatten_dict(oracle.params)
    for path, leaf in flatten_dict(small.params).items():
        np.testing.assert_array_equal(leaf, theirs[path], err_msg="/".join(path))
    assert float(flatten_dict(small.params)[("layers_2", "mixer", "k_amax")]) > 0  # the KV scale is the parent's
    assert _rel_err(qem(TOKENS, sizes=SIZES), small(TOKENS)) < RTOL


def test_nvfp4_masked_forward_equals_extraction_on_block_aligned_sizes_only(em):
    _, em = em
    qem = _quantized(em, "nvfp4")
    assert quantized.misaligned_choices(qem) == {}
    smallest = qem.budgets[-1]  # hidden 32, ffn 64, 2 heads, 4 Mamba heads, one layer dropped
    assert _rel_err(qem(TOKENS, smallest), qem.extract(smallest)(TOKENS)) < RTOL
    # Mamba head width 12: out_proj's input packs 12 channels of each head, so the extracted model's 16-blocks
    # hold channels of two heads while the masked model's hold one head and 4 zeros: other dynamic block scales
    # (per-tensor FP8 is exact there: the FP8 test extracts the same width)
    wide = qem.replace(choices=make_choices(qem.config, {**CHOICES, "mamba_head_dim": (16, 12)}))
    assert quantized.misaligned_choices(wide) == {"mamba_head_dim": (12,)}
    sizes = {"mamba_head_dim": 12}
    assert _rel_err(wide(TOKENS, sizes=sizes), wide.extract(sizes=sizes)(TOKENS)) > 1e-2
    # hidden 40: the live prefix ends inside the third 16-block of every linear reading the residual stream; the
    # masked model's block scale there also sees 8 dead weights, the extracted model's sees zero padding
    wide = qem.replace(choices=make_choices(qem.config, {**CHOICES, "hidden": (64, 40)}))
    assert quantized.misaligned_choices(wide) == {"hidden": (40,)}
    sizes = {"hidden": 40}
    assert _rel_err(wide(TOKENS, sizes=sizes), wide.extract(sizes=sizes)(TOKENS)) > 1e-3


@pytest.fixture(scope="module")
def moe():
    """A short MoE hybrid 'ME*' (8 experts of 32, top-2, shared expert 64) under the Nemotron 3 Super NVFP4 recipe:
    routed experts NVFP4 with per-expert amaxes [8] and static block scales, state filled with distinct values."""
    model = perturbed(nemojax.Model.init(_f32("nemotron-3-nano-30b-a3b-tiny", pattern="ME*"), 0), seed=4)
    model = elastic.permute(model, _random_scores(model.config, 1))
    q = quant.apply(model, "nemotron3_super_nvfp4")
    rng = np.random.default_rng(0)
    flat = {path: (jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32) if is_state(path[-1]) else leaf)
            for path, leaf in flatten_dict(q.params).items()}
    return nemojax.Model(q.config, unflatten_dict(flat))


def test_prune_slices_per_expert_and_block_state_with_the_weights(moe):
    ours = flatten_dict(moe.params)
    scores = _random_scores(moe.config, 2)
    scores["hidden"] = np.repeat([4.0, 1.0, 3.0, 2.0], 16)  # keeps the 16-blocks 0, 2 and 3 of the hidden axis
    kept = {}
    small = prune(moe, scores, experts=6, hidden=48, kept=kept)
    theirs = flatten_dict(small.params)
    experts, hidden = kept["layers_1/experts"], kept["hidden"]
    assert len(set(experts) - set(range(6))) > 0  # not a prefix
    up = ("layers_1", "mixer", "experts")
    np.testing.assert_array_equal(theirs[(*up, "up_proj")], np.asarray(ours[(*up, "up_proj")])[experts][:, hidden])
    for name in ("up_proj_amax", "up_proj_input_amax", "down_proj_amax", "down_proj_input_amax"):
        np.testing.assert_array_equal(theirs[(*up, name)], np.asarray(ours[(*up, name)])[experts])
    # up_proj [E, D, F] is blocked along D (its contraction), down_proj [E, F, D] along F
    np.testing.assert_array_equal(theirs[(*up, "up_proj_block_scale")],
                                  np.asarray(ours[(*up, "up_proj_block_scale")])[experts][:, [0, 2, 3]])
    np.testing.assert_array_equal(theirs[(*up, "down_proj_block_scale")],
                                  np.asarray(ours[(*up, "down_proj_block_scale")])[experts][:, :, hidden])
    shared = ("layers_1", "mixer", "shared_experts", "up_proj", "kernel_amax")  # per-tensor: kept as it is
    assert float(theirs[shared]) == float(ours[shared])
    # widths that are not whole blocks: the quantizer zero-pads the last block, and a prefix keeps it
    prefix = {"hidden": -np.arange(64.0)}
    padded = prune(prune(moe, prefix, hidden=56), {"hidden": np.repeat([0.0, 1.0], [16, 40])}, hidden=40)
    np.testing.assert_array_equal(flatten_dict(padded.params)[(*up, "up_proj_block_scale")],  # channels 16..55
                                  np.asarray(ours[(*up, "up_proj_block_scale")])[:, 1:])
    with pytest.raises(ValueError, match="up_proj_block_scale cannot follow this slice"):
        prune(moe, _random_scores(moe.config, 2), hidden=48)  # 48 random channels: 16-blocks mixed
    with pytest.raises(ValueError, match="down_proj_block_scale cannot follow this slice"):
        prune(moe, _random_scores(moe.config, 2), expert_ffn=24)


def test_moe_static_block_scales_extract_to_the_masked_forward(moe):
    em = elastic.ElasticModel(moe, {}, make_choices(moe.config, {"experts": (8, 6), "expert_ffn": (32, 16)}),
                              (1.0,))
    sizes = {"hidden": 48, "experts": 6, "expert_ffn": 16}
    small = em.extract(sizes=sizes)
    assert flatten_dict(small.params)[("layers_1", "mixer", "experts", "up_proj_block_scale")].shape == (6, 3, 16)
    assert _rel_err(em(TOKENS, sizes=sizes), small(TOKENS)) < RTOL


def test_elastic_qad_lowers_the_kd_loss_and_keeps_the_budgets(em):
    teacher, em = em
    qem = _quantized(em, "nvfp4")
    rng = np.random.default_rng(7)
    t = rng.integers(0, 512, (4, 33))
    batch = {"tokens": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((4, 32), np.float32)}
    t_logits = teacher(batch["tokens"])
    student = jax.jit(lambda params, sizes: forward(qem.config, params, batch["tokens"], sizes,
                                                    removal_order=REMOVAL).logits)  # one compile for every size

    def kd(q):  # KD of each budget's nested model on the batch
        params = jax.device_get(q.model.params)
        return [float(kd_logits(student(params, {a: np.int32(v) for a, v in q.sizes(b).items()}), t_logits,
                                batch["loss_mask"], 1.0)) for b in q.budgets]

    config = dataclasses.replace(quantized.QAD_CONFIG, steps=4, batch_size=4, seq_len=32, stage1_fraction=1.0,
                                 optimizer=dataclasses.replace(quantized.QAD_CONFIG.optimizer, lr=2e-3,
                                                               warmup_steps=0), router_lr=1e-3)
    trained, history = quantized.qad(qem, teacher, iter([batch] * 4), config)
    before, after = kd(qem), kd(trained)
    assert sum(after) < 0.9 * sum(before), (before, after)
    assert len(history) == 4
    full = nemojax.param_count(em.config)
    for budget in qem.budgets:
        assert trained.sizes(budget) == qem.sizes(budget)
        fraction = elastic.count_exact(em.config, trained.sizes(budget), removal_order=REMOVAL) / full
        assert abs(fraction / budget - 1) < 0.05
    old, new = flatten_dict(qem.model.params), flatten_dict(trained.model.params)
    assert all(np.array_equal(old[p], new[p]) for p in old if is_state(p[-1]))  # frozen scales
    assert not np.array_equal(old[("layers_1", "mixer", "up_proj", "kernel")],
                              new[("layers_1", "mixer", "up_proj", "kernel")])


def test_bad_input_is_refused_by_name(em):
    teacher, em = em
    with pytest.raises(ValueError, match="quantized.config.runtime.quant is None"):
        quantized.share(em, em.model)
    other = quant.apply(slice_sizes(em.model, {"ffn": 96}), "fp8")
    with pytest.raises(ValueError, match="differs from em.config beyond runtime.quant"):
        quantized.share(em, other)
    with pytest.raises(ValueError, match="em.config.runtime.quant is None"):
        quantized.qad(em, teacher, [], ElasticConfig(steps=1))
    qem = quantized.share(em, quant.apply(em.model, "fp8"))
    with pytest.raises(ValueError, match="teacher.config.runtime.quant is set"):
        quantized.qad(qem, qem.model, [], ElasticConfig(steps=1))


def test_save_load_keeps_a_quantized_elastic_model(em, tmp_path):
    """elastic.save of a quantized em writes the high-precision weights, the recipe and the quantization state;
    load gives back the same params (every leaf, state included), recipe and nested logits. A state file that does
    not fit the recipe is refused, naming the file."""
    _, em = em
    qem = _quantized(em, "nvfp4")
    elastic.save(qem, tmp_path / "q")
    back = elastic.load(tmp_path / "q")
    assert back.config == qem.config and back.config.runtime.quant is not None
    ours, theirs = flatten_dict(qem.model.params), flatten_dict(back.model.params)
    assert ours.keys() == theirs.keys()
    for path, leaf in ours.items():
        np.testing.assert_array_equal(np.asarray(theirs[path]), np.asarray(leaf), err_msg="/".join(path))
    np.testing.assert_array_equal(back(TOKENS, qem.budgets[-1]), qem(TOKENS, qem.budgets[-1]))

    state = tmp_path / "q" / "elastic_quant_state.safetensors"
    entries = load_file(state)
    entries.pop(sorted(entries)[0])
    save_file(entries, state)
    with pytest.raises(CheckpointError, match="elastic_quant_state.safetensors does not hold the quantization state"):
        elastic.load(tmp_path / "q")
