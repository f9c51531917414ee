"""Training an elastic model (Nemotron Elastic, arXiv 2511.16664 sec. 3-4): every step samples a budget per
sub-batch, its router picks a submodel by Gumbel-softmax, the masked submodel is distilled from the frozen teacher
(forward KL, `compress.kd_logits`) and the router is pulled to the budget's cost (`router.router_loss`).

    em, history = elastic.train(em, teacher, data, ElasticConfig(steps=200))

Two stages (the paper's curriculum): stage 1 samples the budgets uniformly at `seq_len`; stage 2 (the last
1 - stage1_fraction of the steps) samples them by `stage2_weights` (default 0.5 / 0.3 / 0.2, favouring the full
model) at `stage2_seq_len`. The model and the routers have their own learning rates (AdamW for the model, Adam for
the routers). Runs on the shared trainer (`nemojax.train.fit`): workdir checkpoints, exact resume, non-finite guard.
The budget of each step comes from a host rng seeded by (seed, step) and the Gumbel noise from the step's key
folded with the sub-batch, so a resumed run samples the same submodels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nemojax import data as data_lib
from nemojax.compress.distill import kd_logits
from nemojax.elastic.masked import forward
from nemojax.elastic.model import ElasticModel
from nemojax.elastic.router import Schedule, router_logits, router_loss, sample_all
from nemojax.model import Model, apply
from nemojax.train.checkpoint import config_fingerprint
from nemojax.train.fit import fit
from nemojax.train.optim import OptimizerConfig, make_optimizer
from nemojax.train.step import LossAux

__all__ = ["ElasticConfig", "train"]


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
    """steps: optimizer steps (both stages). batch_size, seq_len: stage 1's batches; stage2_seq_len: stage 2's
    (None: seq_len). stage1_fraction: the share of steps in stage 1 (1.0: no stage 2). stage2_weights: the budgets'
    sampling weights in stage 2, one per budget (None: 0.5 / 0.3 / 0.2 for three budgets, else uniform).
    budgets_per_step: sub-batches per step, each with its own budget and router sample (a budget per data-parallel
    rank when it equals the data axis). temperature: the KD temperature. router_weight: the router loss's weight (1.0:
    KD + router, the official code's sum). The KD gradient also reaches a router, through the multiplier of its
    sampled choice, and favours whatever it sampled; on a trained teacher that can hold a router off its budget
    for good: watch the `frac` metric per budget and raise the weight when it stays outside the 5% dead zone
    (experiments/elastic_nested.py needs 5, notebooks/elastic.py 20).
    optimizer: the model's AdamW; router_lr: the routers' Adam learning rate. scale_end / tau_end: the router
    schedule (logit scale 1 -> scale_end, Gumbel temperature 1 -> tau_end). hard: straight-through sampling.
    memory_context: the context the "memory" target prices. seed: data order, budgets and the train key."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    stage2_seq_len: int | None = None
    stage1_fraction: float = 0.5
    stage2_weights: tuple[float, ...] | None = None
    budgets_per_step: int = 1
    temperature: float = 1.0
    router_weight: float = 1.0
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10)
    router_lr: float = 1e-2
    scale_end: float = 10.0
    tau_end: float = 0.05
    hard: bool = False
    memory_context: int = 131072
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "budgets_per_step", "memory_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ElasticConfig.{name}={value!r} is invalid: must be a positive integer")
        if self.stage2_seq_len is not None and (not isinstance(self.stage2_seq_len, int) or self.stage2_seq_len <= 0):
            raise ValueError(f"ElasticConfig.stage2_seq_len={self.stage2_seq_len!r} is invalid: must be None or a "
                             "positive integer")
        if not 0 < self.stage1_fraction <= 1:
            raise ValueError(f"ElasticConfig.stage1_fraction={self.stage1_fraction!r} is invalid: must be in (0, 1]")
        if self.batch_size % self.budgets_per_step:
            raise ValueError(f"ElasticConfig.budgets_per_step={self.budgets_per_step} is invalid: must divide "
                             f"batch_size={self.batch_size}")
        for name in ("temperature", "router_lr", "scale_end", "tau_end"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ElasticConfig.{name}={getattr(self, name)!r} is invalid: must be > 0")
        if not float(self.router_weight) >= 0:
            raise ValueError(f"ElasticConfig.router_weight={self.router_weight!r} is invalid: must be >= 0")

    @property
    def stage1_steps(self) -> int:
        return max(1, round(self.steps * self.stage1_fraction))


def stage_weights(config: ElasticConfig, n_budgets: int) -> tuple[np.ndarray, np.ndarray]:
    """(stage 1's, stage 2's) sampling probabilities over the budgets [n_budgets]."""
    uniform = np.full(n_budgets, 1.0 / n_budgets)
    weights = config.stage2_weights
    if weights is None:
        weights = (0.5, 0.3, 0.2) if n_budgets == 3 else tuple(uniform)
    weights = np.asarray(weights, np.float64)
    if weights.shape != (n_budgets,) or np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError(f"ElasticConfig.stage2_weights={config.stage2_weights!r} is invalid: one non-negative weight "
                         f"per budget ({n_budgets}), not all zero")
    return uniform, weights / weights.sum()


def _token_batches(data: Any, batch_size: int, seq_len: int, seed: int) -> Iterator[dict]:
    if isinstance(data, data_lib.DataConfig):
        return iter(data_lib.make_dataset(data, "train", seq_len=seq_len, batch_size=batch_size, seed=seed))
    if isinstance(data, Iterable):
        return iter(data)
    raise ValueError(f"data={type(data).__name__} is invalid: must be an iterable of batches (dicts of [B, L] "
                     "tokens/targets/loss_mask) or a nemojax DataConfig")


def _schedule_batches(data: Any, config: ElasticConfig, n_budgets: int) -> Iterator[dict]:
    """The training batches with each step's index and sub-batch budgets as per-row arrays ("step", "budget":
    [B, 1] int32, rows like the tokens so they shard with them), stage 1 then stage 2 (a DataConfig is read at
    each stage's sequence length)."""
    first, second = stage_weights(config, n_budgets)
    stage2_len = config.stage2_seq_len or config.seq_len
    sources = [_token_batches(data, config.batch_size, config.seq_len, config.seed)]
    if isinstance(data, data_lib.DataConfig) and stage2_len != config.seq_len:
        sources.append(_token_batches(data, config.batch_size, stage2_len, config.seed + 1))
    rows_per_budget = config.batch_size // config.budgets_per_step
    for step in range(config.steps):
        stage2 = step >= config.stage1_steps
        source = sources[-1] if stage2 else sources[0]
        try:
            batch = next(source)
        except StopIteration:
            raise ValueError(f"data ran out at step {step} of {config.steps}") from None
        batch = {k: np.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask")}
        if batch["tokens"].shape[0] != config.batch_size:
            raise ValueError(f"batch at step {step} has {batch['tokens'].shape[0]} rows: ElasticConfig.batch_size is "
                             f"{config.batch_size}")
        picks = np.random.default_rng([config.seed, step]).choice(n_budgets, config.budgets_per_step,
                                                                   p=second if stage2 else first)
        batch["budget"] = np.repeat(picks, rows_per_budget).astype(np.int32)[:, None]
        batch["step"] = np.full((config.batch_size, 1), step, np.int32)
        yield batch


def elastic_loss(em: ElasticModel, config: ElasticConfig, teacher_config: Any = None):
    """The `LossFn` over params {"model", "routers"} with the teacher's params frozen: per sub-batch, KD of the
    router-chosen masked submodel plus router_weight x the router loss of its budget. Metrics: kl, router, total,
    and the expected parameter fraction. teacher_config: the teacher's config (default em.config); a quantized
    em (elastic QAD) has a high-precision teacher, and its router loss prices the unquantized architecture."""
    mcfg, choices, budgets = em.config, em.choices, em.budgets
    tcfg = mcfg if teacher_config is None else teacher_config
    cost_config = mcfg.replace(runtime={"quant": None})  # the counter prices weights, not quantization state
    schedule = Schedule(config.steps, scale_end=config.scale_end, tau_end=config.tau_end)
    tables = {axis: jnp.asarray(sizes, jnp.int32) for axis, sizes in choices.items()}
    per_budget = [lambda pi, b=b: router_loss(cost_config, pi, choices, b, target=em.target,
                                              removal_order=em.removal_order,
                                              **({"context": config.memory_context} if em.target == "memory" else {}))
                  for b in budgets]
    groups = config.budgets_per_step

    def loss_fn(params, batch, rng, teacher_params):
        step = batch["step"][0, 0]
        t_logits = jax.lax.stop_gradient(apply(tcfg, teacher_params, batch["tokens"]).logits)
        rows = batch["tokens"].shape[0] // groups
        kls, routers = [], []
        for g in range(groups):
            part = slice(g * rows, (g + 1) * rows)
            index = batch["budget"][g * rows, 0]
            code = jax.nn.one_hot(index, len(budgets), dtype=jnp.float32)
            logits = router_logits(params["routers"], code, step, schedule)
            picks = sample_all(logits, jax.random.fold_in(rng, g), schedule.tau(step), config.hard)
            sizes = {axis: tables[axis][i] for axis, (i, _, _) in picks.items()}
            out = {axis: m for axis, (_, _, m) in picks.items()}
            s_logits = forward(mcfg, params["model"], batch["tokens"][part], sizes, removal_order=em.removal_order,
                               out=out).logits
            kls.append(kd_logits(s_logits, t_logits[part], batch["loss_mask"][part], config.temperature))
            routers.append(jax.lax.switch(index, per_budget, {axis: pi for axis, (_, pi, _) in picks.items()}))
        kl, router = jnp.mean(jnp.stack(kls)), jnp.mean(jnp.stack(routers))
        total = kl + config.router_weight * router
        return total, LossAux({"kl": kl, "router": router, "total": total}, {})

    return loss_fn


def _optimizer(config: ElasticConfig, params: dict) -> optax.GradientTransformation:
    """AdamW (the model's settings over config.steps) on params["model"], Adam at router_lr on params["routers"]."""
    model = make_optimizer(dataclasses.replace(config.optimizer, total_steps=config.steps,
                                               warmup_steps=min(config.optimizer.warmup_steps, config.steps - 1)))
    labels = {part: jax.tree.map(lambda _, label=part: label, tree) for part, tree in params.items()}
    return optax.multi_transform({"model": model, "routers": optax.adam(config.router_lr)}, labels)


def train(em: ElasticModel, teacher: Model, data: Any, config: ElasticConfig = ElasticConfig(), *,
          workdir: str | Path | None = None, stop_after: int | None = None, checkpoint_every: int | None = None,
          progress: bool = False, mesh: dict[str, int] | None = None,
          desc: str = "elastic") -> tuple[ElasticModel, list[dict[str, float]]]:
    """Trains the nested models of `em` toward the frozen `teacher` (usually the model elastified) and its routers
    toward their budgets; returns (the trained ElasticModel, per-step metrics). data: an iterable of batches
    ({"tokens", "targets", "loss_mask"} [batch_size, L]) or a DataConfig. workdir / stop_after / checkpoint_every /
    mesh as for `compress.distill`. Raises ValueError for a teacher of another vocabulary or a bad config."""
    if teacher.config.vocab_size != em.config.vocab_size:
        raise ValueError(f"teacher vocab_size={teacher.config.vocab_size} differs from the elastic model's "
                         f"{em.config.vocab_size}")
    fingerprint = {"method": desc, "model": config_fingerprint(em.config),
                   "teacher": config_fingerprint(teacher.config),
                   "choices": {a: list(v) for a, v in em.choices.items()}, "budgets": list(em.budgets),
                   "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "optimizer"}}
    params = {"model": em.model.params, "routers": em.routers}
    result = fit(params, elastic_loss(em, config, teacher.config), _optimizer(config, params),
                 _schedule_batches(data, config, len(em.budgets)), config.steps, rng=jax.random.key(config.seed),
                 frozen=(teacher.params,), mesh=mesh, workdir=workdir, fingerprint=fingerprint, stop_after=stop_after,
                 desc=desc, progress=progress, checkpoint_every=checkpoint_every)
    params = result.state.params
    return em.replace(model=Model(em.config, params["model"]), routers=params["routers"]), result.history
