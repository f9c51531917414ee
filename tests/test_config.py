"""Tests for nemojax.config: validation errors name the field; from_hf reads every spelling of docs/numerics.md 10;
to_hf loads in transformers' NemotronHConfig and round-trips."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from nemojax import presets
from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig, Runtime

MAMBA = MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, chunk_size=16)
ATTN = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8)
MOE = MoEConfig(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32)


def _config(**changes: Any) -> ModelConfig:
    fields: dict[str, Any] = dict(vocab_size=64, hidden_size=32, pattern="M*-E", mamba=MAMBA, attention=ATTN,
                                  intermediate_size=48, moe=MOE)
    fields.update(changes)
    return ModelConfig(**fields)


def _hf(**changes: Any) -> dict[str, Any]:
    """A minimal hybrid config.json (Nemotron-H style: hybrid_override_pattern, new key names)."""
    d: dict[str, Any] = dict(
        model_type="nemotron_h", vocab_size=64, hidden_size=32, num_hidden_layers=4,
        hybrid_override_pattern="M*-M", num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
        conv_kernel=4, chunk_size=16,
    )
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


# ------------------------------------------------------------------------------------------------ validation


def test_valid_config_builds() -> None:
    """The base config used below is itself valid (so every failure below comes from the one bad field)."""
    cfg = _config()
    assert cfg.num_layers == 4 and cfg.mamba.conv_dim == 4 * 8 + 2 * 2 * 8


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: _config(pattern="M*X"), "pattern"),
        (lambda: _config(pattern=""), "pattern"),
        (lambda: AttentionConfig(num_heads=6, num_kv_heads=4, head_dim=8), "attention.num_heads"),
        (lambda: AttentionConfig(num_heads=4, num_kv_heads=0, head_dim=8), "attention.num_kv_heads"),
        (lambda: MambaConfig(num_heads=6, head_dim=8, state_size=8, n_groups=4), "mamba.num_heads"),
        (lambda: MambaConfig(num_heads=4, head_dim=0, state_size=8, n_groups=2), "mamba.head_dim"),
        (lambda: _config(mamba=None), "mamba"),
        (lambda: _config(attention=None), "attention"),
        (lambda: _config(moe=None), "moe"),
        (lambda: _config(pattern="M", mamba=MAMBA, mtp=MTPConfig(pattern="*E"), attention=None), "attention"),
        (lambda: MoEConfig(num_experts=8, top_k=9, intermediate_size=16, shared_intermediate_size=32), "moe.top_k"),
        (lambda: MoEConfig(num_experts=8, top_k=5, intermediate_size=16, shared_intermediate_size=32, n_group=4,
                           topk_group=2), "moe.top_k"),
        (lambda: MoEConfig(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32, n_group=3),
         "moe.num_experts"),
        (lambda: MoEConfig(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32, n_group=2,
                           topk_group=3), "moe.topk_group"),
        (lambda: Runtime(moe_impl="x"), "runtime.moe_impl"),
        (lambda: AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=10, rope_theta=1e4, partial_rotary_factor=0.5),
         "attention.partial_rotary_factor"),
        (lambda: AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=-1.0), "attention.rope_theta"),
        (lambda: _config(runtime=Runtime(dtype="float64")), "runtime.dtype"),
        (lambda: _config().replace(runtime={"param_dtype": "int8"}), "runtime.param_dtype"),
        (lambda: MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, time_step_limit=(0.1, 0.05)),
         "mamba.time_step_limit"),
        (lambda: MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, time_step_limit=(-1.0, 1.0)),
         "mamba.time_step_limit"),
        (lambda: MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, time_step_limit=(0.0, 1.0, 2.0)),
         "mamba.time_step_limit"),
        (lambda: Runtime(ssd_impl="fast"), "runtime.ssd_impl"),
        (lambda: _config(intermediate_size=None), "intermediate_size"),
        (lambda: _config(intermediate_size=0), "intermediate_size"),
        (lambda: _config(norm_eps=0.0), "norm_eps"),
        (lambda: _config(vocab_size=0), "vocab_size"),
    ],
)
def test_inconsistent_field_raises_value_error_naming_it(build, field: str) -> None:
    """Each inconsistent field raises ValueError whose message starts with that field's name and shows its value."""
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(f"{field}="), str(info.value)


def test_scalar_time_step_limit_raises_value_error() -> None:
    """A scalar time_step_limit (a common mistake: 0.1 instead of (0, 0.1)) raises ValueError naming the field."""
    with pytest.raises(ValueError, match="mamba.time_step_limit"):
        MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, time_step_limit=0.1)


