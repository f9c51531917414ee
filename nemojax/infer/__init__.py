"""Inference: caches, prefill and decode, sampling, thinking budget, MTP speculative decoding, memory planning.

    out = nemojax.generate(model, prompts, max_new_tokens=64)        # see nemojax.infer.generate
    plan = nemojax.infer.cache_bytes(config, batch=1, context=131072, dtype="bfloat16")
"""

from nemojax.infer.budget import ThinkingBudget
from nemojax.infer.cache import Cache, init_cache
from nemojax.infer.generate import Generation, generate
from nemojax.infer.memory import MemoryPlan, cache_bytes, max_context
from nemojax.infer.sampling import SamplingConfig

__all__ = ["Cache", "Generation", "MemoryPlan", "SamplingConfig", "ThinkingBudget", "cache_bytes", "generate",
           "init_cache", "max_context"]
