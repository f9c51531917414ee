"""Packed documents (`segment_ids`): a row holding several documents gives, for each of them, the logits (and MTP
logits) of that document run alone; the training loss with `document_mask` is the token-weighted loss of the
documents run alone; kernels and caches that do not take segments refuse them by name."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import presets
from nemojax.model import Model
from nemojax.models.hybrid import NemotronH
from nemojax.train.step import lm_loss

# Row 0: four documents, one of a single token, two crossing the tiny presets' chunk of 16; row 1: two documents
# and 5 pad slots (segment 0).
DOCS = [[7, 20, 1, 12], [25, 10]]
L = 40


def _config(name: str, runtime: dict | None = None, **attention):
    cfg = presets.get(name).replace(runtime={"dtype": "float32", "param_dtype": "float32", **(runtime or {})})
    if attention:
        cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, **attention))
    return cfg


@functools.cache
def _model(name: str, rope: bool = False) -> Model:
    cfg = _config(name, rope_theta=10_000.0, partial_rotary_factor=0.5) if rope else _config(name)
    return Model.init(cfg, 0)


def _packed(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [2, L] and segment_ids [2, L] (1, 2, ... per document, 0 on padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 512, (2, L)).astype(np.int32)
    segments = np.zeros((2, L), np.int32)
    for row, lengths in enumerate(DOCS):
        ends = np.cumsum(lengths)
        for i, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            segments[row, lo:hi] = i + 1
    return tokens, segments


def _documents(segments: np.ndarray):
    """(row, lo, hi) of every document."""
    for row, lengths in enumerate(DOCS):
        ends = np.cumsum(lengths)
        yield from ((row, int(lo), int(hi)) for lo, hi in zip([0, *ends[:-1]], ends, strict=True))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name,rope", [("nemotron-h-8b-tiny", False), ("nemotron-h-8b-tiny", True),
                                       ("nemotron-3-nano-30b-a3b-tiny", False)],
                         ids=["hybrid", "hybrid-rope", "moe"])
def test_each_packed_document_gets_its_own_logits(name: str, rope: bool) -> None:
    model = _model(name, rope)
    tokens, segments = _packed()
    net = NemotronH(model.config)
    forward = jax.jit(lambda p, t, s: net.apply({"params": p}, t, s))
    packed = np.asarray(forward(model.params, jnp.asarray(tokens), jnp.asarray(segments)))
    unmasked = np.asarray(forward(model.params, jnp.asarray(tokens), None))
    for row, lo, hi in _documents(segments):
        alone = np.asarray(forward(model.params, jnp.asarray(tokens[row:row + 1, lo:hi]), None))[0]
        assert _rel(packed[row, lo:hi], alone) < 1e-5, (row, lo, hi)
        if lo > 0:  # without segments the later documents do see their predecessors
            assert _rel(unmasked[row, lo:hi], alone) > 1e-3
    np.testing.assert_allclose(np.asarray(model(tokens, segments)), packed, rtol=1e-6, atol=1e-6)  # Model too


def test_pallas_kernels_take_the_segments(monkeypatch) -> None:
    """runtime.scan_impl and runtime.attention_impl "pallas" (interpreted here) on a packed row give the XLA path's
    logits (float32, 1e-5): the scan kernel's reset masks and the attention kernel's native segment ids."""
    from nemojax.nn import attention, mamba2

    traced = []
    for module, name in ((mamba2, "ssd_scan"), (attention.pallas_attention, "flash_attention")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: traced.append(
            (_n, kw.get("reset", kw.get("segment_ids")) is not None)) or _k(*a, **kw))
    model = _model("nemotron-h-8b-tiny")
    tokens, segments = _packed(3)
    kernels = model.config.replace(runtime={"scan_impl": "pallas", "attention_impl": "pallas"})
    xla = np.asarray(model(tokens, segments))
    pallas = np.asarray(Model(kernels, model.params)(tokens, segments))
    assert _rel(pallas, xla) < 1e-5
    pattern = model.config.pattern
    assert sorted(traced) == sorted([("ssd_scan", True)] * pattern.count("M") + [("flash_attention", True)]
                                    * pattern.count("*"))


def test_mtp_logits_of_packed_documents() -> None:
    """Super tiny (LatentMoE + a 1-depth MTP head): MTP logits at every position whose target lies in its own
    document equal the document's own MTP logits."""
    model = _model("nemotron-3-super-120b-a12b-tiny")
    depths = model.config.mtp.num_layers
    tokens, segments = _packed(1)
    net = NemotronH(model.config)
    forward = jax.jit(lambda p, t, s: net.apply({"params": p}, t, s, method=NemotronH.forward_with_mtp))
    logits, mtp = forward(model.params, jnp.asarray(tokens), jnp.asarray(segments))
    for row, lo, hi in _documents(segments):
        if hi - lo <= depths:
            continue
        alone_logits, alone_mtp = forward(model.params, jnp.asarray(tokens[row:row + 1, lo:hi]), None)
        assert _rel(logits[row, lo:hi], alone_logits[0]) < 1e-5
        for d in range(depths):
            n = hi - lo - depths  # positions of the document with an in-document MTP target
            assert _rel(mtp[d][row, lo:lo + n], alone_mtp[d][0, :n]) < 1e-5, (row, lo, hi, d)


