"""NemotronH: the hybrid pattern stack (arXiv 2504.03624; one pre-norm, one mixer, one residual per layer).

    h = embeddings[tokens]
    for each pattern character: h = h + mixer(RMSNorm(h))
    logits = lm_head(norm_f(h))           (untied, float32)

plus the optional MTP head, which reads the final hidden state and the next token's embedding.

With `config.runtime.scan_layers` the pattern's repeated runs of layers (nested where the pattern repeats at two scales)
run as scans (`nemojax.models.scan`): layers outside every run stay unrolled (`layers_{i}`), a run's params are
stacked under `layers_scan_{i}`. Decoding with caches (`extend`) uses the unrolled layout only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.models import scan
from nemojax.nn.blocks import Block
from nemojax.nn.linear import dense, dtypes
from nemojax.nn.live import keep
from nemojax.nn.mtp import MTP
from nemojax.nn.norms import RMSNorm
from nemojax.nn.state import Extend


def block_class(config: ModelConfig, in_scan: bool = False) -> type[nn.Module]:
    """Block, rematerialised per `config.runtime.remat` (inside a scan the loop already keeps XLA from merging the
    recompute into the forward, so prevent_cse is off there, as flax recommends)."""
    if config.runtime.remat == "none":
        return Block
    policy = None if config.runtime.remat == "full" else getattr(jax.checkpoint_policies, config.runtime.remat)
    return nn.remat(Block, policy=policy, prevent_cse=not in_scan)


class Segments(nn.Module):
    """One scan step: a run's body in order (layers `slot_{j}`, nested runs `scan_{j}`), h: [b, L, hidden] ->
    (h, None)."""

    config: ModelConfig
    body: tuple

    @nn.compact
    def __call__(self, h: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, None]:
        block = block_class(self.config, in_scan=True)
        position = 0
        for segment in self.body:
            name = scan.inner_name(segment, position)
            if isinstance(segment, str):
                h, _ = block(self.config, segment, name=name)(h, None, None, segment_ids)
            else:
                h, _ = scanned_run(self.config, segment, nested=True, name=name)(h, segment_ids)
            position += len(scan.pattern_of(segment))
        return h, None


def scanned_run(config: ModelConfig, run: scan.Run, nested: bool = False, name: str | None = None) -> nn.Module:
    """`run.repeats` scan steps of its body: every variable collection (params, sown router statistics, quant
    calibration) stacked on a leading axis, logically `layers` for a top-level run and unnamed (None: replicated
    too; flax refuses a logical name twice in one array) for a run nested in another; segment ids broadcast."""
    return nn.scan(Segments, variable_axes={True: 0}, split_rngs={"params": True, "quant": True},
                   in_axes=(nn.broadcast,), length=run.repeats,
                   metadata_params={nn.PARTITION_NAME: None if nested else "layers"})(config, run.body, name=name)


def _starts(segments: tuple) -> list[tuple[int, scan.Segment]]:
    """(first layer index, segment) of each top-level segment of a plan."""
    out, position = [], 0
    for segment in segments:
        out.append((position, segment))
        position += len(scan.pattern_of(segment))
    return out


def _skip_flags(skip_layer: jax.Array | None, num_layers: int) -> jax.Array | None:
    """[num_layers] bool (True = the block passes its input through) from a layer index (-1: none) or a mask."""
    if skip_layer is None:
        return None
    skip_layer = jnp.asarray(skip_layer)
    if skip_layer.ndim == 0:
        return jnp.arange(num_layers) == skip_layer
    if skip_layer.shape != (num_layers,):
        raise ValueError(f"skip_layer has shape {list(skip_layer.shape)}: must be a layer index (a scalar) or a "
                         f"[num_layers={num_layers}] bool mask")
    return skip_layer.astype(bool)


class NemotronH(nn.Module):
    """tokens: [b, L] int -> logits: [b, L, vocab] float32."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        self.embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                        ("vocab", "embed")))
        block = block_class(cfg)
        if cfg.runtime.scan_layers:
            starts = _starts(scan.plan(cfg.pattern))
            # dict attributes name their modules layers_{i} and layers_scan_{i}
            self.layers = {i: block(cfg, seg) for i, seg in starts if isinstance(seg, str)}
            self.layers_scan = {i: scanned_run(cfg, seg) for i, seg in starts if not isinstance(seg, str)}
        else:
            self.layers = [block(cfg.layer(i), kind) for i, kind in enumerate(cfg.pattern)]  # per-layer widths
        self.norm_f = RMSNorm(cfg.norm_eps, dtype, param_dtype)
        self.lm_head = dense(cfg, cfg.vocab_size, ("embed", "vocab"), name=None)
        if cfg.mtp is not None:
            self.mtp = MTP(cfg)

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               skip_layer: jax.Array | None = None) -> jax.Array:
        """tokens: [b, L] -> final normed hidden states [b, L, hidden] (compute dtype).

        segment_ids: [b, L] int, the packed documents of each row (contiguous runs of one id, as
        `nemojax.data.packing` makes them): Mamba state, convolution and attention then stay within each document,
        so every document is computed as if it were alone in its row. None: one sequence per row.
        skip_layer: a (traced) int32 scalar: that layer's block passes its input through (layer ablation; -1
        none); or a (traced) [num_layers] bool mask: every layer marked True passes its input through (iterative
        depth ranking). Unrolled layout only.

        The "blocks" collection gets each block's input and output (`layers_{i}/in`, `layers_{i}/out`) when the
        caller makes it mutable (`Model.apply(collect=("blocks",))`).
        """
        h = nn.with_logical_constraint(self.embed(tokens), ("batch", "seq", "act_embed"))
        if not self.config.runtime.scan_layers:
            skipped = _skip_flags(skip_layer, len(self.layers))
            for i, layer in enumerate(self.layers):
                out, _ = layer(h, None, None, segment_ids)
                h = out if skipped is None else jnp.where(skipped[i], h, out)
            return self._final_norm(h)
        if skip_layer is not None:
            raise ValueError("skip_layer runs on the unrolled layout (runtime.scan_layers=False)")
        for i, segment in _starts(scan.plan(self.config.pattern)):
            if isinstance(segment, str):
                h, _ = self.layers[i](h, None, None, segment_ids)
            else:
                h, _ = self.layers_scan[i](h, segment_ids)
        return self._final_norm(h)

    def _final_norm(self, h: jax.Array) -> jax.Array:
        h = self.norm_f(h)
        self.sow("taps", "final_normed", h)  # activation importance of the hidden channels
        return h

    def extend(self, tokens: jax.Array, states: tuple, step: Extend) -> tuple[jax.Array, tuple]:
        """Continues every layer from its cached state (see `nemojax.nn.state`).

        tokens: [b, T] at positions step.start[i] + t; states: one entry per pattern character (None for MLP /
        MoE) -> (final normed hidden [b, T, hidden], new states).
        """
        if self.config.runtime.scan_layers:
            raise ValueError("runtime.scan_layers=True is a training layout; decoding with caches runs the unrolled "
                             "one: convert with nemojax.models.scan.to_unrolled and "
                             "config.replace(runtime={'scan_layers': False})")
        h = self.embed(tokens)
        new_states = []
        for layer, state in zip(self.layers, states, strict=True):
            h, state = layer(h, state, step)
            new_states.append(state)
        return self.norm_f(h), tuple(new_states)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: [b, T] -> [b, T, hidden] (compute dtype); a masked (elastic) forward zeroes the dead hidden
        channels (`nemojax.nn.live`)."""
        return keep(self, "hidden", self.embeddings(tokens))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [b, L, hidden] -> [b, L, vocab] float32. (A masked forward's `head` entry carries the hidden
        axis's router multiplier; the dead channels of `hidden` are zero already.)"""
        return self.lm_head(keep(self, "head", hidden)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens: [b, L] (segment_ids: [b, L], see `hidden`) -> logits [b, L, vocab] float32."""
        return self.logits(self.hidden(tokens, segment_ids))

    def mtp_logits(self, hidden: jax.Array, tokens: jax.Array,
                   segment_ids: jax.Array | None = None) -> list[jax.Array]:
        """MTP predictions from the main model's final hidden states.

        hidden: [b, L, hidden] at positions t, tokens: [b, L + D] with D = mtp depths. Depth d at position t sees
        the embedding of tokens[:, t + d + 1] and predicts token t + d + 2. Returns D arrays [b, L, vocab] float32.
        segment_ids: [b, L] of the positions t (packed documents, see `hidden`).
        """
        depths, L = self.config.mtp.num_layers, hidden.shape[1]
        if tokens.shape[1] != L + depths:
            raise ValueError(f"tokens has length {tokens.shape[1]}, expected hidden length {L} + {depths} MTP depths")
        next_embedded = [self.embeddings(tokens[:, d + 1:d + 1 + L]) for d in range(depths)]
        return [self.logits(h) for h in self.mtp(hidden, next_embedded, segment_ids)]

    def forward_with_mtp(self, tokens: jax.Array,
                         segment_ids: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """tokens: [b, L] -> (logits [b, L, vocab], MTP logits [b, L - D, vocab] per depth d)."""
        h = self.hidden(tokens, segment_ids)
        L = tokens.shape[1] - self.config.mtp.num_layers
        return self.logits(h), self.mtp_logits(h[:, :L], tokens, None if segment_ids is None else segment_ids[:, :L])

