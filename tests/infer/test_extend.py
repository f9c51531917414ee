"""Cached inference equals the full forward (docs/numerics.md 2): prefill of right-padded prompts of different
lengths, then decode steps; a multi-token continuation from a filled cache; and per-step states that roll back."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax import presets
from nemojax.infer.cache import cache_nbytes, init_cache
from nemojax.infer.extend import commit_steps, decode_step, extend, logits, prefill
from nemojax.nn.state import MambaState
from tests.hf_reference import perturbed

CONFIGS = {
    "dense": "nemotron-h-8b-tiny",  # M-M*-MM-: Mamba, attention, relu2 MLP
    "moe": "nemotron-3-nano-30b-a3b-tiny",  # MEM*EMEM with a shared expert
    "latent_moe": "nemotron-3-super-120b-a12b-tiny",  # LatentMoE (fc1/fc2 latent projections)
}
LENGTHS = np.array([5, 21, 12])


def _model(name: str) -> nemojax.Model:
    cfg = presets.get(CONFIGS[name]).replace(runtime={"dtype": "float32", "param_dtype": "float32"})
    return perturbed(nemojax.Model.init(cfg, 0))


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_equals_forward(name: str) -> None:
    """Right-padded prefill of 3 prompts of lengths 5, 21, 12 then 9 decode steps: every step's logits equal the
    full forward's logits at that position (relative max error < 1e-5)."""
    model = _model(name)
    cfg = model.config
    rng = np.random.default_rng(1)
    full = rng.integers(0, cfg.vocab_size, (3, 32))
    ref = np.asarray(model(full))
    padded = np.where(np.arange(24)[None] < LENGTHS[:, None], full[:, :24], 0)
    lg, cache = prefill(cfg, model.params, jnp.asarray(padded), jnp.asarray(LENGTHS), init_cache(cfg, 3, 40))
    rows = np.arange(3)
    errors = [_rel(lg, ref[rows, LENGTHS - 1])]
    pos = LENGTHS.copy()
    for _ in range(9):
        lg, cache = decode_step(cfg, model.params, jnp.asarray(full[rows, pos]), cache)
        errors.append(_rel(lg, ref[rows, pos]))
        pos = pos + 1
    np.testing.assert_array_equal(np.asarray(cache.length), pos)
    assert max(errors) < 1e-5, errors


def test_chunked_continuation_and_all_steps_rollback() -> None:
    """From a filled cache: (a) a 7-token extend with different commits per sequence leaves the state after the
    committed tokens only; (b) an all-steps extend + commit_steps(count) equals committing count tokens directly,
    so decoding afterwards matches the full forward."""
    model = _model("latent_moe")
    cfg, params = model.config, model.params
    rng = np.random.default_rng(2)
    full = rng.integers(0, cfg.vocab_size, (3, 40))
    ref = np.asarray(model(full))
    padded = np.where(np.arange(24)[None] < LENGTHS[:, None], full[:, :24], 0)
    _, cache = prefill(cfg, params, jnp.asarray(padded), jnp.asarray(LENGTHS), init_cache(cfg, 3, 48))
    rows = np.arange(3)

    chunk = np.stack([full[i, LENGTHS[i]:LENGTHS[i] + 7] for i in rows])
    commit = np.array([7, 3, 1])
    hidden, direct = extend(cfg, params, jnp.asarray(chunk), cache, jnp.asarray(commit))
    out = np.asarray(logits(cfg, params, hidden))
    for i in rows:  # committed positions continue the sequence (the rest are treated as padding)
        assert _rel(out[i, :commit[i]], ref[i, LENGTHS[i]:LENGTHS[i] + commit[i]]) < 1e-5
    hidden, stepped = extend(cfg, params, jnp.asarray(chunk), cache, jnp.asarray(commit), all_steps=True)
    out = np.asarray(logits(cfg, params, hidden))
    for i in rows:  # with all_steps every position is a real continuation
        assert _rel(out[i], ref[i, LENGTHS[i]:LENGTHS[i] + 7]) < 1e-5
    rolled = commit_steps(stepped, jnp.asarray(commit))
    np.testing.assert_array_equal(np.asarray(rolled.length), LENGTHS + commit)
    for a, b in zip(rolled.layers, direct.layers, strict=True):
        if isinstance(a, MambaState):  # (chunked vs sequential scans upstream: equal to round-off)
            np.testing.assert_allclose(np.asarray(a.conv), np.asarray(b.conv), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(a.ssm), np.asarray(b.ssm), rtol=1e-5, atol=1e-6)

    pos = LENGTHS + commit
    for cache_after in (direct, rolled):
        lg, _ = decode_step(cfg, params, jnp.asarray(full[rows, pos]), cache_after)
        assert _rel(lg, ref[rows, pos]) < 1e-5