def test_zero_rotary_width_raises_value_error() -> None:
    """A partial_rotary_factor whose rotary width rounds down to 0 channels (8 * 0.1) raises ValueError: RoPE on no
    channel is a silent no-op, not an even rotary width."""
    with pytest.raises(ValueError, match="attention.partial_rotary_factor"):
        AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, partial_rotary_factor=0.1)


def test_time_step_limit_is_normalised_to_float_tuple() -> None:
    """A list limit becomes a hashable float tuple, and the default is the reference (0, inf) (docs/numerics.md 3)."""
    cfg = MambaConfig(num_heads=4, head_dim=8, state_size=8, n_groups=2, time_step_limit=[0, 1])
    assert cfg.time_step_limit == (0.0, 1.0) and isinstance(cfg.time_step_limit, tuple)
    assert MAMBA.time_step_limit == (0.0, math.inf)


def test_config_is_frozen_and_hashable() -> None:
    """Configs are immutable and usable as jit static args / dict keys; equal configs hash equal."""
    cfg = _config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mamba.num_heads = 2  # type: ignore[misc]
    twin = _config()
    assert twin == cfg and hash(twin) == hash(cfg)
    assert {cfg: 1}[twin] == 1
    assert cfg.replace(hidden_size=16) != cfg
    for name in ("nemotron-3-super-120b-a12b", "nemotron-nano-9b-v2-tiny"):
        hash(presets.get(name))


def test_replace_revalidates() -> None:
    """replace() returns a new validated config and leaves the original untouched."""
    cfg = _config()
    new = cfg.replace(mamba={"n_groups": 4})
    assert new.mamba.n_groups == 4 and cfg.mamba.n_groups == 2
    with pytest.raises(ValueError, match="mamba.num_heads"):
        cfg.replace(mamba={"n_groups": 3})


# ------------------------------------------------------------------------------------------------ runtime

FAST = {"dtype": "bfloat16", "param_dtype": "bfloat16", "remat": "full", "moe_impl": "ragged",
        "attention_impl": "xla", "ssd_impl": "sequential"}


def test_architecture_drops_the_runtime() -> None:
    """architecture() is the config with the default Runtime: two configs that differ only in runtime have equal
    (and equally hashed) architectures, while an architecture field still tells them apart."""
    cfg = _config()
    fast = cfg.replace(runtime=FAST)
    assert fast != cfg and fast.runtime == Runtime(**FAST)
    assert fast.architecture() == cfg.architecture() == cfg
    assert fast.architecture().runtime == Runtime()
    assert hash(fast.architecture()) == hash(cfg.architecture())
    assert fast.replace(hidden_size=64).architecture() != cfg.architecture()


def test_to_hf_ignores_the_runtime() -> None:
    """config.json describes the checkpoint, not how it runs: configs that differ only in runtime write the same
    dict, and it carries no runtime field."""
    cfg = _config()
    fast = cfg.replace(runtime=FAST)
    assert fast.to_hf() == cfg.to_hf()
    assert not {"runtime", "torch_dtype", "dtype", "remat"} & set(cfg.to_hf())


def test_replace_unknown_runtime_field_raises() -> None:
    """A dict of runtime changes with an unknown field raises ValueError naming `runtime` and the known fields."""
    with pytest.raises(ValueError, match="^runtime=") as info:
        _config().replace(runtime={"nope": 1})
    assert "nope" in str(info.value)
    for name in ("dtype", "remat", "scan_layers", "moe_impl"):
        assert repr(name) in str(info.value), str(info.value)


def test_runtime_validates_its_fields() -> None:
    """A bad runtime choice raises ValueError naming `runtime.<field>`, its value and the allowed ones."""
    with pytest.raises(ValueError, match="^runtime.remat='bad' is invalid") as info:
        Runtime(remat="bad")
    assert "dots_saveable" in str(info.value)
    with pytest.raises(ValueError, match="^runtime.remat="):
        _config().replace(runtime={"remat": "bad"})


# ------------------------------------------------------------------------------------------------ from_hf


