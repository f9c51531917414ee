"""Tests for nemojax.presets: published patterns and exact parameter totals, sources, tiny twins, get()/names()."""

from __future__ import annotations

import pytest

from nemojax import presets
from nemojax.config import ModelConfig

# (tensors, parameters) counted from the checkpoint layout of each published config, embeddings + lm_head included,
# per-expert tensors counted one each. The Super row is exactly the count of Megatron-Bridge's verification card
# for the BF16 checkpoint ([MB-card] in nemojax.presets), which checks the whole layout end to end.
TABLE_4_3: dict[str, tuple[int, int]] = {
    "nemotron-h-4b": (311, 4_489_223_040),
    "nemotron-h-8b": (311, 8_100_852_736),
    "nemotron-h-47b": (577, 46_791_554_816),
    "nemotron-h-56b": (701, 56_324_350_464),
    "nemotron-nano-9b-v2": (341, 8_888_227_328),
    "nemotron-nano-12b-v2": (369, 12_310_001_152),
    "nemotron-3-nano-4b": (263, 3_973_556_832),
    "nemotron-3-nano-30b-a3b": (6_243, 31_577_940_288),
    "nemotron-3-super-120b-a12b": (42_683, 123_611_033_088),
}
SUPER_MTP_PARAMS = 2_942_325_248  # the MTP part of the Super row

# The published patterns: layer counts (L, M, *, -, E) and 0-based attention indices.
TABLE_2_4: dict[str, tuple[tuple[int, int, int, int, int], list[int]]] = {
    "nemotron-h-4b": ((52, 24, 4, 24, 0), [7, 18, 29, 40]),
    "nemotron-h-8b": ((52, 24, 4, 24, 0), [7, 18, 29, 40]),
    "nemotron-h-47b": ((98, 45, 5, 48, 0), [17, 38, 49, 60, 86]),
    "nemotron-h-56b": ((118, 54, 10, 54, 0), list(range(7, 107, 11))),
    "nemotron-nano-9b-v2": ((56, 27, 4, 25, 0), [14, 21, 30, 39]),
    "nemotron-nano-12b-v2": ((62, 28, 6, 28, 0), [7, 16, 25, 34, 43, 52]),
    "nemotron-3-nano-4b": ((42, 21, 4, 17, 0), [12, 17, 24, 32]),
    "nemotron-3-nano-30b-a3b": ((52, 23, 6, 0, 23), [5, 12, 19, 26, 33, 42]),
    "nemotron-3-super-120b-a12b": ((88, 40, 8, 0, 40), [7, 16, 25, 36, 47, 58, 69, 78]),
}

FULL_NAMES = list(TABLE_4_3)
TINY_NAMES = [name + "-tiny" for name in FULL_NAMES]


def _layer_shapes(cfg: ModelConfig, kind: str) -> list[tuple[int, ...]]:
    """Checkpoint tensor shapes of one block (pre-norm + mixer) of `kind`, as the Hub checkpoints store them."""
    h = cfg.hidden_size
    shapes: list[tuple[int, ...]] = [(h,)]  # norm.weight
    if kind == "M":
        m = cfg.mamba
        assert m is not None
        inner, heads = m.num_heads * m.head_dim, m.num_heads
        conv_dim = inner + 2 * m.n_groups * m.state_size
        shapes += [(inner + conv_dim + heads, h), (conv_dim, 1, m.conv_kernel), (conv_dim,),  # in_proj, conv1d
                   (heads,), (heads,), (heads,),  # dt_bias, A_log, D
                   (inner,), (h, inner)]  # gated norm, out_proj
    elif kind == "*":
        a = cfg.attention
        assert a is not None
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        shapes += [(q, h), (kv, h), (kv, h), (h, q)]
    elif kind == "-":
        assert cfg.intermediate_size is not None
        shapes += [(cfg.intermediate_size, h), (h, cfg.intermediate_size)]
    elif kind == "E":
        e = cfg.moe
        assert e is not None
        shapes += [(e.num_experts, h), (e.num_experts,)]  # gate.weight, gate.e_score_correction_bias
        d_in = h
        if e.latent_size is not None:
            d_in = e.latent_size
            shapes += [(d_in, h), (h, d_in)]  # fc1_latent_proj, fc2_latent_proj
        shapes += [(e.intermediate_size, d_in), (d_in, e.intermediate_size)] * e.num_experts
        if e.n_shared_experts:
            shapes += [(e.shared_intermediate_size, h), (h, e.shared_intermediate_size)]
    else:
        raise AssertionError(f"unknown layer kind {kind!r}")
    return shapes


def _mtp_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """MTP tensors (Megatron-Bridge names, docs/numerics.md 9): per depth enorm, hnorm, eh_proj, its blocks, and
    final_layernorm."""
    if cfg.mtp is None:
        return []
    h = cfg.hidden_size
    shapes: list[tuple[int, ...]] = []
    for _ in range(cfg.mtp.num_layers):
        shapes += [(h,), (h,), (h, 2 * h)]
        for kind in cfg.mtp.pattern:
            shapes += _layer_shapes(cfg, kind)
        shapes.append((h,))
    return shapes


