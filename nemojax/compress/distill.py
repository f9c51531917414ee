"""Knowledge distillation of a student Model from a teacher Model on the shared trainer (Minitron, arXiv 2407.14679).

The losses follow ModelOpt's distillation plugin ("ModelOpt" below: NVIDIA/Model-Optimizer@a2fbac7:
modelopt/torch/distill/plugins/megatron.py, and modelopt/torch/distill/losses.py for the Hinton loss).

    small, history = distill(small, teacher=model, data=DataConfig(...), steps=1000)
    teacher = teacher_correction(model, data=DataConfig(...), steps=200)     # arXiv 2408.11796, before distill

The loss is an ordinary `LossFn` (see `nemojax.train.step`) over params {"student": ..., "maps": ...}; the teacher
runs inside it under `stop_gradient`. With logits s, t [B, L, V], loss mask m [B, L] and N = sum m:

    logit KL (ModelOpt `LogitsKLLoss`, forward KL, the teacher is the target):
        p_t = softmax(t / T), log p_s = log_softmax(s / T)
        kl[b, l] = sum_v p_t (log p_t - log p_s)
        KL = c_T * sum_{b,l} m kl / N,   c_T = T^2 (Hinton's scaling, ModelOpt `LogitsDistillationLoss`)
             or 1 with `scale_by_temperature=False` (Megatron's `LogitsKLLoss` has no T^2)
    top-K KL (ModelOpt `TopKLogitsKLLoss`, top_k = K > 0): K_ids = the teacher's top-K vocabulary ids per token;
        both logits are gathered at K_ids and the log-softmax is renormalised over those K entries, then the KL
        above (same T and c_T).
    LM (lm_weight; arXiv 2408.11796 uses 0, logit-only KD):
        CE = sum m * (-log softmax(s)[target]) / N       (`nemojax.train.losses.cross_entropy`)
    intermediate (ModelOpt's hidden-state losses) for each pair (i, j) of `intermediate`, with h_s = output of
        student block i [B, L, H_s] and h_t = output of teacher block j [B, L, H_t] (the residual stream after the
        block), Proj(x) = x W + b ONE learned Linear(H_s -> H_t) shared by all pairs, the identity when
        H_s == H_t (as in ModelOpt):
        cosine: per token 1 - cos(Proj(h_s), h_t);   mse: per token mean_f (Proj(h_s) - h_t)^2
        each reduced as sum m * . / N; I = mean over the pairs.
    total = kl_weight * KL + lm_weight * CE + intermediate_weight * I        (a static balancer; Puzzle's GKD,
        arXiv 2411.19146, is kl_weight = intermediate_weight = 1 with cosine)

Metrics: "kl", "lm_nll", "intermediate" (+ "intermediate_{i}_{j}" per pair) and "total"; the trainer adds "loss"
and "grad_norm".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import data as data_lib
from nemojax.config import ModelConfig
from nemojax.model import Model, apply
from nemojax.train import moe_balance, sharding
from nemojax.train.checkpoint import config_fingerprint
from nemojax.train.fit import fit
from nemojax.train.losses import cross_entropy
from nemojax.train.optim import OptimizerConfig, make_optimizer
from nemojax.train.step import LossAux, LossFn, lm_loss

Params = dict[str, Any]
Batch = dict[str, jax.Array]
f32 = jnp.float32

INTERMEDIATE_LOSSES = ("cosine", "mse")
# LR 1e-4 -> 1e-5, cosine, short warmup: ModelOpt's recommended recipe (examples/pruning/README.md), scaled down.
DEFAULT_OPTIMIZER = OptimizerConfig(lr=1e-4, total_steps=1000, warmup_steps=50, schedule="cosine",
                                    min_lr_ratio=0.1)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knobs of `distillation_loss` and `distill` (ModelOpt's Megatron `DistillationConfig`).

    kl_weight: weight of the logit KL (>= 0). temperature: T > 0. scale_by_temperature: multiply the KL by T^2
    (Hinton) or not (Megatron). top_k: 0 for the full-vocabulary KL, K > 0 for the KL over the teacher's top-K
    ids (Megatron's default when enabled is 1024). lm_weight: weight of the student's LM cross entropy (>= 0).
    intermediate: (student_block, teacher_block) index pairs; intermediate_loss: "cosine" or "mse";
    intermediate_weight: its weight (>= 0). steps, batch_size, seq_len, seed: the training run (`distill`);
    optimizer: AdamW settings (its total_steps is replaced by the run's steps).
    """

    kl_weight: float = 1.0
    temperature: float = 1.0
    scale_by_temperature: bool = True
    top_k: int = 0
    lm_weight: float = 0.0
    intermediate: tuple[tuple[int, int], ...] = ()
    intermediate_loss: str = "cosine"
    intermediate_weight: float = 1.0
    steps: int = 100
    optimizer: OptimizerConfig = DEFAULT_OPTIMIZER
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("kl_weight", "lm_weight", "intermediate_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DistillConfig.{name}={value!r} is invalid: must be a finite number >= 0")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"DistillConfig.temperature={self.temperature!r} is invalid: must be a finite "
                             "number > 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"DistillConfig.top_k={self.top_k!r} is invalid: must be 0 (full vocabulary) or a "
                             "positive number of teacher logits")
        if self.intermediate_loss not in INTERMEDIATE_LOSSES:
            raise ValueError(f"DistillConfig.intermediate_loss={self.intermediate_loss!r} is invalid: must be one "
                             f"of {INTERMEDIATE_LOSSES}")
        pairs = tuple(tuple(p) for p in self.intermediate)
        for p in pairs:
            if len(p) != 2 or not all(isinstance(i, int) and i >= 0 for i in p):
                raise ValueError(f"DistillConfig.intermediate={self.intermediate!r} is invalid: each entry must be "
                                 "a (student_layer, teacher_layer) pair of non-negative block indices")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"DistillConfig.intermediate={self.intermediate!r} is invalid: repeated pair")
        object.__setattr__(self, "intermediate", pairs)
        if self.kl_weight == 0 and self.lm_weight == 0 and (not pairs or self.intermediate_weight == 0):
            raise ValueError("DistillConfig has no loss: kl_weight, lm_weight and intermediate_weight (with "
                             "intermediate pairs) are all 0")
        for name in ("steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DistillConfig.{name}={value!r} is invalid: must be a positive integer")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"DistillConfig.optimizer={self.optimizer!r} is invalid: must be an OptimizerConfig")