def test_from_hf_reads_sizes() -> None:
    """Every size of a plain config.json lands in the right field."""
    cfg = ModelConfig.from_hf(_hf())
    assert cfg.pattern == "M*-M" and (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (64, 32, 48)
    assert (cfg.attention.num_heads, cfg.attention.num_kv_heads, cfg.attention.head_dim) == (4, 2, 8)
    m = cfg.mamba
    assert (m.num_heads, m.head_dim, m.state_size, m.n_groups, m.conv_kernel, m.chunk_size) == (4, 8, 8, 2, 4, 16)
    assert m.time_step_limit == (0.0, math.inf)
    assert cfg.moe is None and cfg.mtp is None


@pytest.mark.parametrize(
    "names",
    [
        ["linear_attention", "full_attention", "mlp", "moe"],
        ["mamba", "attention", "mlp", "moe"],
        ["linear_attention", "attention", "mlp", "moe"],
    ],
)
def test_from_hf_layers_block_type_new_and_legacy_names(names: list[str]) -> None:
    """layers_block_type with new ("linear_attention", "full_attention") or legacy ("mamba", "attention") names."""
    d = _hf(hybrid_override_pattern=None, layers_block_type=names, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, moe_shared_expert_intermediate_size=32)
    cfg = ModelConfig.from_hf(d)
    assert cfg.pattern == "M*-E"
    assert cfg.moe == MoEConfig(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32)


def test_from_hf_pattern_string_and_list_agree() -> None:
    """hybrid_override_pattern and layers_block_type spellings give equal configs."""
    by_string = ModelConfig.from_hf(_hf())
    by_list = ModelConfig.from_hf(_hf(hybrid_override_pattern=None,
                                      layers_block_type=["mamba", "full_attention", "mlp", "linear_attention"]))
    assert by_string == by_list


def test_from_hf_unknown_layer_name_raises() -> None:
    """An unknown layers_block_type name raises ValueError naming the key."""
    with pytest.raises(ValueError, match="layers_block_type"):
        ModelConfig.from_hf(_hf(hybrid_override_pattern=None, layers_block_type=["mamba", "conv"]))


def test_from_hf_bad_pattern_char_raises() -> None:
    """A pattern string with a character outside M * - E raises ValueError naming hybrid_override_pattern."""
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        ModelConfig.from_hf(_hf(hybrid_override_pattern="M*X-"))


def test_from_hf_strips_megatron_separators() -> None:
    """Megatron's '|' pipeline separators are dropped, and an MTP suffix after '/' is not part of the pattern."""
    cfg = ModelConfig.from_hf(_hf(hybrid_override_pattern="M*|-M", num_hidden_layers=4))
    assert cfg.pattern == "M*-M"
    cfg = ModelConfig.from_hf(_hf(hybrid_override_pattern="M|*-|M/*-", num_hidden_layers=4))
    assert cfg.pattern == "M*-M"


def test_from_hf_attention_head_dim_alias() -> None:
    """Older Nemotron-H configs spell head_dim as attention_head_dim."""
    cfg = ModelConfig.from_hf(_hf(head_dim=None, attention_head_dim=12))
    assert cfg.attention.head_dim == 12
    assert ModelConfig.from_hf(_hf(head_dim=12)) == cfg


def test_from_hf_missing_head_dim_raises() -> None:
    """A config with attention layers but no head_dim (nor alias) raises ValueError naming head_dim."""
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig.from_hf(_hf(head_dim=None))


def test_from_hf_num_hidden_layers_mismatch_raises() -> None:
    """num_hidden_layers that disagrees with the pattern length raises ValueError naming num_hidden_layers."""
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf(_hf(num_hidden_layers=5))


def test_from_hf_mamba_aliases() -> None:
    """The mamba_* aliases of older configs set the same fields as the new names."""
    new = ModelConfig.from_hf(_hf(n_groups=4, conv_kernel=3, chunk_size=32, use_conv_bias=False,
                                  time_step_limit=[0.0, 0.1], time_step_min=0.002, time_step_max=0.2))
    aliased = ModelConfig.from_hf(_hf(n_groups=None, conv_kernel=None, chunk_size=None, mamba_n_groups=4,
                                      mamba_d_conv=3, mamba_chunk_size=32, mamba_conv_bias=False,
                                      mamba_dt_limit=[0.0, 0.1], mamba_dt_min=0.002, mamba_dt_max=0.2))
    m = new.mamba
    assert (m.n_groups, m.conv_kernel, m.chunk_size, m.use_conv_bias) == (4, 3, 32, False)
    assert m.time_step_limit == (0.0, 0.1)
    assert (m.time_step_min, m.time_step_max) == (0.002, 0.2)
    assert aliased == new


def test_from_hf_time_step_limit_inf() -> None:
    """time_step_limit as written by json (a list with inf) gives the float tuple (0, inf)."""
    cfg = ModelConfig.from_hf(_hf(time_step_limit=[0.0, float("inf")]))
    assert cfg.mamba.time_step_limit == (0.0, math.inf)
    cfg = ModelConfig.from_hf(_hf(time_step_limit=[0.001, 0.5]))
    assert cfg.mamba.time_step_limit == (0.001, 0.5)


def test_from_hf_rejects_other_model_type() -> None:
    """A config.json of another architecture raises ValueError naming model_type."""
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf(_hf(model_type="llama"))


def test_from_hf_overrides() -> None:
    """Overrides set nemojax-only fields on top of the parsed ones."""
    cfg = ModelConfig.from_hf(_hf(), runtime={"dtype": "bfloat16", "remat": "full"})
    assert (cfg.runtime.dtype, cfg.runtime.remat, cfg.runtime.param_dtype) == ("bfloat16", "full", "float32")
    assert ModelConfig.from_hf(_hf(), runtime=Runtime(dtype="bfloat16", remat="full")) == cfg


# ------------------------------------------------------------------------------------------------ to_hf


HF_NAMES = ["nemotron-h-8b", "nemotron-nano-9b-v2", "nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b",
            "nemotron-3-super-120b-a12b-tiny", "nemotron-nano-9b-v2-tiny"]


@pytest.mark.parametrize("name", HF_NAMES)
def test_to_hf_loads_in_transformers(name: str) -> None:
    """transformers' NemotronHConfig(**to_hf()) reads back the same pattern and sizes."""
    from transformers import NemotronHConfig

    cfg = presets.get(name)
    hf = NemotronHConfig(**cfg.to_hf())
    assert hf.hybrid_override_pattern == cfg.pattern
    assert hf.num_hidden_layers == cfg.num_layers
    assert (hf.vocab_size, hf.hidden_size, hf.layer_norm_epsilon) == (cfg.vocab_size, cfg.hidden_size, cfg.norm_eps)
    a, m = cfg.attention, cfg.mamba
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (a.num_heads, a.num_kv_heads, a.head_dim)
    assert (hf.mamba_num_heads, hf.mamba_head_dim, hf.ssm_state_size, hf.n_groups, hf.conv_kernel, hf.chunk_size) == (
        m.num_heads, m.head_dim, m.state_size, m.n_groups, m.conv_kernel, m.chunk_size)
    assert tuple(hf.time_step_limit) == m.time_step_limit
    if cfg.intermediate_size is not None:
        assert hf.intermediate_size == cfg.intermediate_size
    if cfg.moe is not None:
        e = cfg.moe
        assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.moe_intermediate_size,
                hf.moe_shared_expert_intermediate_size, hf.moe_latent_size, hf.routed_scaling_factor) == (
            e.num_experts, e.top_k, e.intermediate_size, e.shared_intermediate_size, e.latent_size,
            e.routed_scaling_factor)
    if cfg.mtp is not None:
        assert hf.num_nextn_predict_layers == cfg.mtp.num_layers
        assert hf.mtp_hybrid_override_pattern == cfg.mtp.pattern
    else:
        assert hf.num_nextn_predict_layers == 0