def _all_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Every checkpoint tensor (docs/numerics.md 10): embeddings, layers, norm_f, lm_head (untied), MTP."""
    v, h = cfg.vocab_size, cfg.hidden_size
    shapes: list[tuple[int, ...]] = [(v, h), (h,), (v, h)]
    for kind in cfg.pattern:
        shapes += _layer_shapes(cfg, kind)
    return shapes + _mtp_shapes(cfg)


def _numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


@pytest.mark.parametrize("name", FULL_NAMES)
def test_full_preset_counts_match_spec_table(name: str) -> None:
    tensors, params = TABLE_4_3[name]
    shapes = _all_shapes(presets.get(name))
    assert len(shapes) == tensors
    assert _numel(shapes) == params


def test_super_mtp_part_matches_spec() -> None:
    assert _numel(_mtp_shapes(presets.get("nemotron-3-super-120b-a12b"))) == SUPER_MTP_PARAMS


@pytest.mark.parametrize("name", FULL_NAMES)
def test_param_count_matches_model(name: str) -> None:
    from nemojax.model import param_count

    assert param_count(presets.get(name)) == TABLE_4_3[name][1]


@pytest.mark.parametrize("name", FULL_NAMES)
def test_full_preset_pattern_matches_spec_table(name: str) -> None:
    (length, n_mamba, n_attn, n_mlp, n_moe), attn_indices = TABLE_2_4[name]
    pattern = presets.get(name).pattern
    assert len(pattern) == length
    assert [pattern.count(c) for c in "M*-E"] == [n_mamba, n_attn, n_mlp, n_moe]
    assert [i for i, c in enumerate(pattern) if c == "*"] == attn_indices


@pytest.mark.parametrize("name", FULL_NAMES)
def test_full_preset_family_fields(name: str) -> None:
    cfg = presets.get(name)
    assert cfg.vocab_size == 131072 and cfg.norm_eps == 1e-5
    assert (cfg.runtime.dtype, cfg.runtime.param_dtype) == ("bfloat16", "bfloat16")
    assert cfg.mamba is not None
    assert (cfg.mamba.n_groups, cfg.mamba.conv_kernel) == (8, 4)
    assert cfg.mamba.chunk_size == (256 if name == "nemotron-3-nano-4b" else 128)
    assert cfg.attention is not None and cfg.attention.rope_theta is None
    assert (cfg.mtp is not None) == (name == "nemotron-3-super-120b-a12b")


@pytest.mark.parametrize("name", FULL_NAMES + TINY_NAMES)
def test_preset_survives_hf_round_trip(name: str) -> None:
    cfg = presets.get(name)
    assert ModelConfig.from_hf(cfg.to_hf(), runtime=cfg.runtime) == cfg


def _q_width_differs(cfg: ModelConfig) -> bool:
    """Whether attention's q width n_heads * head_dim differs from hidden (docs/numerics.md 6)."""
    assert cfg.attention is not None
    return cfg.attention.num_heads * cfg.attention.head_dim != cfg.hidden_size


@pytest.mark.parametrize("name", FULL_NAMES)
def test_tiny_preset_keeps_structure(name: str) -> None:
    full, tiny = presets.get(name), presets.get(name + "-tiny")
    assert set(tiny.pattern) == set(full.pattern)
    assert tiny.pattern[0] == "M" and 6 <= tiny.num_layers <= 10
    assert (tiny.runtime.dtype, tiny.runtime.param_dtype) == ("float32", "float32")
    assert tiny.hidden_size <= 128 and tiny.vocab_size <= 1024
    assert tiny.mamba is not None and full.mamba is not None
    assert tiny.mamba.n_groups > 1 and tiny.mamba.num_heads % tiny.mamba.n_groups == 0
    assert tiny.mamba.chunk_size <= 32
    assert _q_width_differs(tiny) == _q_width_differs(full)
    assert (tiny.moe is None) == (full.moe is None)
    if full.moe is not None and tiny.moe is not None:
        assert tiny.moe.num_experts <= 8 and tiny.moe.top_k == 2
        assert (tiny.moe.latent_size is None) == (full.moe.latent_size is None)
        assert tiny.moe.n_shared_experts == full.moe.n_shared_experts
    assert tiny.mtp == full.mtp
    assert _numel(_all_shapes(tiny)) < 2_000_000


def test_names_lists_every_preset_once() -> None:
    listed = presets.names()
    assert listed == FULL_NAMES + TINY_NAMES
    assert len(set(listed)) == len(listed)


def test_get_applies_overrides() -> None:
    cfg = presets.get("nemotron-h-8b", runtime={"dtype": "float32", "remat": "full"}, mamba={"chunk_size": 64})
    assert cfg.mamba is not None and cfg.mamba.chunk_size == 64
    assert (cfg.runtime.dtype, cfg.runtime.remat) == ("float32", "full")
    assert cfg.runtime.param_dtype == "bfloat16"
    base = presets.get("nemotron-h-8b")
    assert base.runtime.dtype == "bfloat16" and base.mamba is not None and base.mamba.chunk_size == 128


def test_get_rejects_invalid_override() -> None:
    with pytest.raises(ValueError, match="runtime.dtype"):
        presets.get("nemotron-h-8b-tiny", runtime={"dtype": "int8"})


def test_unknown_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="nemotron-h-9b") as info:
        presets.get("nemotron-h-9b")
    assert "nemotron-h-8b" in str(info.value)  # lists the known names


def test_every_published_preset_cites_its_model_card_and_paper() -> None:
    assert list(presets.SOURCES) == FULL_NAMES
    for name, source in presets.SOURCES.items():
        card, paper = source.split("; ")
        assert card.startswith("https://huggingface.co/nvidia/"), name
        assert paper.startswith("arXiv ") and len(paper.split()[1]) == 10, name
