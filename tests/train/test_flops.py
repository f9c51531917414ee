"""Model FLOPs per token on configs small enough to count by hand, plus a cross-check against the real param
shapes: every matmul weight used by a token costs 2 FLOPs (one multiply-add)."""

from __future__ import annotations

import math

import jax
import pytest

from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig
from nemojax.model import abstract_params
from nemojax.train.flops import forward_flops_per_token, train_flops_per_token

D, V = 8, 100


def test_mlp_only():
    """lm_head 2 * 8 * 100 = 1600; MLP up + down 2 * (2 * 8 * 32) = 1024 per layer."""
    one = ModelConfig(vocab_size=V, hidden_size=D, pattern="-", intermediate_size=32)
    assert forward_flops_per_token(one, seq_len=16) == 2624.0
    two = one.replace(pattern="--")
    assert forward_flops_per_token(two, seq_len=16) == 3648.0
    assert forward_flops_per_token(two, seq_len=1024) == 3648.0  # no dependence on the sequence length


def test_attention_only():
    """4 heads, 2 kv heads, head_dim 2: q, k, v 2 * 8 * (4 + 2 + 2) * 2 = 256; o 2 * 8 * 8 = 128;
    scores and values over a causal L = 10 prefix (on average L / 2 keys): 2 * 2 * 8 * 5 = 160."""
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="*",
                         attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=2))
    assert forward_flops_per_token(config, seq_len=10) == 1600 + 256 + 128 + 160
    # the mixing term grows by 16 FLOPs per extra position
    assert forward_flops_per_token(config, seq_len=20) == 1600 + 256 + 128 + 320


def test_moe_layer():
    """E=4, top-2, F=6, one shared expert of width 10: router 2*8*4 = 64; 2 experts * 2 matmuls * 2*8*6 = 384;
    shared 2 * 2*8*10 = 320. With a latent size of 4 the routed experts shrink to 2 * 2 * 2*4*6 = 192 and the
    latent projections add 2 * 2*8*4 = 128."""
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=6, shared_intermediate_size=10)
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="E", moe=moe)
    assert forward_flops_per_token(config, seq_len=7) == 1600 + 64 + 384 + 320
    latent = config.replace(moe={"latent_size": 4})
    assert forward_flops_per_token(latent, seq_len=7) == 1600 + 64 + 192 + 320 + 128
    unshared = config.replace(moe={"n_shared_experts": 0})
    assert forward_flops_per_token(unshared, seq_len=7) == 1600 + 64 + 384


def test_mamba_layer():
    """H=2, P=4, N=4, G=1, K=4: I = 8, conv_dim = 8 + 8 = 16, in_proj = 8 + 16 + 2 = 26.
    Projections 2*8*26 + 2*8*8 = 544, conv 2*4*16 = 128. Chunked SSD with chunk Q = min(8, L):
    C.B 2*G*N*Q/2, (C.B)X 2*H*P*Q/2, states in and out 2 * 2*H*P*N = 128."""
    mamba = MambaConfig(num_heads=2, head_dim=4, state_size=4, n_groups=1, chunk_size=8)
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="M", mamba=mamba)
    assert forward_flops_per_token(config, seq_len=64) == 1600 + 544 + 128 + (32 + 64 + 128)  # Q = 8
    assert forward_flops_per_token(config, seq_len=4) == 1600 + 544 + 128 + (16 + 32 + 128)  # Q = 4


def test_train_is_three_forwards():
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="-*", intermediate_size=32,
                         attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=2))
    assert train_flops_per_token(config, 10) == 3 * forward_flops_per_token(config, 10) == 3 * (2624 + 256 + 128 + 160)


def _weights(params: dict, *path: str) -> int:
    node = params
    for key in path:
        node = node[key]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(node))


def test_matmul_flops_are_twice_the_weights_a_token_uses():
    """For '-' and 'E' layers (no sequence mixing) the count is 2 x the weights each token multiplies by: all of
    the MLP, shared expert, latent projections and router, top_k / E of the routed experts, and lm_head."""
    moe = MoEConfig(num_experts=4, top_k=2, intermediate_size=6, shared_intermediate_size=10, latent_size=4)
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="-E", intermediate_size=32, moe=moe)
    params = abstract_params(config)
    mixer = ("layers_1", "mixer")
    used = (_weights(params, "lm_head", "kernel") + _weights(params, "layers_0", "mixer")
            + _weights(params, *mixer, "gate", "kernel") + _weights(params, *mixer, "shared_experts")
            + _weights(params, *mixer, "fc1_latent_proj") + _weights(params, *mixer, "fc2_latent_proj")
            + _weights(params, *mixer, "experts") * moe.top_k // moe.num_experts)
    assert forward_flops_per_token(config, seq_len=32) == 2 * used


@pytest.mark.parametrize("seq_len", [1, 64])
def test_mamba_projection_flops_match_its_weights(seq_len):
    mamba = MambaConfig(num_heads=2, head_dim=4, state_size=4, n_groups=1, chunk_size=8)
    config = ModelConfig(vocab_size=V, hidden_size=D, pattern="M", mamba=mamba)
    params = abstract_params(config)
    mixer = params["layers_0"]["mixer"]
    kernels = [name for name in mixer if isinstance(mixer[name], dict) and "kernel" in mixer[name]]
    assert len(kernels) == 9  # in_proj_{z,x,B,C,dt}, conv1d_{x,B,C}, out_proj
    matmuls = sum(math.prod(mixer[name]["kernel"].shape) for name in kernels)
    Q = min(8, seq_len)
    ssd = 2 * 1 * 4 * Q / 2 + 2 * 2 * 4 * Q / 2 + 2 * (2 * 2 * 4 * 4)
    assert forward_flops_per_token(config, seq_len) == 2 * (D * V + matmuls) + ssd
