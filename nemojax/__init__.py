"""nemojax: NVIDIA's Nemotron models and methods in pure JAX.

    model = nemojax.load_hf("ckpt/")                 # or nemojax.Model.init(nemojax.presets.get("..."), rng)
    logits = model(tokens)                           # [batch, seq] -> [batch, seq, vocab] float32
    out = nemojax.generate(model, [[1, 5, 9]], max_new_tokens=32)   # cached decoding; see nemojax.infer
    nemojax.save_hf(model, "out/")
"""

from nemojax import presets
from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig
from nemojax.infer import cache_bytes, generate
from nemojax.interop.hf import CheckpointError, load_hf, save_hf
from nemojax.model import Model, abstract_params, logical_axes, param_count

__all__ = [
    "AttentionConfig", "CheckpointError", "MambaConfig", "Model", "ModelConfig", "MoEConfig", "MTPConfig",
    "abstract_params", "cache_bytes", "generate", "load_hf", "logical_axes", "param_count", "presets", "save_hf",
]
