"""Inference: caches, prefill and decode, sampling, thinking budget, MTP speculative decoding, memory planning.

    out = nemojax.generate(model, prompts, max_new_tokens=64)        # see nemojax.infer.generate
    plan = nemojax.infer.cache_bytes(config, batch=1, context=131072, dtype="bfloat16")
    out = nemojax.infer.chat.chat(model, tokenizer, messages, thinking="on")   # the chat module, see its docstring
    model, tokenizer = nemojax.infer.load_checkpoint("runs/demo")   # a training workdir or a Hugging Face folder
"""

# `chat` is bound as the module (nemojax.infer.chat.chat is the function), as README.md calls it
from nemojax.infer import chat
from nemojax.infer.budget import ThinkingBudget
from nemojax.infer.cache import Cache, init_cache
from nemojax.infer.generate import Generation, generate
from nemojax.infer.load import load_checkpoint
from nemojax.infer.memory import MemoryPlan, cache_bytes, max_context
from nemojax.infer.sampling import SamplingConfig

__all__ = ["Cache", "Generation", "MemoryPlan", "SamplingConfig", "ThinkingBudget", "cache_bytes", "chat", "generate",
           "init_cache", "load_checkpoint", "max_context"]
