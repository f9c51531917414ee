"""Activation-based importance of every prunable axis and every layer (Minitron, arXiv 2407.14679; Minitron-SSM,
arXiv 2504.11409). The taps and the default reduction are those of ModelOpt's Minitron plugin ("ModelOpt" below:
NVIDIA/Model-Optimizer@a2fbac7:modelopt/torch/prune/plugins/mcore_minitron.py).

`importance(model, batches)` runs the model forward on calibration batches, reads the activations the blocks and
mixers sow into the forward's "taps" collection (`Model.apply(collect=("taps", "blocks"))`; each layer kind
says what its taps mean), reduces each tap to one statistic per batch row and
channel inside `jit`, and keeps only running sums on the host, so no activation outlives its batch.

Aggregation `agg = "{seq}_{batch}"`, seq and batch each one of mean, l2, var (the grid of the Minitron paper's
Table 11). For an activation a[b, s, c] of one batch:

    seq   mean: r[b, c] = mean_s |a[b, s, c]|                (ModelOpt: the mean of |.|)
          l2:   r[b, c] = sqrt(sum_s a[b, s, c]^2)
          var:  r[b, c] = mean_s (a - mean_s a)^2             (population variance of the signed values)

Across every batch row of every batch the host keeps S1[c] = sum r, S2[c] = sum r^2 and the row count n:

    batch mean: S1 / n          l2: sqrt(S2)          var: S2 / n - (S1 / n)^2     (population variance)

so "mean_l2" (the default, the paper's and ModelOpt's recipe) is exactly
`sqrt(sum over all calibration rows of (mean_s|a|)^2)`,
and two batches give the same scores as one batch holding both.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import families
from nemojax.compress.scores import Scores
from nemojax.config import ModelConfig
from nemojax.data.batch_tokens import batch_tokens
from nemojax.model import Model, apply

f32 = jnp.float32

SEQ_AGGS = ("mean", "l2", "var")
BATCH_AGGS = ("mean", "l2", "var")
AGGS = tuple(f"{s}_{b}" for s in SEQ_AGGS for b in BATCH_AGGS)
LAYER_METRICS = ("block", "lm_loss", "logits_mse")


def _parse_agg(agg: str) -> tuple[str, str]:
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r} is invalid: must be one of {', '.join(AGGS)} "
                         "(reduction over the sequence, then over batch rows)")
    seq, batch = agg.split("_")
    return seq, batch


def seq_stat(a: jax.Array, mask: jax.Array | None, kind: str) -> jax.Array:
    """Per-row statistic over the sequence. a: [b, L, C], mask: [b, L] (1 = token counts) or None -> [b, C] f32.

    With a mask only the masked tokens count (mean and var divide by their number; a row with none gives 0).
    """
    a = a.astype(f32)
    m = jnp.ones(a.shape[:2], f32) if mask is None else mask.astype(f32)
    m = m[..., None]
    n = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [b, 1]
    if kind == "mean":
        return jnp.sum(m * jnp.abs(a), axis=1) / n
    if kind == "l2":
        return jnp.sqrt(jnp.sum(m * jnp.square(a), axis=1))
    if kind == "var":
        mu = jnp.sum(m * a, axis=1, keepdims=True) / n[:, None]
        return jnp.sum(m * jnp.square(a - mu), axis=1) / n
    raise ValueError(f"seq reduction {kind!r} is invalid: must be one of {', '.join(SEQ_AGGS)}")


def batch_stat(s1: np.ndarray, s2: np.ndarray, n: int, kind: str) -> np.ndarray:
    """Final reduction over the n batch rows from S1 = sum r and S2 = sum r^2 (float64 on the host)."""
    if kind == "mean":
        return s1 / n
    if kind == "l2":
        return np.sqrt(s2)
    if kind == "var":
        return np.maximum(s2 / n - np.square(s1 / n), 0.0)
    raise ValueError(f"batch reduction {kind!r} is invalid: must be one of {', '.join(BATCH_AGGS)}")


def one_minus_cos(h_in: jax.Array, h_out: jax.Array) -> jax.Array:
    """1 - cos(h_in, h_out) per token, as ||u - v||^2 / 2 of the unit vectors (exactly 0 when h_out == h_in).

    h_in, h_out: [..., hidden] -> [...] float32.
    """
    def unit(v):
        v = v.astype(f32)
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)

    d = 0.5 * jnp.sum(jnp.square(unit(h_in) - unit(h_out)), axis=-1)
    # XLA may fuse the two normalisations differently; an unchanged token is exactly 0 regardless
    return jnp.where(jnp.all(h_in == h_out, axis=-1), 0.0, d)


def _first(sown):
    """A sown value: flax keeps each `sow` as a tuple of the values sown."""
    return sown[0] if isinstance(sown, tuple) else sown


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_taps(config: ModelConfig, seq_kind: str, params: dict, tokens: jax.Array) -> dict[str, jax.Array]:
    """One forward; returns per-row statistics [b, ...] of every tap plus the per-layer BI sums.

    The taps are what the blocks and mixers sow into the "taps" collection (`Model.apply(collect=...)`); each
    kind turns its own into named statistics (`LayerKind.importance`)."""
    b = tokens.shape[0]
    out = apply(config, params, tokens, collect=("taps", "blocks"), logits=False)
    sown, blocks = out.collected["taps"], out.collected["blocks"]
    stat = lambda a, mask=None: seq_stat(a, mask, seq_kind)  # noqa: E731
    taps = {"norm_f": stat(_first(sown["final_normed"]))}
    bi = []
    for i, char in enumerate(config.pattern):
        name = f"layers_{i}"
        layer_taps = jax.tree.map(_first, sown[name], is_leaf=lambda x: isinstance(x, tuple))
        taps[f"{name}/norm"] = stat(layer_taps["normed"])
        entry = families.kind(char)
        if entry.importance is not None:
            mixer_taps = {**layer_taps.get("mixer", {}), "batch": b}
            for key, value in entry.importance(config.layer(i), mixer_taps, params[name]["mixer"], stat).items():
                taps[f"{name}/{key}"] = value
        bi.append(jnp.sum(one_minus_cos(_first(blocks[name]["in"]), _first(blocks[name]["out"]))))
    taps["layer/bi_sum"] = jnp.stack(bi)
    return taps


@functools.partial(jax.jit, static_argnums=0)
def _skip_logits(config: ModelConfig, params: dict, tokens: jax.Array, skip: jax.Array) -> jax.Array:
    """Logits [b, L, vocab] f32 with layer `skip` (a traced int; -1 = none) dropped: its block returns its input,
    i.e. its residual contribution (the mixer output) is zero. One compilation serves every layer."""
    return apply(config, params, tokens, skip_layer=skip).logits


@jax.jit
def _lm_terms(logits: jax.Array, ref_logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross entropy of `logits`, summed squared error of logits vs ref_logits)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(f32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.sum(nll), jnp.sum(jnp.square(logits.astype(f32) - ref_logits.astype(f32)))


@functools.partial(jax.jit, static_argnums=0)
def _skip_terms(config: ModelConfig, params: dict, tokens: jax.Array, skip: jax.Array,
                ref_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_lm_terms` of the logits with layer `skip` dropped, in one program: only two scalars leave it, so the
    [b, L, vocab] logits of the dropped-layer forward are never handed back to the host loop."""
    return _lm_terms(_skip_logits(config, params, tokens, skip), ref_logits, tokens)


