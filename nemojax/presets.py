"""Named `ModelConfig` presets for the published NemotronH-family models, plus a tiny twin of each.

`SOURCES` names each published model's Hugging Face model card and paper. The comment on each field names where
its number was read ("U" = not found in any source, kept as the best available value):

  [config.json]  the checkpoint's own config.json on the Hub (the model card's "Files" tab); for Nano 3 30B at
                 https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4 revision 6efb4a2a and for Super
                 at https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4 revision 4f0cf9da
  [MB-prov]      NVIDIA-NeMo/Megatron-Bridge@fff8ba3e4^:src/megatron/bridge/models/nemotronh/nemotron_h_provider.py
  [MB-test]      NVIDIA-NeMo/Megatron-Bridge@3fae82519:tests/unit_tests/models/nemotronh/test_nemotron_h_bridge.py
  [MB-rec]       NVIDIA-NeMo/Megatron-Bridge@067f987d:src/megatron/bridge/recipes/nemotronh/
  [MB-card]      NVIDIA-NeMo/Megatron-Bridge@2dd2e63dee21:examples/model_verification_cards/
                 nemotron-3-super-120b-a12b/card.yaml (tensor and element totals of the Super checkpoint)

Family-wide values: vocab 131072, conv_kernel 4, chunk_size 128 (256 for Nemotron-3-Nano-4B), n_groups 8, norm eps
1e-5, no biases, untied embeddings, no positional encoding (docs/numerics.md 1, 6).

Full-size presets compute and store in bfloat16, like the released checkpoints. "<name>-tiny" presets keep the
structure of their full model (every layer kind, grouped B/C, q width != hidden where the full model has it,
routed + shared experts, latent MoE, MTP) at toy sizes in float32, for tests.

    >>> from nemojax import presets
    >>> cfg = presets.get("nemotron-3-nano-30b-a3b", runtime={"dtype": "float32"})
    >>> tiny = presets.get("nemotron-3-super-120b-a12b-tiny")
"""

from __future__ import annotations

from typing import Any

from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig, Runtime

__all__ = ["get", "names"]

VOCAB_SIZE = 131072  # all NemotronH [MB-test, config.json]; 47B/56B/12B by family [MB-prov]
TINY_SUFFIX = "-tiny"

# Layer patterns (hybrid_override_pattern: M Mamba-2, * attention, - MLP, E MoE).
_H8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"  # also H-4B [MB-prov, MB-test]
_H47B_PATTERN = "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"
_H56B_PATTERN = ("M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*"
                 "-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-")
_NANO9B_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"  # [MB-prov, config.json]
_NANO12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
_NANO3_4B_PATTERN = "M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-"  # [MB-rec]
_NANO3_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"  # [MB-prov, MB-test, config.json]
_SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*"
                  "EMEMEMEME")  # [config.json]


def _mamba(num_heads: int, head_dim: int, state_size: int, chunk_size: int = 128) -> MambaConfig:
    """A published Mamba-2 mixer: n_groups 8, conv_kernel 4, conv bias, no projection bias (docs/numerics.md 1)."""
    return MambaConfig(num_heads=num_heads, head_dim=head_dim, state_size=state_size, n_groups=8,
                       conv_kernel=4, chunk_size=chunk_size)


def _attention(num_heads: int, num_kv_heads: int, head_dim: int = 128) -> AttentionConfig:
    """Bias-free GQA without positional encoding (docs/numerics.md 6)."""
    return AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def _hybrid(hidden_size: int, pattern: str, mamba: MambaConfig, attention: AttentionConfig,
            max_position_embeddings: int, intermediate_size: int | None = None, moe: MoEConfig | None = None,
            mtp: MTPConfig | None = None) -> ModelConfig:
    """A full-size preset with the family-wide fields (module docstring) filled in."""
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, pattern=pattern, mamba=mamba,
                       attention=attention, intermediate_size=intermediate_size, moe=moe, mtp=mtp, norm_eps=1e-5,
                       max_position_embeddings=max_position_embeddings,
                       runtime=Runtime(dtype="bfloat16", param_dtype="bfloat16"))


