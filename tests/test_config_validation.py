"""Every field of every config class is checked for type and range when the config is built, and from_hf names the
config.json key behind a malformed value. Each case below was accepted (or raised a bare TypeError/IndexError
without the field's name) before the checks were completed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from nemojax import presets
from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig

MAMBA = dict(num_heads=4, head_dim=8, state_size=8, n_groups=2, chunk_size=16)
ATTN = dict(num_heads=4, num_kv_heads=2, head_dim=8)
MOE = dict(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32)


def _model(**changes: Any) -> ModelConfig:
    fields: dict[str, Any] = dict(vocab_size=64, hidden_size=32, pattern="M*-E", mamba=MambaConfig(**MAMBA),
                                  attention=AttentionConfig(**ATTN), intermediate_size=48, moe=MoEConfig(**MOE))
    return ModelConfig(**{**fields, **changes})


def _hf(**changes: Any) -> dict[str, Any]:
    """A minimal hybrid config.json (pattern "M*-E"); a change to None drops that key."""
    d: dict[str, Any] = dict(
        model_type="nemotron_h", vocab_size=64, hidden_size=32, num_hidden_layers=4, hybrid_override_pattern="M*-E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
    )
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


# (config class, field, bad value, fragment of the message). The message must start with "<prefix><field>=".
CASES = [
    # ModelConfig
    (ModelConfig, "max_position_embeddings", 0, "must be an integer > 0"),
    (ModelConfig, "max_position_embeddings", 4096.0, "must be an integer"),
    (ModelConfig, "max_position_embeddings", "4096", "must be an integer"),
    (ModelConfig, "max_position_embeddings", [4096], "must be an integer"),
    (ModelConfig, "max_position_embeddings", True, "must be an integer"),
    (ModelConfig, "initializer_range", 0.0, "> 0"),
    (ModelConfig, "initializer_range", -0.02, "> 0"),
    (ModelConfig, "initializer_range", math.nan, "finite"),
    (ModelConfig, "initializer_range", "0.02", "finite number"),
    (ModelConfig, "bos_token_id", 64, "in [0, vocab_size=64)"),
    (ModelConfig, "bos_token_id", -1, "in [0, vocab_size=64)"),
    (ModelConfig, "eos_token_id", 2.0, "must be an integer"),
    (ModelConfig, "eos_token_id", [2, 2.0], "a non-empty list of them"),
    (ModelConfig, "eos_token_id", (), "a non-empty list of them"),
    (ModelConfig, "eos_token_id", [2, 64], "in [0, vocab_size=64)"),
    (ModelConfig, "pad_token_id", 100, "in [0, vocab_size=64) or None"),
    (ModelConfig, "pad_token_id", "0", "must be an integer"),
    (ModelConfig, "pad_token_id", False, "must be an integer"),
    (ModelConfig, "mlp_bias", "true", "must be a bool"),
    (ModelConfig, "layer_configs", [None, None], "one entry per layer of pattern (4)"),
    (ModelConfig, "layer_configs", "M*-E", "must be a list"),
    (ModelConfig, "mlp_bias", 1, "must be a bool"),
    (ModelConfig, "tie_word_embeddings", "false", "must be a bool"),
    (ModelConfig, "norm_eps", math.inf, "finite"),
    (ModelConfig, "norm_eps", -1e-5, "> 0"),
    (ModelConfig, "norm_eps", math.nan, "finite"),
    (ModelConfig, "norm_eps", "1e-5", "finite number"),
    (ModelConfig, "vocab_size", 64.0, "must be an integer > 0"),
    (ModelConfig, "hidden_size", True, "must be an integer > 0"),
    (ModelConfig, "intermediate_size", [48], "must be an integer > 0"),
    (ModelConfig, "intermediate_size", 48.0, "must be an integer > 0"),
    (ModelConfig, "mtp", {"num_layers": 1}, "must be a MTPConfig or None"),
    (ModelConfig, "runtime", None, "must be a Runtime"),
    # MambaConfig
    (MambaConfig, "use_conv_bias", "true", "must be a bool"),
    (MambaConfig, "proj_bias", "false", "must be a bool"),
    (MambaConfig, "time_step_floor", -1e-4, ">= 0"),
    (MambaConfig, "time_step_floor", math.nan, "finite"),
    (MambaConfig, "time_step_floor", "1e-4", "finite number"),
    (MambaConfig, "time_step_min", "0.001", "in (0, time_step_max=0.1]"),
    (MambaConfig, "time_step_min", [0.001], "finite number"),
    (MambaConfig, "time_step_min", math.nan, "finite"),
    (MambaConfig, "time_step_max", math.inf, "finite"),
    (MambaConfig, "time_step_max", "0.1", "finite number"),
    (MambaConfig, "time_step_limit", ("0", "1"), "0 <= lo <= hi"),
    (MambaConfig, "time_step_limit", (math.inf, math.inf), "lo finite"),
    (MambaConfig, "time_step_limit", (True, 1.0), "0 <= lo <= hi"),
    (MambaConfig, "num_heads", 4.0, "must be an integer > 0"),
    (MambaConfig, "conv_kernel", "4", "must be an integer > 0"),
    (MambaConfig, "chunk_size", [16], "must be an integer > 0"),
    # AttentionConfig
    (AttentionConfig, "bias", "true", "must be a bool"),
    (AttentionConfig, "rope_theta", math.inf, "finite"),
    (AttentionConfig, "rope_theta", "1e4", "finite number"),
    (AttentionConfig, "partial_rotary_factor", "0.5", "in (0, 1]"),
    (AttentionConfig, "partial_rotary_factor", math.nan, "finite"),
    (AttentionConfig, "head_dim", [8], "must be an integer > 0"),
    # MoEConfig
    (MoEConfig, "routed_scaling_factor", math.nan, "finite"),
    (MoEConfig, "routed_scaling_factor", math.inf, "finite"),
    (MoEConfig, "routed_scaling_factor", 0.0, "> 0"),
    (MoEConfig, "routed_scaling_factor", "2.5", "finite number"),
    (MoEConfig, "norm_topk_prob", "true", "must be a bool"),
    (MoEConfig, "n_shared_experts", "1", "must be an integer >= 0"),
    (MoEConfig, "n_shared_experts", 1.0, "must be an integer >= 0"),
    (MoEConfig, "shared_intermediate_size", [32], "must be an integer > 0"),
    (MoEConfig, "latent_size", 0, "> 0 or None"),
    (MoEConfig, "latent_size", "16", "must be an integer"),
    (MoEConfig, "num_experts", 8.0, "must be an integer > 0"),
    (MoEConfig, "top_k", [2], "must be an integer > 0"),
    # MTPConfig
    (MTPConfig, "num_layers", "1", "must be an integer > 0"),
    (MTPConfig, "num_layers", 1.0, "must be an integer > 0"),
    (MTPConfig, "pattern", ["*", "E"], "must be a string"),
]
PREFIX = {ModelConfig: "", MambaConfig: "mamba.", AttentionConfig: "attention.", MoEConfig: "moe.", MTPConfig: "mtp."}
BASE = {MambaConfig: MAMBA, AttentionConfig: {**ATTN, "rope_theta": 1e4}, MoEConfig: MOE, MTPConfig: {}}


def _build(cls: type, field: str, value: Any) -> Any:
    if cls is ModelConfig:
        return _model(**{field: value})
    return cls(**{**BASE[cls], field: value})


@pytest.mark.parametrize(("cls", "field", "value", "fragment"), CASES,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in CASES])
def test_bad_field_raises_value_error_naming_it(cls: type, field: str, value: Any, fragment: str) -> None:
    """Each bad value raises ValueError "<field>=<value> is invalid: must be ..." with what is allowed."""
    with pytest.raises(ValueError) as info:
        _build(cls, field, value)
    message = str(info.value)
    assert message.startswith(f"{PREFIX[cls]}{field}={value!r} is invalid:"), message
    assert fragment in message, message


def test_cases_cover_every_field_of_every_config_class() -> None:
    """The table above names every field of every config class (Runtime has its own tests in test_config.py), so a
    field added without a check shows up here."""
    covered = {(cls, field) for cls, field, _, _ in CASES}
    exempt = {(ModelConfig, "pattern"), (ModelConfig, "mamba"), (ModelConfig, "attention"), (ModelConfig, "moe"),
              (ModelConfig, "mtp"),
              (MambaConfig, "n_groups"), (MambaConfig, "state_size"), (MambaConfig, "head_dim"),
              (AttentionConfig, "num_heads"), (AttentionConfig, "num_kv_heads"), (MoEConfig, "intermediate_size"),
              (MoEConfig, "n_group"), (MoEConfig, "topk_group")}  # checked in test_config.py
    for cls in PREFIX:
        missing = {f.name for f in dataclasses.fields(cls)} - {f for c, f in covered | exempt if c is cls}
        assert not missing, (cls.__name__, missing)


def test_good_values_are_kept() -> None:
    """Accepted values are unchanged: None token ids, an int where a float is allowed (stored as an equal float),
    the (0, inf) default limit, boundary token ids."""
    cfg = _model(bos_token_id=None, eos_token_id=63, pad_token_id=None, initializer_range=1, norm_eps=1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, 63, None)
    assert cfg.initializer_range == 1.0 and isinstance(cfg.initializer_range, float)
    assert _model(eos_token_id=[2, 5]).eos_token_id == (2, 5)  # a list is kept whole, as a (hashable) tuple
    assert (_model(eos_token_id=None).eos_ids, _model(eos_token_id=7).eos_ids) == ((), (7,))
    m = MambaConfig(**MAMBA, time_step_floor=0, time_step_min=0.1, time_step_max=0.1)
    assert (m.time_step_floor, m.time_step_min, m.time_step_limit) == (0.0, 0.1, (0.0, math.inf))


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_constructs(name: str) -> None:
    """The checks accept every shipped preset (and its to_hf round trip)."""
    cfg = presets.get(name)
    assert isinstance(cfg, ModelConfig)
    assert ModelConfig.from_hf(cfg.to_hf(), runtime=cfg.runtime) == cfg


# ------------------------------------------------------------------------------------------------ from_hf


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"max_position_embeddings": "4096"}, "max_position_embeddings", "must be an integer > 0"),
        ({"initializer_range": -1}, "initializer_range", "> 0"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon", "(sets ModelConfig.norm_eps)"),
        ({"layer_norm_epsilon": {"__float__": "Infinity"}}, "layer_norm_epsilon", "finite"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps", "finite number"),
        ({"bos_token_id": 64}, "bos_token_id", "in [0, vocab_size=64)"),
        ({"pad_token_id": 1.5}, "pad_token_id", "must be an integer"),
        ({"eos_token_id": []}, "eos_token_id", "non-empty list"),
        ({"eos_token_id": [99, 2]}, "eos_token_id", "in [0, vocab_size=64)"),
        ({"mlp_bias": "true"}, "mlp_bias", "must be a bool"),
        ({"use_conv_bias": "true"}, "use_conv_bias", "(sets ModelConfig.mamba.use_conv_bias)"),
        ({"mamba_conv_bias": "false"}, "mamba_conv_bias", "must be a bool"),
        ({"use_bias": "true"}, "use_bias", "(sets ModelConfig.mamba.proj_bias)"),
        ({"mamba_dt_init_floor": -1.0}, "mamba_dt_init_floor", ">= 0"),
        ({"time_step_min": "0.001"}, "time_step_min", "finite number"),
        ({"time_step_limit": 0.1}, "time_step_limit", "(lo, hi)"),
        ({"time_step_limit": ["0", "inf"]}, "time_step_limit", "(lo, hi)"),
        ({"routed_scaling_factor": math.nan}, "routed_scaling_factor", "finite"),
        ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor", "finite number"),
        ({"norm_topk_prob": "true"}, "norm_topk_prob", "must be a bool"),
        ({"moe_latent_size": [16]}, "moe_latent_size", "must be an integer"),
        ({"mamba_num_heads": [4]}, "mamba_num_heads", "must be an integer > 0"),
        ({"n_groups": 3}, "mamba_num_heads", "divisible by mamba.n_groups=3"),
        ({"num_nextn_predict_layers": "1"}, "num_nextn_predict_layers", "must be an integer > 0"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers", "must be an integer > 0"),
        ({"hybrid_override_pattern": 4}, "hybrid_override_pattern", "must be a string"),
        ({"hybrid_override_pattern": None, "layers_block_type": 4}, "layers_block_type", "list"),
        ({"hybrid_override_pattern": None, "layers_block_type": [["mamba"]]}, "layers_block_type", "list"),
        ({"nemojax_rope": {"rope_theta": "1e4"}}, "nemojax_rope.rope_theta", "finite number"),
        ({"nemojax_rope": {"rope_theta": 1e4, "partial_rotary_factor": 2}}, "nemojax_rope.partial_rotary_factor",
         "in (0, 1]"),
    ],
)
def test_from_hf_names_the_config_json_key(changes: dict[str, Any], key: str, fragment: str) -> None:
    """A malformed config.json value raises ValueError naming the key it came from, not a bare TypeError or
    IndexError, nor only the internal field name."""
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf(_hf(**changes))
    message = str(info.value)
    assert key in message and fragment in message, message


@pytest.mark.parametrize("list_key", ["layers_block_type", "layer_types"])
def test_from_hf_refuses_disagreeing_pattern_spellings(list_key: str) -> None:
    """hybrid_override_pattern and a list spelling that describe different stacks are refused (transformers keeps
    the list, Megatron the string: either choice would silently build another network); agreeing ones are read."""
    names = ["mamba", "attention", "mlp", "moe"]
    assert ModelConfig.from_hf(_hf(**{list_key: names})).pattern == "M*-E"
    with pytest.raises(ValueError, match="spellings disagree") as info:
        ModelConfig.from_hf(_hf(**{list_key: ["mamba", "mlp", "attention", "moe"]}))
    assert "hybrid_override_pattern" in str(info.value) and list_key in str(info.value)


def test_from_hf_refuses_disagreeing_mtp_pattern_spellings() -> None:
    """The MTP head's string and list spellings must agree too."""
    d = _hf(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E", mtp_layers_block_type=["attention", "moe"])
    assert ModelConfig.from_hf(d).mtp == MTPConfig(num_layers=1, pattern="*E")
    with pytest.raises(ValueError, match="mtp_hybrid_override_pattern=.*spellings disagree"):
        ModelConfig.from_hf({**d, "mtp_layers_block_type": ["attention", "mlp"]})


def test_from_hf_override_error_names_the_field_not_a_key() -> None:
    """A bad override is the caller's error: it names the field, not a config.json key."""
    with pytest.raises(ValueError, match=r"^norm_eps=0\.0 is invalid"):
        ModelConfig.from_hf(_hf(), norm_eps=0.0)
    with pytest.raises(ValueError, match=r"^runtime=\['nope'\] is invalid"):
        ModelConfig.from_hf(_hf(), runtime={"nope": 1})


def test_replace_with_unknown_sub_config_field_names_it() -> None:
    """replace(mamba={...}) with an unknown field raises ValueError naming mamba and its fields, not a TypeError."""
    with pytest.raises(ValueError, match=r"^mamba=\['heads'\] is invalid: fields must be among"):
        _model().replace(mamba={"heads": 4})


def test_from_hf_input_must_be_a_dict() -> None:
    with pytest.raises(ValueError, match="config.json must be a dict"):
        ModelConfig.from_hf([("vocab_size", 64)])  # type: ignore[arg-type]



def test_every_eos_id_of_a_config_json_list_is_kept_and_written_back() -> None:
    """transformers allows a list of end-of-sequence ids: every one is kept (before: only the first, so generation
    ran past the others) and written back as the same list."""
    cfg = ModelConfig.from_hf(_hf(eos_token_id=[2, 11]))
    assert cfg.eos_token_id == (2, 11) and cfg.eos_ids == (2, 11)
    assert cfg.to_hf()["eos_token_id"] == [2, 11]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize(("entries", "match"), [
    ([None, None, 0, None], r"layer_configs\[2\]=0 is invalid: must be None or a positive int"),
    ([None, MambaConfig(**MAMBA), None, None], r"layer_configs\[1\]=MambaConfig.* must be None, AttentionConfig"),
    ([None, {"num_heads": 3}, None, None], r"attention.num_heads=3 is invalid"),
    ([None, {"heads": 2}, None, None], r"layer_configs\[1\]=\['heads'\] is invalid: fields must be among"),
])
def test_a_bad_layer_configs_entry_is_named(entries: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(layer_configs=entries)


def test_layer_configs_build_each_layer_and_normalise() -> None:
    """An entry equal to the global value is None, all-None is empty (one architecture, one config); layer(i) is
    the global config with that layer's value; a scanned layout refuses a heterogeneous stack."""
    cfg = _model(layer_configs=[{"num_heads": 2}, {"num_heads": 2}, 48, None])
    assert cfg.layer_configs[1:] == (AttentionConfig(**{**ATTN, "num_heads": 2}), None, None)
    assert cfg.layer(0).mamba.num_heads == 2 and cfg.layer(1).attention.num_heads == 2
    assert cfg.layer(3) == cfg.replace(layer_configs=()) and hash(cfg) != hash(cfg.replace(layer_configs=()))
    assert _model(layer_configs=[None, None, 48, None]).layer_configs == ()
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ValueError, match="runtime.scan_layers=True is invalid: must be False for a heterogeneous"):
        cfg.replace(runtime={"scan_layers": True})