class _Acc:
    """Host-side float64 sums S1 = sum r, S2 = sum r^2 over batch rows (axis 0 of each update)."""

    def __init__(self) -> None:
        self.s1: np.ndarray | float = 0.0
        self.s2: np.ndarray | float = 0.0
        self.n = 0

    def add(self, r: np.ndarray) -> None:
        r = np.asarray(r, np.float64)
        self.s1 = self.s1 + r.sum(axis=0)
        self.s2 = self.s2 + np.square(r).sum(axis=0)
        self.n += r.shape[0]

    def finish(self, kind: str) -> np.ndarray:
        return batch_stat(np.asarray(self.s1), np.asarray(self.s2), self.n, kind)


def importance(model: Model, batches: Iterable, *, agg: str = "mean_l2",
               layer_metrics: Sequence[str] = ("block",), include_final_norm: bool = False) -> Scores:
    """Importance scores of `model` from calibration `batches`: each the data pipeline's dict (its "tokens" are
    read) or [b, L] int tokens; L >= 2 for lm_loss.

    Forward only; each batch is reduced to per-row statistics inside `jit` and summed on the host (see the
    module docstring for `agg`). Returns `Scores` (float32 numpy) with, for layer i of kind:

    * `hidden` [hidden]: sum over the block pre-norms (`layers_i/norm`, every kind) of their aggregated outputs
      (ModelOpt "hidden_size": per-module scores summed). The final `norm_f` is added only with
      `include_final_norm=True` (ModelOpt does not use it).
    * `*`: `layers_i/heads` [n_h] = L2 over head_dim of the per-channel scores of the o_proj input
      (ModelOpt "heads": sqrt(sum_d Acc[h, d]) for mean_l2).
    * `-`: `layers_i/mlp` [F], per-channel scores of the down_proj input relu(x W_up)^2 (ModelOpt "FFN").
    * `M`: `layers_i/mamba_x` [H, P] per-channel scores of the in_proj x output (before the conv;
      arXiv 2504.11409, Table 2 picks W_x); `layers_i/mamba_channels` [P] = L2 over heads;
      `layers_i/mamba_heads` [H] = L2 over all P channels (Minitron-SSM scores heads on the kept channels only:
      recompute it from `mamba_x` once they are chosen; heads are ranked within their group of H / G by the pruner).
    * `E`: `layers_i/experts` [E] = sum over routed tokens of ||expert output||_2 / (routed count + 1e-8), over
      all batches (ModelOpt; the expert output is before the routing weight and independent of agg);
      `layers_i/expert_ffn` [E, F] per-channel scores of each expert's down_proj input, the sequence reduction
      taken over the tokens routed to that expert only (a row with none gives 0);
      `layers_i/shared_mlp` [F_shared] as `mlp` for the shared expert, if any.
    * `layer/block` [num_layers] = 1 - cos(block input, block output), averaged over every token of every batch
      (block importance, arXiv 2408.11796; h_out includes the residual; higher = more important). Requested by
      "block" in layer_metrics.
    * `layer/lm_loss` [num_layers]: mean next-token cross entropy with layer i dropped (its block returns its
      input, i.e. its residual contribution is zero), over all predicted tokens of all batches (arXiv 2408.11796).
    * `layer/logits_mse` [num_layers]: sum ||logits_drop_i - logits||^2 / sum ||logits||^2 over all batches
      (normalised MSE: Nemotron Elastic, arXiv 2511.16664; MiniPuzzle, arXiv 2504.03624).

    MTP layers are not scored (the main forward does not run them).
    """
    seq_kind, batch_kind = _parse_agg(agg)
    metrics = tuple(layer_metrics)
    bad = [m for m in metrics if m not in LAYER_METRICS]
    if bad:
        raise ValueError(f"layer_metrics={metrics!r} is invalid: entries must be among {', '.join(LAYER_METRICS)}")
    config = model.config
    if config.runtime.remat != "none":
        config = config.replace(runtime={"remat": "none"})  # forward only; keeps module paths plain
    params = model.params
    want_lm = "lm_loss" in metrics or "logits_mse" in metrics
    L_layers = config.num_layers

    accs: dict[str, _Acc] = {}
    bi_sum = np.zeros(L_layers, np.float64)
    summed = {f"layers_{i}/{name}" for i, char in enumerate(config.pattern) for name in families.kind(char).summed}
    sums: dict[str, np.ndarray] = {}
    n_tokens = 0
    ce = np.zeros(L_layers, np.float64)
    sq = np.zeros(L_layers, np.float64)
    ref_sq = 0.0
    n_pred = 0
    n_batches = 0

    for batch in batches:
        tokens = jnp.asarray(batch_tokens(batch, "importance"))  # a pipeline dict batch or [b, L] tokens
        if want_lm and tokens.shape[1] < 2:
            raise ValueError(f"batch seq length {tokens.shape[1]} is invalid for lm_loss/logits_mse: must be >= 2")
        n_batches += 1
        taps = jax.device_get(_batch_taps(config, seq_kind, params, tokens))
        for key, value in taps.items():
            if key == "layer/bi_sum":
                bi_sum += value
            elif key in summed:
                sums[key] = sums.get(key, 0.0) + np.asarray(value, np.float64)
            else:
                accs.setdefault(key, _Acc()).add(value)
        b, L = tokens.shape
        n_tokens += b * L
        if want_lm:
            ref = _skip_logits(config, params, tokens, jnp.asarray(-1, jnp.int32))
            # dispatch every layer's forward before reading any result back: one host sync per batch
            terms = [_skip_terms(config, params, tokens, jnp.asarray(i, jnp.int32), ref) for i in range(L_layers)]
            ref_sq_b, terms = jax.device_get((jnp.sum(jnp.square(ref)), terms))
            ref_sq += float(ref_sq_b)
            n_pred += b * (L - 1)
            for i, (c, s) in enumerate(terms):
                ce[i] += float(c)
                sq[i] += float(s)
    if n_batches == 0:
        raise ValueError("batches is empty: importance needs at least one calibration batch")

    final = {key: acc.finish(batch_kind) for key, acc in accs.items()}
    out: dict[str, np.ndarray] = {}
    hidden = sum(final[f"layers_{i}/norm"] for i in range(L_layers))
    if include_final_norm:
        hidden = hidden + final["norm_f"]
    out["hidden"] = hidden
    stats = {**final, **sums}
    for i, char in enumerate(config.pattern):
        name = f"layers_{i}"
        entry = families.kind(char)
        mine = {key[len(name) + 1:]: value for key, value in stats.items()
                if key.startswith(f"{name}/") and key != f"{name}/norm"}
        out.update({f"{name}/{key}": value for key, value in (entry.scores(config.layer(i), mine) if entry.scores
                                                                else mine).items()})
    if "block" in metrics:
        out["layer/block"] = bi_sum / n_tokens
    if "lm_loss" in metrics:
        out["layer/lm_loss"] = ce / n_pred
    if "logits_mse" in metrics:
        out["layer/logits_mse"] = sq / ref_sq
    return Scores(out)