_FULL: dict[str, ModelConfig] = {
    # Nemotron-H-4B-Base-8K: all sizes [MB-prov]; 8K context [MB-prov].
    "nemotron-h-4b": _hybrid(
        hidden_size=3072,
        pattern=_H8B_PATTERN,
        attention=_attention(32, 8),
        mamba=_mamba(num_heads=112, head_dim=64, state_size=128),
        intermediate_size=12288,
        max_position_embeddings=8192,
    ),
    # Nemotron-H-8B-Base-8K [MB-prov, MB-test].
    "nemotron-h-8b": _hybrid(
        hidden_size=4096,  # [MB-prov, MB-test]
        pattern=_H8B_PATTERN,
        attention=_attention(32, 8),  # [MB-test]
        mamba=_mamba(num_heads=128, head_dim=64, state_size=128),  # [MB-prov]
        intermediate_size=21504,  # [MB-prov]
        max_position_embeddings=8192,  # [MB-test]
    ),
    # Nemotron-H-47B [MB-prov].
    "nemotron-h-47b": _hybrid(
        hidden_size=8192,  # [MB-prov]
        pattern=_H47B_PATTERN,  # [MB-prov]
        attention=_attention(64, 8),  # [MB-prov]; head_dim 128 D
        mamba=_mamba(num_heads=256, head_dim=64, state_size=256),  # [MB-prov]
        intermediate_size=30720,  # [MB-prov]
        max_position_embeddings=8192,  # [MB-prov] training seq_length
    ),
    # Nemotron-H-56B [MB-prov]; the same sizes appear in an NVIDIA aiconfigurator test fixture.
    "nemotron-h-56b": _hybrid(
        hidden_size=8192,  # [MB-prov]
        pattern=_H56B_PATTERN,  # [MB-prov]
        attention=_attention(64, 8),  # [MB-prov]
        mamba=_mamba(num_heads=256, head_dim=64, state_size=256),  # [MB-prov]
        intermediate_size=32768,  # [MB-prov]
        max_position_embeddings=8192,  # [MB-prov]
    ),
    # NVIDIA-Nemotron-Nano-9B-v2 [MB-prov, config.json].
    "nemotron-nano-9b-v2": _hybrid(
        hidden_size=4480,  # [MB-prov, config.json]
        pattern=_NANO9B_PATTERN,  # [MB-prov, config.json]
        attention=_attention(40, 8),  # [config.json, MB-prov]; q width 5120 != hidden
        mamba=_mamba(num_heads=128, head_dim=80, state_size=128),  # [MB-prov]
        intermediate_size=15680,  # [MB-prov]
        max_position_embeddings=131072,  # [MB-prov] seq_length
    ),
    # NVIDIA-Nemotron-Nano-12B-v2(-Base) [MB-prov].
    "nemotron-nano-12b-v2": _hybrid(
        hidden_size=5120,  # [MB-prov]
        pattern=_NANO12B_PATTERN,  # [MB-prov]
        attention=_attention(40, 8),  # [MB-prov]
        mamba=_mamba(num_heads=128, head_dim=80, state_size=128),  # [MB-prov]
        intermediate_size=20480,  # [MB-prov]
        max_position_embeddings=131072,  # [MB-prov] seq_length
    ),
    # NVIDIA-Nemotron-3-Nano-4B-BF16: sizes [MB-rec]; its config.json was not available (U).
    "nemotron-3-nano-4b": _hybrid(
        hidden_size=3136,  # [MB-rec]
        pattern=_NANO3_4B_PATTERN,  # [MB-rec]
        attention=_attention(40, 8),  # [MB-rec]; q width 5120 != hidden
        mamba=_mamba(num_heads=96, head_dim=80, state_size=128, chunk_size=256),  # [MB-rec] (chunk 256)
        intermediate_size=12544,  # [MB-rec]
        max_position_embeddings=262144,  # U; third-party transcriptions of config.json give 262144
    ),
    # NVIDIA-Nemotron-3-Nano-30B-A3B [config.json, MB-test, MB-rec]. Its config.json's unused intermediate_size (1856)
    # is left out: there are no '-' layers, and ModelConfig.from_hf drops it too.
    "nemotron-3-nano-30b-a3b": _hybrid(
        hidden_size=2688,  # [config.json, MB-test, MB-rec]
        pattern=_NANO3_30B_PATTERN,
        attention=_attention(32, 2),  # [config.json, MB-rec]; q width 4096 != hidden
        mamba=_mamba(num_heads=64, head_dim=64, state_size=128),  # [config.json]
        moe=MoEConfig(
            num_experts=128, top_k=6,  # [config.json, MB-rec]
            intermediate_size=1856,  # [config.json]
            shared_intermediate_size=3712, n_shared_experts=1,  # [config.json]
            routed_scaling_factor=2.5,  # [config.json]
            n_group=1, topk_group=1, norm_topk_prob=True,  # [config.json]
        ),
        max_position_embeddings=262144,  # [config.json]
    ),
    # NVIDIA-Nemotron-3-Super-120B-A12B [config.json]; its tensor and element totals equal [MB-card]'s exactly.
    "nemotron-3-super-120b-a12b": _hybrid(
        hidden_size=4096,  # [config.json]
        pattern=_SUPER_PATTERN,  # [config.json]
        attention=_attention(32, 2),  # [config.json]
        mamba=_mamba(num_heads=128, head_dim=64, state_size=128),  # [config.json]
        moe=MoEConfig(
            num_experts=512, top_k=22,  # [config.json, MB-test]
            intermediate_size=2688,  # [config.json]
            shared_intermediate_size=5376, n_shared_experts=1,  # [config.json]
            latent_size=1024,  # [config.json]
            routed_scaling_factor=5.0,  # [config.json]
            n_group=1, topk_group=1, norm_topk_prob=True,  # [config.json]
        ),
        mtp=MTPConfig(num_layers=1, pattern="*E"),  # [config.json]
        max_position_embeddings=262144,  # [config.json]
    ),
}