def test_document_mask_loss_is_the_documents_own_loss() -> None:
    """lm_loss(document_mask=True) on the packed batch = the token-weighted mean NLL of each document run alone
    (targets within documents, as the packing pipeline makes them; pads masked), and its gradient is finite."""
    model = _model("nemotron-h-8b-tiny")
    tokens, segments = _packed(2)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = np.ones((2, L), np.float32)
    for row, _, hi in _documents(segments):
        loss_mask[row, hi - 1] = 0.0  # a document's last token has no in-document target here
    loss_mask[segments == 0] = 0.0
    batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(loss_mask),
             "segment_ids": jnp.asarray(segments)}
    loss_fn = jax.jit(lm_loss(model.config, document_mask=True))
    loss, _ = loss_fn(model.params, batch, jax.random.key(0))

    net = NemotronH(model.config)
    nll_sum, count = 0.0, 0.0
    for row, lo, hi in _documents(segments):
        logits = np.asarray(net.apply({"params": model.params}, jnp.asarray(tokens[row:row + 1, lo:hi])), np.float64)
        logp = logits[0] - np.log(np.exp(logits[0] - logits[0].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits[0].max(-1, keepdims=True)
        nll = -logp[np.arange(hi - lo), targets[row, lo:hi]]
        nll_sum += float((nll * loss_mask[row, lo:hi]).sum())
        count += float(loss_mask[row, lo:hi].sum())
    assert abs(float(loss) - nll_sum / count) < 1e-5 * abs(nll_sum / count)
    plain, _ = jax.jit(lm_loss(model.config))(model.params, batch, jax.random.key(0))
    assert abs(float(plain) - float(loss)) > 1e-4  # the flag changes what the model sees
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0]))(model.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    no_segments = {key: value for key, value in batch.items() if key != "segment_ids"}
    with pytest.raises(ValueError, match="train.document_mask=True needs batches with 'segment_ids'"):
        loss_fn(model.params, no_segments, jax.random.key(0))


def test_segments_are_refused_where_they_do_not_apply() -> None:
    """A kernel without segment support and the cached (decode) path name the problem instead of ignoring it."""
    from nemojax.infer.cache import layer_cache
    from nemojax.nn.attention import Attention
    from nemojax.nn.mamba2 import Mamba2Mixer
    from nemojax.nn.state import Extend

    tokens, segments = _packed()
    model = _model("nemotron-h-8b-tiny")
    cudnn = _config("nemotron-h-8b-tiny", runtime={"attention_impl": "cudnn"})
    with pytest.raises(ValueError, match="runtime.attention_impl='cudnn' does not take segment_ids"):
        NemotronH(cudnn).apply({"params": model.params}, jnp.asarray(tokens), jnp.asarray(segments))
    cfg = model.config
    x = jnp.ones((2, L, cfg.hidden_size), jnp.float32)
    step = Extend(jnp.zeros((2,), jnp.int32), jnp.full((2,), L, jnp.int32), fresh=True)
    for module, kind in ((Mamba2Mixer(cfg), "M"), (Attention(cfg), "*")):
        params = module.init(jax.random.key(0), x)
        with pytest.raises(ValueError, match="segment_ids \\(packed documents\\) apply to the uncached forward"):
            module.apply(params, x, layer_cache(cfg, kind, 2, L, jnp.float32), step, jnp.asarray(segments))


def test_document_starts_and_positions() -> None:
    from nemojax.nn.segments import document_positions, document_starts

    ids = jnp.asarray([[1, 1, 2, 3, 3, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(np.asarray(document_starts(ids)),
                                  [[0, 0, 1, 1, 0, 0, 1, 0], [0] * 8])
    np.testing.assert_array_equal(np.asarray(document_positions(ids)),
                                  [[0, 1, 0, 0, 1, 2, 0, 1], list(range(8))])
