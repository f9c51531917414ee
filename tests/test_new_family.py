"""A new layer kind and a new family, defined in this file only, run through the whole library unchanged.

The kind 'R' is a gated linear recurrence (per channel h_t = a_t h_{t-1} + (1 - a_t) u_t, y = (h * silu(g)) W_o);
the family "toy_recurrent" stacks it with MLPs under its own config class, module and checkpoint names. Nothing
in the package knows either: init, forward, cached generation, training, importance, pruning, quantization and
a save_hf / load_hf round trip must all work through the registries (`nemojax.families`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
import nemojax.infer.memory
from nemojax import compress, families, quant
from nemojax.compress.distill import finetune
from nemojax.config import ModelConfig
from nemojax.infer.cache import init_cache
from nemojax.infer.generate import generate
from nemojax.interop import hf
from nemojax.kinds.pruning import keep_top, slice_linear_hidden, take
from nemojax.nn.blocks import Block
from nemojax.nn.linear import dense, dtypes
from nemojax.nn.norms import RMSNorm
from nemojax.train.optim import OptimizerConfig

# --------------------------------------------------------------------------------------------- the new kind


@dataclasses.dataclass(frozen=True)
class RecurrenceConfig:
    width: int


class Recurrence(nn.Module):
    """x: [b, T, hidden] -> (y [b, T, hidden], state [b, width] float32 | None)."""

    config: Any

    @nn.compact
    def __call__(self, x, state=None, step=None, segment_ids=None):
        cfg, W = self.config, self.config.recurrence.width
        a = jax.nn.sigmoid(dense(cfg, W, ("embed", "mlp"), name="a_proj")(x).astype(jnp.float32))
        u = dense(cfg, W, ("embed", "mlp"), name="u_proj")(x).astype(jnp.float32)
        g = dense(cfg, W, ("embed", "mlp"), name="g_proj")(x)
        if segment_ids is not None:  # a document's first token forgets the previous one
            first = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
            a = jnp.where(first[..., None], 0.0, a)
        if step is not None:  # tokens past `commit` leave the state alone (decay 1, no input)
            keep = step.valid(x.shape[1])[..., None]
            a, u = jnp.where(keep, a, 1.0), jnp.where(keep, u, 0.0)
        h0 = jnp.zeros((x.shape[0], W), jnp.float32) if state is None else state

        def scan_step(h, inputs):
            a_t, u_t = inputs
            h = a_t * h + (1.0 - a_t) * u_t
            return h, h

        last, h = jax.lax.scan(scan_step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(u, 0, 1)))
        h = jnp.swapaxes(h, 0, 1)
        mixed = (h * jax.nn.silu(g.astype(jnp.float32))).astype(dtypes(cfg)[0])
        self.sow("taps", "o_proj_in", mixed)
        y = dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="o_proj")(mixed)
        return y, (None if state is None else last)


def _rec_changes(config, rec_width: int) -> dict:
    return {"recurrence": RecurrenceConfig(rec_width)}


def _rec_slice(layer, name, config, read, options, rec_width: int) -> None:
    keep = keep_top(read(f"{name}/rec", (config.recurrence.width,)), rec_width)
    for proj in ("a_proj", "u_proj", "g_proj"):
        take(layer, f"mixer/{proj}/kernel", keep, 1)
    take(layer, "mixer/o_proj/kernel", keep, 0)


RECURRENCE = families.register_kind(families.LayerKind(
    char="R", name="recurrence", mixer=Recurrence, hf_names=("recurrence",), config_field="recurrence",
    mixes_tokens=True,
    cache=lambda config, batch, max_len, dtype: jnp.zeros((batch, config.recurrence.width), jnp.float32),
    cache_bytes=lambda config, batch, context, itemsize: {"recurrence": batch * config.recurrence.width * 4},
    flops=lambda config, seq_len: 2.0 * 4 * config.hidden_size * config.recurrence.width,
    importance=lambda config, taps, params, stat: {"rec": stat(taps["o_proj_in"])},
    linears=("a_proj", "u_proj", "g_proj", "o_proj"),
    residual_in=("a_proj", "u_proj", "g_proj"), residual_out=("o_proj",),
    slice_hidden=lambda layer, k, config: slice_linear_hidden(layer, k, ("a_proj", "u_proj", "g_proj"),
                                                              ("o_proj",)),
    width=(families.WidthRule(("rec_width",), _rec_changes, _rec_slice,
                              lambda config: {"rec_width": families.Axis(config.recurrence.width, grid=(1.0, 0.5))}),),
))

# ------------------------------------------------------------------------------------------- the new family


@dataclasses.dataclass(frozen=True)
class ToyConfig(ModelConfig):
    KINDS: ClassVar[str] = "R-"
    MODEL_TYPE: ClassVar[str] = "toy_recurrent"
    recurrence: RecurrenceConfig | None = None

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": self.MODEL_TYPE, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "pattern": self.pattern, "recurrence_width": self.recurrence.width,
                "intermediate_size": self.intermediate_size, "norm_eps": self.norm_eps}

    @classmethod
    def from_hf(cls, d, **overrides):
        fields = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], pattern=d["pattern"],
                      recurrence=RecurrenceConfig(d["recurrence_width"]), intermediate_size=d["intermediate_size"],
                      norm_eps=d["norm_eps"])
        return cls(**{**fields, **overrides})


class ToyLM(nn.Module):
    """tokens [b, L] -> logits [b, L, vocab]: embed, Blocks of the pattern, RMSNorm, untied head."""

    config: Any

    def setup(self):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype)
        self.layers = [Block(cfg, kind) for kind in cfg.pattern]
        self.norm_f = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        self.lm_head = dense(cfg, cfg.vocab_size, ("embed", "vocab"), name=None)

    def hidden(self, tokens, segment_ids=None, skip_layer=None):
        h = self.embeddings(tokens)
        for i, layer in enumerate(self.layers):
            out, _ = layer(h, None, None, segment_ids)
            h = out if skip_layer is None else jnp.where(skip_layer == i, h, out)
        h = self.norm_f(h)
        self.sow("taps", "final_normed", h)
        return h

    def extend(self, tokens, states, step):
        h, new = self.embeddings(tokens), []
        for layer, state in zip(self.layers, states, strict=True):
            h, state = layer(h, state, step)
            new.append(state)
        return self.norm_f(h), tuple(new)

    def embed(self, tokens):
        return self.embeddings(tokens)

    def logits(self, hidden):
        return self.lm_head(hidden).astype(jnp.float32)


TOY = families.register_family(families.Family(
    model_type="toy_recurrent", config=ToyConfig, module=ToyLM,
    prefixes={"embeddings": "model.embed.", "norm_f": "model.norm.", "lm_head": "lm_head."},
    layer_prefixes={"layers": "model.layers."},
))

CONFIG = ToyConfig(vocab_size=64, hidden_size=32, pattern="R-R-", recurrence=RecurrenceConfig(24),
                   intermediate_size=48)


@pytest.fixture(scope="module")
def model():
    return nemojax.Model.init(CONFIG, 0)


def _tokens(b=2, L=12, seed=0):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (b, L)).astype(np.int32)


def _np_recurrence(x, p, h0):
    """numpy oracle of the R mixer on one sequence: x [T, D] -> (y [T, D], h_T)."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    a, u, g = sig(x @ p["a_proj"]["kernel"]), x @ p["u_proj"]["kernel"], x @ p["g_proj"]["kernel"]
    h, hs = h0, []
    for t in range(x.shape[0]):
        h = a[t] * h + (1 - a[t]) * u[t]
        hs.append(h)
    mixed = np.stack(hs) * (g * sig(g))
    return mixed @ p["o_proj"]["kernel"], h