def _tiny(full: ModelConfig) -> ModelConfig:
    """A toy-sized float32 twin of `full`: same layer kinds (pattern starts with M), n_groups > 1, q width !=
    hidden iff the full model has that, routed + shared experts, latent MoE and MTP where the full model has them."""
    hidden = 64
    pattern = "MEM*EMEM" if "E" in full.pattern else "M-M*-MM-"
    assert set(pattern) == set(full.pattern), (pattern, full.pattern)
    attention = mamba = moe = None
    if full.attention is not None:
        a = full.attention
        wide = a.num_heads * a.head_dim != full.hidden_size
        attention = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=24 if wide else hidden // 4)
    if full.mamba is not None:
        mamba = MambaConfig(num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=16)
    if full.moe is not None:
        e = full.moe
        moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=32, shared_intermediate_size=64,
                        n_shared_experts=e.n_shared_experts, latent_size=None if e.latent_size is None else 32,
                        routed_scaling_factor=e.routed_scaling_factor)
    ffn = None if full.intermediate_size is None else 128
    return full.replace(vocab_size=512, hidden_size=hidden, pattern=pattern, attention=attention, mamba=mamba,
                        moe=moe, intermediate_size=ffn, max_position_embeddings=2048, runtime=Runtime())


# Where each published model is described: its Hugging Face model card and the paper that introduced it.
SOURCES: dict[str, str] = {
    "nemotron-h-4b": "https://huggingface.co/nvidia/Nemotron-H-4B-Base-8K; arXiv 2504.03624",
    "nemotron-h-8b": "https://huggingface.co/nvidia/Nemotron-H-8B-Base-8K; arXiv 2504.03624",
    "nemotron-h-47b": "https://huggingface.co/nvidia/Nemotron-H-47B-Base-8K; arXiv 2504.03624",
    "nemotron-h-56b": "https://huggingface.co/nvidia/Nemotron-H-56B-Base-8K; arXiv 2504.03624",
    "nemotron-nano-9b-v2": "https://huggingface.co/nvidia/NVIDIA-Nemotron-Nano-9B-v2; arXiv 2508.14444",
    "nemotron-nano-12b-v2": "https://huggingface.co/nvidia/NVIDIA-Nemotron-Nano-12B-v2; arXiv 2508.14444",
    "nemotron-3-nano-4b": "https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16; arXiv 2512.20856",
    "nemotron-3-nano-30b-a3b": "https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16; arXiv 2512.20856",
    "nemotron-3-super-120b-a12b": "https://huggingface.co/nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16; "
                                  "arXiv 2604.12374",
}

_PRESETS: dict[str, ModelConfig] = {**_FULL, **{name + TINY_SUFFIX: _tiny(cfg) for name, cfg in _FULL.items()}}


def names() -> list[str]:
    """All preset names: the published models in `SOURCES` order, then their "-tiny" twins."""
    return list(_PRESETS)


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name`, with `overrides` applied through `ModelConfig.replace` (sub-configs may be dicts of
    changes, e.g. `get("nemotron-h-8b", mamba={"chunk_size": 256})`). Raises ValueError for an unknown name."""
    try:
        cfg = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
