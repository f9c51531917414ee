"""Model FLOPs of a config, for MFU: matmuls and the attention / SSD mixing counted once (causal halves where
only the lower triangle is useful); training = 3 x forward (forward, then the backward's two matmuls per matmul).
Remat recompute is not counted, as MFU conventionally excludes it. The MTP head is not counted."""

from __future__ import annotations

from nemojax.config import ModelConfig


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a `seq_len` sequence (2 per multiply-add)."""
    D = config.hidden_size
    total = 2.0 * D * config.vocab_size  # lm_head
    for kind in config.pattern:
        if kind == "M":
            m = config.mamba
            H, P, N, G, Q = m.num_heads, m.head_dim, m.state_size, m.n_groups, min(m.chunk_size, seq_len)
            total += 2.0 * D * m.in_proj_size + 2.0 * m.inner_size * D + 2.0 * m.conv_kernel * m.conv_dim
            # chunked SSD: C.B within chunks (per group) and its product with X (causal halves), then the
            # chunk-state build and read-out (each H * P * N multiply-adds per token)
            total += 2.0 * G * N * Q / 2 + 2.0 * H * P * Q / 2 + 2 * (2.0 * H * P * N)
        elif kind == "*":
            a = config.attention
            qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
            total += 2.0 * D * qkv + 2.0 * a.num_heads * a.head_dim * D
            total += 2 * (2.0 * a.num_heads * a.head_dim * seq_len / 2)  # scores and values, causal
        elif kind == "-":
            total += 2 * (2.0 * D * config.intermediate_size)
        elif kind == "E":
            e = config.moe
            d_in = e.latent_size or D
            total += 2.0 * D * e.num_experts + e.top_k * 2 * (2.0 * d_in * e.intermediate_size)
            total += 2 * (2.0 * D * e.n_shared_experts * e.shared_intermediate_size) if e.n_shared_experts else 0
            total += 2 * (2.0 * D * e.latent_size) if e.latent_size else 0
    return total


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(config, seq_len)