def test_forward_matches_a_numpy_oracle(model):
    tokens = _tokens()
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), model.params)
    rms = lambda v, s: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + CONFIG.norm_eps) * s  # noqa: E731
    h = p["embeddings"]["embedding"][tokens]
    for i, kind in enumerate(CONFIG.pattern):
        layer = p[f"layers_{i}"]
        x = rms(h, layer["norm"]["scale"])
        if kind == "R":
            y = np.stack([_np_recurrence(row, layer["mixer"], np.zeros(24))[0] for row in x])
        else:
            mlp = layer["mixer"]
            y = np.square(np.maximum(x @ mlp["up_proj"]["kernel"], 0)) @ mlp["down_proj"]["kernel"]
        h = h + y
    want = rms(h, p["norm_f"]["scale"]) @ p["lm_head"]["kernel"]
    np.testing.assert_allclose(np.asarray(model(tokens)), want, rtol=2e-4, atol=2e-4)


def test_cached_generation_equals_the_uncached_forward(model):
    prompt = _tokens(b=1, L=5, seed=1)
    out = generate(model, prompt.tolist(), max_new_tokens=4, temperature=0.0)
    tokens = np.asarray(out.tokens if hasattr(out, "tokens") else out)
    full = prompt
    for _ in range(4):  # greedy by hand with the uncached forward
        full = np.concatenate([full, np.argmax(np.asarray(model(full))[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(tokens.reshape(-1)[-4:], full[0, -4:])
    cache = init_cache(CONFIG, 2, 8)
    assert cache.layers[0].shape == (2, 24) and cache.layers[1] is None
    plan = nemojax.infer.memory.cache_bytes(CONFIG, batch=2, context=8)
    assert plan.other == 2 * 2 * 24 * 4 and plan.kv == 0


def test_training_lowers_the_loss(model):
    batches = [{"tokens": t, "targets": np.roll(t, -1, 1), "loss_mask": np.ones(t.shape, np.float32)}
               for t in [_tokens(4, 16, seed=s) for s in range(2)]]
    optimizer = OptimizerConfig(lr=3e-3, total_steps=30, warmup_steps=1)
    trained, history = finetune(model, iter(batches * 15), 30, optimizer=optimizer, batch_size=4,
                                         seq_len=16)
    assert history[-1]["loss"] < history[0]["loss"] - 0.3
    assert isinstance(trained.config, ToyConfig)


def test_importance_and_pruning_through_the_kind(model):
    scores = compress.importance(model, [_tokens(2, 12)])
    assert scores["layers_0/rec"].shape == (24,) and scores["hidden"].shape == (32,)
    small = compress.prune(model, scores, hidden=16, rec_width=8)
    assert small.config.recurrence.width == 8 and small.config.hidden_size == 16
    assert small.params["layers_2"]["mixer"]["a_proj"]["kernel"].shape == (16, 8)
    assert np.isfinite(np.asarray(small(_tokens()))).all()
    with pytest.raises(ValueError, match="unknown target 'heads'|no attention layers"):
        compress.prune(model, scores, heads=2)
    with pytest.raises(ValueError, match=r"rec_width=30 is invalid: must be an integer in \[1, 24\]"):
        compress.prune(model, scores, rec_width=30)
    # the search grids the kind's own axis (its Axis.grid) without knowing the kind
    assert compress.default_grid(model)["rec_width"] == [24, 12]
    candidates = compress.enumerate_candidates(model, budget_params=model.num_params, slack=None)
    narrow = next(c for c in candidates if c.targets.get("rec_width") == 12)
    assert compress.prune(model, scores, **narrow.targets).num_params == narrow.params


def test_quantization_reaches_the_kinds_linears(model):
    q = quant.apply(model, "fp8")
    layers = quant.quantized_layers(q)
    assert {"layers_0/mixer/a_proj", "layers_0/mixer/o_proj", "layers_1/mixer/up_proj"} <= set(layers)
    assert np.abs(np.asarray(q(_tokens())) - np.asarray(model(_tokens()))).max() > 0  # it does quantize


def test_save_hf_load_hf_round_trip(model, tmp_path):
    hf.save_hf(model, tmp_path / "toy")
    written = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert written["model_type"] == "toy_recurrent" and written["torch_dtype"] == "float32"  # added by save_hf
    names = set(hf.state_dict_from_params(model.config, model.params))
    assert "model.layers.0.mixer.a_proj.weight" in names and "model.embed.weight" in names
    back = nemojax.load_hf(tmp_path / "toy")
    assert isinstance(back.config, ToyConfig)
    np.testing.assert_array_equal(np.asarray(back(_tokens())), np.asarray(model(_tokens())))


def test_unknown_kind_and_model_type_name_the_known_ones():
    with pytest.raises(ValueError, match=r"layer kind 'Q' is unknown.*'M' \(mamba\).*'R' \(recurrence\)"):
        families.kind("Q")
    with pytest.raises(ValueError, match=r"model_type='llama' is unknown.*known model types are.*'nemotron_h'"):
        hf.config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match=r"pattern.*'R' \(recurrence\), '-' \(mlp\)"):
        ToyConfig(vocab_size=8, hidden_size=8, pattern="R*", recurrence=RecurrenceConfig(4), intermediate_size=8)
