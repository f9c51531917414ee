"""Model FLOPs of a config, for MFU: matmuls and the attention / SSD mixing counted once (causal halves where
only the lower triangle is useful); training = 3 x forward (forward, then the backward's two matmuls per matmul).
Remat recompute is not counted, as MFU conventionally excludes it. The MTP head is not counted. Each layer's
count comes from its registered kind (`nemojax.families.LayerKind.flops`)."""

from __future__ import annotations

from nemojax import families
from nemojax.config import ModelConfig


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a `seq_len` sequence (2 per multiply-add)."""
    total = 2.0 * config.hidden_size * config.vocab_size  # lm_head
    for i, char in enumerate(config.pattern):
        entry = families.kind(char)
        if entry.flops is None:
            raise ValueError(f"layer kind {char!r} ({entry.name}) does not declare its FLOPs")
        total += entry.flops(config.layer(i), seq_len)
    return total


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(config, seq_len)