@pytest.mark.parametrize("name", HF_NAMES)
def test_from_hf_of_to_hf_is_identity(name: str) -> None:
    """from_hf(to_hf(c)) == c for float32 configs (tiny presets, and full presets set to float32)."""
    cfg = presets.get(name, runtime={"dtype": "float32", "param_dtype": "float32"})
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_from_hf_reads_transformers_saved_dict() -> None:
    """The dict transformers itself writes (to_dict of a NemotronHConfig) parses back to the same config."""
    from transformers import NemotronHConfig

    cfg = presets.get("nemotron-3-super-120b-a12b-tiny")
    written = NemotronHConfig(**cfg.to_hf()).to_dict()
    assert ModelConfig.from_hf(written) == cfg


def test_rope_round_trips_through_config_json_and_stock_rope_keys_stay_off() -> None:
    """Real NemotronH config.json files carry rope_theta / partial_rotary_factor that no implementation reads:
    they must not turn RoPE on. A nemojax RoPE variant is written under its own key and read back exactly."""
    plain = ModelConfig.from_hf(_hf(rope_theta=10000, partial_rotary_factor=1.0))
    assert plain.attention.rope_theta is None
    roped = plain.replace(attention={"rope_theta": 5e5, "partial_rotary_factor": 0.5})
    d = json.loads(json.dumps(roped.to_hf()))
    assert d["nemojax_rope"] == {"rope_theta": 5e5, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_hf(d).attention == roped.attention
    with pytest.raises(ValueError, match="nemojax_rope"):
        ModelConfig.from_hf({**d, "nemojax_rope": 1e4})