def test_cache_sizes_and_dtypes() -> None:
    """Mamba state does not grow with max_len; the SSM state is float32 even for a bfloat16 cache."""
    cfg = presets.get("nemotron-h-8b-tiny")
    small, large = init_cache(cfg, 2, 64, "bfloat16"), init_cache(cfg, 2, 4096, "bfloat16")
    a, b = cache_nbytes(small), cache_nbytes(large)
    assert (a["ssm"], a["conv"]) == (b["ssm"], b["conv"]) and b["kv"] == 64 * a["kv"]
    m = cfg.mamba
    state = small.layers[cfg.pattern.index("M")]
    assert state.ssm.dtype == jnp.float32 and state.conv.dtype == jnp.bfloat16
    assert state.conv.shape == (2, m.conv_kernel - 1, m.conv_dim)
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 2, 0)


def test_bfloat16_decode_tracks_the_bfloat16_forward() -> None:
    """bfloat16 compute with a bfloat16 KV/conv cache and a float32 SSM state: decode logits within 1e-2
    (measured 1.9e-3) of the bfloat16 full forward, and within the 4e-2 bfloat16-vs-float32 bound of the core
    model tests (measured 1.4e-2, the same as the full bfloat16 forward's own error)."""
    model32 = _model("latent_moe")
    cfg = model32.config.replace(runtime={"dtype": "bfloat16"})
    model = model32.replace(config=cfg)
    full = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))
    ref16, ref32 = np.asarray(model(full)), np.asarray(model32(full))
    lengths = np.array([7, 15])
    padded = np.where(np.arange(16)[None] < lengths[:, None], full[:, :16], 0)
    _, cache = prefill(cfg, model.params, jnp.asarray(padded), jnp.asarray(lengths), init_cache(cfg, 2, 40))
    assert cache.layers[0].ssm.dtype == jnp.float32 and cache.layers[0].conv.dtype == jnp.bfloat16
    rows, pos = np.arange(2), lengths.copy()
    for _ in range(10):
        lg, cache = decode_step(cfg, model.params, jnp.asarray(full[rows, pos]), cache)
        assert _rel(lg, ref16[rows, pos]) < 1e-2
        assert _rel(lg, ref32[rows, pos]) < 4e-2
        pos = pos + 1


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Compiled HLO text -> {computation name ("ENTRY" for the entry): its instruction lines}."""
    out, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY )?(%\S+) \(", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line.strip())
    return out


def test_decode_loop_updates_kv_caches_in_place() -> None:
    """The compiled generation loop copies no KV cache per step: attention reads the cache before `write_kv`, and
    DECODE_COMPILER_OPTIONS lets copy insertion see it (before both, XLA:CPU copied each KV buffer twice per step).
    The only copies allowed are of the initial zero cache and in the pass-through branch of the loop's last step,
    which skips the forward pass (a branch of nothing but tuple plumbing, taken once)."""
    from nemojax.infer.generate import DecodeConfig, decode_loop

    model = _model("dense")
    a = model.config.attention
    max_len = 77  # a length no other array has
    tokens, lengths = jnp.ones((2, 32), jnp.int32), jnp.array([5, 32])
    lowered = decode_loop.lower(model.config, model.params, tokens, lengths, jnp.zeros((2,), bool),
                                jax.random.key(0), dcfg=DecodeConfig(max_new_tokens=45), max_len=max_len)
    kv = f"f32[2,{a.num_kv_heads},{max_len},{a.head_dim}]"
    plumbing = ("parameter(", "get-tuple-element(", "copy(", "tuple(", "constant(")
    per_step = [lines for name, lines in _computations(lowered.compile().as_text()).items()
                if name != "ENTRY" and not all(any(op in line for op in plumbing) for line in lines)]
    assert any(kv in line for lines in per_step for line in lines)  # the caches are in the loop at all
    copies = [line for lines in per_step for line in lines if re.match(rf"%\S+ = {re.escape(kv)}\S* copy\(", line)]
    assert copies == [], copies