# ----------------------------------------------------------------------------------------------- loss terms


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x, mask: [B, L] -> sum(mask * x) / max(sum(mask), 1)."""
    mask = mask.astype(f32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kl_per_token(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                 top_k: int = 0) -> jax.Array:
    """Forward KL(p_t || p_s) per token (ModelOpt `LogitsKLLoss`), without the T^2 factor.

    student_logits, teacher_logits: [B, L, V] -> [B, L] float32. top_k > 0: both logits restricted to the
    teacher's top-K ids and the log-softmax renormalised over those K.
    """
    s = student_logits.astype(f32) / temperature
    t = jax.lax.stop_gradient(teacher_logits.astype(f32)) / temperature
    if top_k:
        if top_k > t.shape[-1]:
            raise ValueError(f"DistillConfig.top_k={top_k} is invalid: exceeds the vocabulary size {t.shape[-1]}")
        t, ids = jax.lax.top_k(t, top_k)  # [B, L, K]
        s = jnp.take_along_axis(s, ids, axis=-1)
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    return jnp.einsum("blv,blv->bl", jnp.exp(log_pt), log_pt - log_ps)


def kd_logits(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, temperature: float = 1.0,
              top_k: int = 0, scale_by_temperature: bool = True) -> jax.Array:
    """Masked mean of `kl_per_token` over tokens, times T^2 if `scale_by_temperature`. mask: [B, L] -> scalar."""
    kl = _masked_mean(kl_per_token(student_logits, teacher_logits, temperature, top_k), mask)
    return kl * temperature ** 2 if scale_by_temperature else kl


def project(maps: Params, h: jax.Array) -> jax.Array:
    """The shared student -> teacher map: h [B, L, H_s] -> h W + b [B, L, H_t]; identity when `maps` is empty."""
    if not maps:
        return h.astype(f32)
    return jnp.einsum("blh,hk->blk", h.astype(f32), maps["kernel"].astype(f32)) + maps["bias"].astype(f32)


def kd_hidden(h_student: jax.Array, h_teacher: jax.Array, mask: jax.Array, kind: str = "cosine") -> jax.Array:
    """Hidden-state loss of an already projected student state (as ModelOpt). h_*: [B, L, H_t], mask: [B, L].

    cosine: masked mean of 1 - cos(h_s, h_t) per token; mse: masked mean of mean_f (h_s - h_t)^2.
    """
    s = h_student.astype(f32)
    t = jax.lax.stop_gradient(h_teacher.astype(f32))
    if kind == "cosine":
        eps = 1e-8
        dot = jnp.einsum("blh,blh->bl", s, t)
        norms = jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), eps)
        per_token = 1.0 - dot / norms
    elif kind == "mse":
        per_token = jnp.mean(jnp.square(s - t), axis=-1)
    else:
        raise ValueError(f"intermediate loss {kind!r} is invalid: must be one of {INTERMEDIATE_LOSSES}")
    return _masked_mean(per_token, mask)


def init_maps(student_config: ModelConfig, teacher_config: ModelConfig, dcfg: DistillConfig) -> Params:
    """The learned map's params: {} without intermediate pairs or when the hidden sizes match (identity, as ModelOpt),
    else {"kernel": [H_s, H_t], "bias": [H_t]} float32, initialised to the truncated identity eye(H_s, H_t) and 0
    (a width-pruned student's hidden channels start as a subset of the teacher's)."""
    H_s, H_t = student_config.hidden_size, teacher_config.hidden_size
    if not dcfg.intermediate or H_s == H_t:
        return {}
    return {"kernel": jnp.eye(H_s, H_t, dtype=f32), "bias": jnp.zeros((H_t,), f32)}


def _forward_with_blocks(config: ModelConfig, params: Params, tokens: jax.Array, layers: set[int],
                         rng: jax.Array | None = None) -> tuple[jax.Array, dict[int, jax.Array], Any]:
    """Logits [B, L, V] float32, {i: output of block i [B, L, H]} for i in `layers`, and the sown intermediates
    (MoE router statistics), from the forward's "blocks" and "intermediates" collections. `rng` feeds the
    "quant" stream (stochastic rounding of a quantized-training recipe)."""
    collect = ("intermediates", "blocks") if layers else ("intermediates",)
    out = apply(config, params, tokens, collect=collect, rngs=None if rng is None else {"quant": rng})
    blocks = out.collected.get("blocks", {})
    hidden = {i: blocks[f"layers_{i}"]["out"][0] for i in layers}
    return out.logits, hidden, out.collected["intermediates"]


def _check_pair(student_config: ModelConfig, teacher_config: ModelConfig, dcfg: DistillConfig | None) -> None:
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ValueError(f"student vocab_size={student_config.vocab_size} differs from the teacher's "
                         f"vocab_size={teacher_config.vocab_size}: distillation needs a shared vocabulary")
    if dcfg is None:
        return
    if dcfg.top_k > teacher_config.vocab_size:
        raise ValueError(f"DistillConfig.top_k={dcfg.top_k} is invalid: exceeds vocab_size="
                         f"{teacher_config.vocab_size}")
    for i, j in dcfg.intermediate:
        if i >= student_config.num_layers or j >= teacher_config.num_layers:
            raise ValueError(f"DistillConfig.intermediate pair ({i}, {j}) is invalid: the student has "
                             f"{student_config.num_layers} blocks and the teacher {teacher_config.num_layers}")


def distillation_loss(student_config: ModelConfig, teacher_config: ModelConfig, teacher_params: Params,
                      dcfg: DistillConfig = DistillConfig()) -> LossFn:
    """The distillation `LossFn` over params {"student": student params, "maps": `init_maps(...)`}.

    batch: {"tokens", "targets", "loss_mask"} [B, L]. The teacher's forward runs inside (stop_gradient). See the
    module docstring for the exact terms. Metrics: kl, lm_nll, intermediate (+ per pair), total.
    """
    _check_pair(student_config, teacher_config, dcfg)
    s_layers = {i for i, _ in dcfg.intermediate}
    t_layers = {j for _, j in dcfg.intermediate}
    with_inter = bool(dcfg.intermediate) and dcfg.intermediate_weight > 0

    def loss_fn(params: Params, batch: Batch, rng: jax.Array) -> tuple[jax.Array, LossAux]:
        tokens, mask = batch["tokens"], batch["loss_mask"]
        t_logits, t_hidden, _ = _forward_with_blocks(teacher_config, jax.lax.stop_gradient(teacher_params), tokens,
                                                     t_layers if with_inter else set())
        s_logits, s_hidden, inter = _forward_with_blocks(student_config, params["student"], tokens,
                                                         s_layers if with_inter else set(), rng)
        t_logits = jax.lax.stop_gradient(t_logits)
        kl = kd_logits(s_logits, t_logits, mask, dcfg.temperature, dcfg.top_k, dcfg.scale_by_temperature)
        lm_nll = cross_entropy(s_logits, batch["targets"], mask)[0]
        total = dcfg.kl_weight * kl + dcfg.lm_weight * lm_nll
        metrics = {"kl": kl, "lm_nll": lm_nll}
        if with_inter:
            terms = []
            for i, j in dcfg.intermediate:
                term = kd_hidden(project(params["maps"], s_hidden[i]), t_hidden[j], mask, dcfg.intermediate_loss)
                metrics[f"intermediate_{i}_{j}"] = term
                terms.append(term)
            inter_loss = jnp.mean(jnp.stack(terms))
            metrics["intermediate"] = inter_loss
            total = total + dcfg.intermediate_weight * inter_loss
        metrics["total"] = total
        loads = {("student", *path): load for path, load in moe_balance.expert_loads(inter).items()}
        return total, LossAux(metrics, loads)

    return loss_fn


# ----------------------------------------------------------------------------------------------- training


def _batches(data: Any, split: str, batch_size: int, seq_len: int, seed: int) -> Iterator[Batch]:
    if isinstance(data, data_lib.DataConfig):
        return iter(data_lib.make_dataset(data, split, seq_len=seq_len, batch_size=batch_size, seed=seed))
    if isinstance(data, Iterable):
        return iter(data)
    raise ValueError(f"data={type(data).__name__} is invalid: must be an iterable of batches (dicts of [B, L] "
                     "tokens/targets/loss_mask) or a nemojax DataConfig")


def _check_batch(batch: Any, vocab_size: int) -> dict[str, np.ndarray]:
    if not isinstance(batch, dict) or not {"tokens", "targets", "loss_mask"} <= set(batch):
        raise ValueError("each batch must be a dict with 'tokens', 'targets' and 'loss_mask' [B, L] arrays, got "
                         f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    out = {k: np.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask")}
    if out["tokens"].ndim != 2 or any(v.shape != out["tokens"].shape for v in out.values()):
        raise ValueError(f"batch arrays must all be [B, L]; got shapes { {k: v.shape for k, v in out.items()} }")
    if out["tokens"].size and int(out["tokens"].max()) >= vocab_size:
        raise ValueError(f"batch token id {int(out['tokens'].max())} is out of range for vocab_size={vocab_size}")
    return out


def _optimizer_config(opt: OptimizerConfig, steps: int) -> OptimizerConfig:
    """The optimizer settings over exactly `steps` (warmup capped at steps - 1, so a decay phase remains)."""
    return dataclasses.replace(opt, total_steps=steps, warmup_steps=min(opt.warmup_steps, steps - 1))


def _data_fingerprint(data: Any) -> dict[str, Any] | None:
    return dataclasses.asdict(data) if isinstance(data, data_lib.DataConfig) else None


def _model_shardings(config: ModelConfig, params: Params):
    """The mesh -> NamedShardings function of a model's params, by its logical axes (`fit`'s `shardings`)."""
    return lambda mesh: sharding.param_shardings(config, mesh, params)


def distill(student: Model, teacher: Model, data: Any, steps: int | None = None,
            config: DistillConfig = DistillConfig(), *, progress: bool = False,
            mesh: dict[str, int] | None = None, workdir: str | Path | None = None, stop_after: int | None = None,
            checkpoint_every: int | None = None, desc: str = "distill") -> tuple[Model, list[dict[str, float]]]:
    """Trains `student` toward `teacher` with `distillation_loss`; returns (new student Model, per-step metrics).

    data: an iterable of batches ({"tokens", "targets", "loss_mask"} [B, L]) or a `nemojax.data.DataConfig`
    (its "train" split, config.batch_size x config.seq_len, config.seed). steps: default config.steps. Student and
    teacher may differ in width and depth but must share the vocabulary (ValueError otherwise). The learned
    intermediate maps are discarded. Neither input Model is changed.

    Runs on `nemojax.train.fit`: mesh (a layout such as {"data": 2, "fsdp": 2, "tensor": 2}; None: one device)
    shards the student, its optimizer state and the teacher by their logical axes; workdir (None: in memory)
    holds checkpoints and metrics.jsonl (split `desc`, the method's name also on the progress bar) and a rerun
    resumes from it; stop_after ends this call after that many steps (checkpointed); checkpoint_every: steps
    between checkpoints (None: at the end only).
    """
    steps = config.steps if steps is None else steps
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps={steps!r} is invalid: must be a positive integer")
    _check_pair(student.config, teacher.config, config)
    batches = _batches(data, "train", config.batch_size, config.seq_len, config.seed)
    optimizer = make_optimizer(_optimizer_config(config.optimizer, steps))
    scfg, tcfg = student.config, teacher.config

    def loss_fn(params: Params, batch: Batch, rng: jax.Array, teacher_params: Params) -> tuple[jax.Array, LossAux]:
        # The teacher's params are an argument (not a closed-over constant) so jit does not embed them.
        return distillation_loss(scfg, tcfg, teacher_params, config)(params, batch, rng)

    maps = init_maps(scfg, tcfg, config)
    student_shardings = _model_shardings(scfg, student.params)
    fingerprint = {"method": desc, "student": config_fingerprint(scfg), "teacher": config_fingerprint(tcfg),
                   "loss": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("steps", "optimizer")},
                   "data": _data_fingerprint(data)}
    result = fit({"student": student.params, "maps": maps}, loss_fn, optimizer, batches, steps,
                 rng=jax.random.key(config.seed), frozen=(teacher.params,), mesh=mesh,
                 shardings=lambda m: {"student": student_shardings(m),
                                      "maps": jax.tree.map(lambda _: sharding.replicated(m), maps)},
                 frozen_shardings=lambda m: (_model_shardings(tcfg, teacher.params)(m),), workdir=workdir,
                 fingerprint=fingerprint, stop_after=stop_after, desc=desc, progress=progress,
                 checkpoint_every=checkpoint_every, prepare=lambda batch: _check_batch(batch, scfg.vocab_size))
    return Model(scfg, result.state.params["student"]), result.history


def finetune(model: Model, data: Any, steps: int, *, optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
             batch_size: int = 8, seq_len: int = 256, seed: int = 0, progress: bool = False, desc: str = "finetune",
             mesh: dict[str, int] | None = None, workdir: str | Path | None = None, stop_after: int | None = None,
             checkpoint_every: int | None = None) -> tuple[Model, list[dict[str, float]]]:
    """Next-token (LM) fine-tuning of `model` on `data` (as for `distill`) for `steps` steps on the shared trainer
    (`nemojax.train.fit`; mesh, workdir, stop_after and checkpoint_every as for `distill`, metrics split `desc`).
    Returns (the new Model, per-step metrics)."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps={steps!r} is invalid: must be a positive integer")
    batches = _batches(data, "train", batch_size, seq_len, seed)
    opt = make_optimizer(_optimizer_config(optimizer, steps))
    fingerprint = {"method": desc, "model": config_fingerprint(model.config), "batch_size": batch_size,
                   "seq_len": seq_len, "seed": seed, "data": _data_fingerprint(data)}
    result = fit(model.params, lm_loss(model.config), opt, batches, steps, rng=jax.random.key(seed), mesh=mesh,
                 shardings=_model_shardings(model.config, model.params), workdir=workdir, fingerprint=fingerprint,
                 stop_after=stop_after, desc=desc, progress=progress, checkpoint_every=checkpoint_every,
                 prepare=lambda batch: _check_batch(batch, model.config.vocab_size))
    return Model(model.config, result.state.params), result.history


def teacher_correction(teacher: Model, data: Any, steps: int, *, optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
                       batch_size: int = 8, seq_len: int = 256, seed: int = 0, progress: bool = False,
                       return_history: bool = False, mesh: dict[str, int] | None = None,
                       workdir: str | Path | None = None, stop_after: int | None = None,
                       checkpoint_every: int | None = None) -> Model | tuple[Model, list[dict[str, float]]]:
    """Teacher correction (arXiv 2408.11796): fine-tune the unpruned teacher with the LM loss on the distillation data.

    data: as for `distill`. Returns the corrected teacher (and the per-step metrics with return_history=True).
    Prune the original teacher, distill from the corrected one (arXiv 2408.11796). mesh, workdir, stop_after and
    checkpoint_every as for `distill` (metrics split "teacher_correction").
    """
    corrected, history = finetune(teacher, data, steps, optimizer=optimizer, batch_size=batch_size,
                                  seq_len=seq_len, seed=seed, progress=progress, desc="teacher_correction",
                                  mesh=mesh, workdir=workdir, stop_after=stop_after,
                                  checkpoint_every=checkpoint_every)
    return (corrected, history) if return_history else corrected
