"""MTP self-speculative decoding: the drafts equal the uncached MTP head's greedy predictions after every round,
and the output equals plain greedy decoding token for token, on a random model (acceptance ~0) and on a model
built so that most drafts are right (the Mamba and MTP rollback paths run with many accepted drafts)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax import presets
from nemojax.config import MTPConfig
from nemojax.infer import speculative
from nemojax.infer.generate import DecodeConfig, generate, pad_prompts
from tests.hf_reference import perturbed

PROMPT_LENGTHS = (4, 13, 9)
REFERENCE_LEN = 48


def _model(mtp_pattern: str, depths: int = 2, seed: int = 0) -> nemojax.Model:
    cfg = presets.get("nemotron-3-super-120b-a12b-tiny").replace(
        runtime={"dtype": "float32", "param_dtype": "float32"}, mtp=MTPConfig(num_layers=depths, pattern=mtp_pattern))
    return perturbed(nemojax.Model.init(cfg, seed), seed=seed)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _reference_drafts(model: nemojax.Model, committed: list[int], k: int) -> list[int]:
    """Greedy drafts of the MTP head without caches: depth j at the last committed position n - 1 reads the
    embedding of token n + j (a draft for j > 0) and predicts token n + j + 1 (forward_with_mtp over the whole
    sequence)."""
    D = model.config.mtp.num_layers
    drafts: list[int] = []
    for j in range(k):
        # Filler after the drafts changes no earlier position (causal), and one padded length compiles once.
        seq = committed + drafts
        _, mtp_logits = model.with_mtp(np.array([seq + [0] * (REFERENCE_LEN - len(seq))]))
        drafts.append(int(np.argmax(np.asarray(mtp_logits[j])[0, len(committed) - 2])))
    assert D >= k
    return drafts


def test_drafts_equal_uncached_mtp_every_round() -> None:
    """After the prefill and after each of 3 rounds, the k = 2 drafts of every sequence equal the uncached MTP
    head's greedy predictions for the committed tokens (an MTP cache bug would only lower acceptance, never change
    the output, so it is tested here directly). The head's pattern "*M" has an attention layer (its KV cache) and
    a Mamba layer (its state rollback)."""
    model = _model("*M")
    cfg, k = model.config, 2
    prompts = _prompts(cfg.vocab_size)
    tokens, lengths = pad_prompts(prompts, 0)
    dcfg = DecodeConfig(max_new_tokens=16)
    state = jax.jit(functools.partial(speculative.start, cfg, dcfg=dcfg, k=k, max_len=64))(
        model.params, jnp.asarray(tokens), jnp.asarray(lengths))
    round_ = jax.jit(functools.partial(speculative.step, cfg, dcfg=dcfg, k=k))
    for r in range(3):
        out, count = np.asarray(state.out), np.asarray(state.count)
        for i, p in enumerate(prompts):
            committed = p + out[i, :count[i]].tolist()
            assert np.asarray(state.main.length)[i] == len(committed) - 1
            assert np.asarray(state.drafts)[i].tolist() == _reference_drafts(model, committed, k), (r, i)
        state = round_(model.params, state)


def test_random_model_output_equals_greedy() -> None:
    """Nemotron 3 Super's MTP pattern "*E"; k = 3 > 2 trained depths reuses the last depth for the third draft."""
    model = _model("*E")
    prompts = _prompts(model.config.vocab_size, seed=1)
    plain = generate(model, prompts, max_new_tokens=14, eos_ids=[])
    spec = generate(model, prompts, max_new_tokens=14, eos_ids=[], speculative=3)
    assert spec.tokens == plain.tokens
    assert spec.stats["rounds"] > 0


def _mostly_bigram(model: nemojax.Model, main_scale: float) -> nemojax.Model:
    """A model whose MTP head predicts the bigram continuation of its input token (eh_proj passes the embedding
    half, enorm has unit scale and final_layernorm norm_f's, every MTP mixer output is zero) and whose main model
    is that bigram plus `main_scale` times its mixers: drafts are right unless the mixers tip greedy's choice."""
    hidden = model.config.hidden_size
    norm_f = model.params["norm_f"]["scale"]

    def edit(path, x):
        name = jax.tree_util.keystr(path)
        if "mtp" in name and "eh_proj" in name:
            return jnp.concatenate([jnp.eye(hidden), jnp.zeros((hidden, hidden))], axis=0).astype(x.dtype)
        if "mtp" in name and "enorm" in name:
            return jnp.ones_like(x)
        if "mtp" in name and "final_layernorm" in name:
            return norm_f
        if any(p in name for p in ("out_proj", "o_proj", "down_proj", "fc2_latent_proj")):
            return x * 0 if "mtp" in name else x * main_scale
        return x

    return model.replace(params=jax.tree_util.tree_map_with_path(edit, model.params))


def test_high_acceptance_output_equals_greedy() -> None:
    """With most drafts accepted (~2.9 tokens per round at k = 2, measured) but not all, batched sequences accept
    different numbers of drafts per round and roll their Mamba states back to different steps; the output still
    equals plain greedy token for token, also when an EOS ends one sequence early."""
    model = _mostly_bigram(_model("ME"), main_scale=0.01)
    prompts = _prompts(model.config.vocab_size, seed=2)
    plain = generate(model, prompts, max_new_tokens=24, eos_ids=[])
    eos = plain.tokens[1][10]  # sequence 1 stops at its 11th token (or earlier, if that token occurs before)
    stopped = generate(model, prompts, max_new_tokens=24, eos_ids=[eos])
    spec = generate(model, prompts, max_new_tokens=24, eos_ids=[eos], speculative=2)
    assert spec.tokens == stopped.tokens and spec.finish_reason == stopped.finish_reason
    assert len(stopped.tokens[1]) <= 11 and stopped.finish_reason[1] == "eos"
    assert 0.5 < spec.stats["acceptance_rate"] < 1.0, spec.stats
    assert spec.stats["tokens_per_round"] > 1.5


def test_speculative_refuses_what_it_cannot_do() -> None:
    model = _model("*E")
    with pytest.raises(ValueError, match="greedy only"):
        generate(model, [[5] * 8], max_new_tokens=4, temperature=0.7, speculative=1)
    with pytest.raises(ValueError, match="longer than 3 tokens"):
        generate(model, [[5, 6, 7]], max_new_tokens=4, speculative=3)
    plain = model.replace(config=dataclasses.replace(model.config, mtp=None))
    with pytest.raises(ValueError, match="no MTP head"):
        generate(plain, [[5] * 8], max_new_tokens=4, speculative=1)
