"""The `train` job: a config and a workdir in, a trained model, metrics, checkpoints and a loss curve out.

    summary = train(config, "runs/demo")      # config: an ml_collections ConfigDict (see configs/)

The same code runs on one CPU and on a pod: the mesh comes from `config.mesh`, params and optimizer state are
placed by the logical-axis rules, each process feeds its share of the batch, and the job resumes by itself from
the newest checkpoint in its workdir.

With `model.runtime.scan_layers=True` the step runs the layer stack as a scan and the train state (params,
optimizer state, checkpoints) holds the scanned params layout (`nemojax.models.scan`); the run starts from the
unrolled initialisation converted to it, and the Models it hands back (`train`, `restore_model`) are unrolled again,
so HF export, pruning, quantization and decoding never see the scanned layout. `train.compilation_cache_dir` (""
off) keeps XLA executables across processes (jax's persistent compilation cache).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental.compilation_cache import compilation_cache

from nemojax import data, presets
from nemojax.config import ModelConfig
from nemojax.lowp import named_recipes as recipes
from nemojax.model import Model, abstract_params
from nemojax.models import scan
from nemojax.train import sharding
from nemojax.train.checkpoint import Checkpoints, config_fingerprint
from nemojax.train.fit import NONFINITE_POLICIES, fit, global_batch, jit_step, make_layout
from nemojax.train.flops import train_flops_per_token
from nemojax.train.metrics import read_metrics
from nemojax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from nemojax.train.step import TrainState, eval_step, lm_loss, make_train_step


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of `config.model`: a preset name plus architecture overrides (`model.overrides`,
    sub-configs as dicts of changes) and run-time choices (`model.runtime`, fields of `nemojax.config.Runtime`),
    with the low-precision training recipe `config.train.low_precision` (a `nemojax.quant.recipes` name such as
    "fp8_training" or "nvfp4_training"; "" or absent: none) as the runtime's quant."""
    overrides = config.model.overrides.to_dict() if "overrides" in config.model else {}
    if "runtime" in overrides:
        raise ValueError("model.overrides.runtime is invalid: run-time choices go in model.runtime")
    runtime = config.model.runtime.to_dict() if "runtime" in config.model else {}
    recipe = config.train.get("low_precision", "") if "train" in config else ""
    if recipe:
        runtime["quant"] = recipes.get(recipe)
    return presets.get(config.model.preset, **overrides, **({"runtime": runtime} if runtime else {}))


def use_compilation_cache(directory: str | Path) -> Path:
    """Points jax's persistent compilation cache (`jax_compilation_cache_dir`, a process-wide setting) at
    `directory`, so a later process that builds the same step loads its executable instead of compiling it. jax
    caches programs that take at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile."""
    path = Path(directory).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        compilation_cache.reset_cache()  # the cache binds its directory once; drop a previous one
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def init_params(mcfg: ModelConfig, rng: jax.Array) -> Any:
    """Initial params in the layout of `mcfg`: the unrolled initialisation, stacked when `mcfg.runtime.scan_layers`, so
    a run starts from the same weights with the option on or off."""
    params = Model.init(mcfg.replace(runtime={"scan_layers": False}), rng).params
    return scan.to_scanned(mcfg.pattern, params) if mcfg.runtime.scan_layers else params


def as_model(mcfg: ModelConfig, params: Any) -> Model:
    """The Model of a train state's params: always the unrolled, checkpoint-named layout (scan_layers off), the
    one HF interop, compression, quantization and decoding take."""
    if mcfg.runtime.scan_layers:
        return Model(mcfg.replace(runtime={"scan_layers": False}), scan.to_unrolled(mcfg.pattern, params))
    return Model(mcfg, params)


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    return OptimizerConfig(total_steps=config.train.steps, **dict(config.optimizer))


@dataclasses.dataclass
class Run:
    """Everything a training job builds before its first step (also used by benchmarks and compile checks)."""

    model_config: ModelConfig
    mesh: jax.sharding.Mesh
    state_sharding: TrainState
    batch_sharding: jax.sharding.NamedSharding
    step: Any  # jitted (state, batch) -> (state, metrics)
    evaluate: Any  # jitted (params, batch) -> metrics
    init: Any  # jitted (rng) -> state
    abstract_state: TrainState
    optimizer: Any  # optax.GradientTransformation
    loss_fn: Any  # nemojax.train.step.LossFn


def build(config: ml_collections.ConfigDict, mcfg: ModelConfig | None = None,
          devices: list[jax.Device] | None = None) -> Run:
    """Mesh, shardings and the jitted init / step / eval functions of a training config."""
    mcfg = mcfg or model_config(config)
    t = config.train
    if t.get("compilation_cache_dir", ""):
        use_compilation_cache(t.compilation_cache_dir)
    optimizer = make_optimizer(optimizer_config(config))
    loss_fn = lm_loss(mcfg, z_loss=t.z_loss, moe_aux_loss=t.moe_aux_loss,
                      mtp_weight=t.get("mtp_loss_weight", 0.0), document_mask=t.get("document_mask", False))
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    params_shape = abstract_params(mcfg)
    layout = make_layout(mesh, optimizer, params_shape, sharding.param_shardings(mcfg, mesh, params_shape))
    state_sharding, batch_sharding = layout.state, layout.batch

    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = init_params(mcfg, params_rng)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), state_rng)

    step_fn = make_train_step(optimizer, loss_fn, grad_accum=t.grad_accum, moe_bias_rate=t.moe_bias_rate)
    step = jit_step(step_fn, layout)
    evaluate = jax.jit(eval_step(loss_fn), in_shardings=(state_sharding.params, batch_sharding),
                       out_shardings=sharding.replicated(mesh))
    init = jax.jit(init, out_shardings=state_sharding)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(init, jax.random.PRNGKey(0)), state_sharding)
    return Run(mcfg, mesh, state_sharding, batch_sharding, step, evaluate, init, abstract_state, optimizer,
               loss_fn)


_global_batch = global_batch  # this process's rows -> global arrays (tests and benchmarks use the old name)


def _fingerprint(mcfg: ModelConfig, config: ml_collections.ConfigDict) -> dict[str, Any]:
    fingerprint = {**config_fingerprint(mcfg), "seq_len": config.train.seq_len, "data": dict(config.data)}
    if mcfg.runtime.scan_layers:  # checkpoints hold the state in the scanned layout
        fingerprint["params_layout"] = "scanned"
    return fingerprint


def evaluate(run: Run, params: Any, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Mean validation loss (token-weighted) and perplexity over `config.train.eval_batches` batches."""
    t = config.train
    batches = data.make_dataset(_data_config(config), "validation", seq_len=t.seq_len, batch_size=t.batch_size,
                                seed=t.seed)
    nll_sum, tokens = 0.0, 0.0
    for _, batch in zip(range(t.eval_batches), batches, strict=False):
        metrics = jax.device_get(run.evaluate(params, _global_batch(batch, run.batch_sharding)))
        nll_sum += float(metrics["nll"]) * float(metrics["tokens"])
        tokens += float(metrics["tokens"])
    loss = nll_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}


def _data_config(config: ml_collections.ConfigDict) -> data.DataConfig:
    return data.DataConfig(**dict(config.data))


_AT_LEAST_ONE = ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                 "keep_checkpoints")


def check_train_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Refuses, with a ValueError naming the field and what is allowed, a train config or workdir that would fail
    or mislead only after training began: a zero interval (a ZeroDivisionError after step 1), keep_checkpoints=0 (a
    run that ends with no checkpoint), eval_batches=0 (a validation loss of 0.0), an empty workdir (training into
    the current directory), or an unknown non-finite policy."""
    if not str(workdir).strip():
        raise ValueError("workdir='' is invalid: must name a directory for the run (checkpoints, metrics), e.g. "
                         "runs/tiny")
    t = config.train
    for name in _AT_LEAST_ONE:
        value = t.get(name)
        if name == "checkpoint_every" and value is None:  # None: a checkpoint only at the end (and on stop)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train.{name}={value!r} is invalid: must be an integer >= 1"
                             + (" or None (only at the end)" if name == "checkpoint_every" else ""))
    on_nonfinite, max_skipped = t.get("on_nonfinite", "stop"), t.get("max_skipped", 10)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r} is invalid: must be one of {NONFINITE_POLICIES}")
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 1:
        raise ValueError(f"train.max_skipped={max_skipped!r} is invalid: must be an integer >= 1")


def check_validation_data(config: ml_collections.ConfigDict) -> None:
    """Reads one validation batch, so an empty validation split is refused before step 1 rather than found at the
    first evaluation (before any checkpoint)."""
    t = config.train
    batches = data.make_dataset(_data_config(config), "validation", seq_len=t.seq_len, batch_size=t.batch_size,
                                seed=t.seed)
    if next(iter(batches), None) is None:
        raise ValueError(f"the validation split of data={dict(config.data)} is empty (not one batch of "
                         f"{t.batch_size} x {t.seq_len} tokens): validation needs at least one; add validation data "
                         "or lower train.batch_size / train.seq_len")


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns a summary dict.

    `stop_after` ends the job after that many steps of this invocation (a checkpoint is written first), which
    is how tests interrupt and resume a run. The loop itself is `nemojax.train.fit.fit` (method "train"); this
    job adds the config's model, data, learning-rate schedule, throughput metrics and validation.
    `train.on_nonfinite` ("stop", the default, or "skip") and `train.max_skipped` (default 10) choose what a
    non-finite loss does (see `fit`). The config and the validation data are checked before anything is built.
    """
    check_train_config(config, workdir)
    workdir = Path(workdir)
    t = config.train
    check_validation_data(config)
    run = build(config)
    mcfg = run.model_config
    data_vocab = data.vocab_size(_data_config(config))
    if data_vocab > mcfg.vocab_size:
        raise ValueError(f"model vocab_size={mcfg.vocab_size} is smaller than the data's {data_vocab} token ids")
    batches = data.make_dataset(_data_config(config), "train", seq_len=t.seq_len, batch_size=t.batch_size,
                                seed=t.seed)
    flops_per_token = train_flops_per_token(mcfg, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len
    peak = config.train.get("peak_flops_per_device") or None
    schedule = make_schedule(optimizer_config(config))

    def throughput(step: int, metrics: dict[str, float], steps_per_s: float) -> dict[str, float]:
        tokens_per_s = tokens_per_step * steps_per_s
        metrics.update(lr=float(schedule(step - 1)), tokens_per_s=tokens_per_s,
                       tflops=tokens_per_s * flops_per_token / 1e12)
        if peak:
            metrics["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
        return metrics

    def validation(step: int, params: Any) -> dict[str, float] | None:
        return evaluate(run, params, config) if step % t.eval_every == 0 or step == t.steps else None

    params_rng, state_rng = jax.random.split(jax.random.PRNGKey(t.seed))
    result = fit(lambda: init_params(mcfg, params_rng), run.loss_fn, run.optimizer, batches, t.steps,
                 rng=state_rng, mesh=run.mesh, shardings=lambda _: run.state_sharding.params, workdir=workdir,
                 fingerprint=_fingerprint(mcfg, config), stop_after=stop_after, desc="train", progress=progress,
                 grad_accum=t.grad_accum, moe_bias_rate=t.moe_bias_rate, log_every=t.log_every,
                 checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
                 on_nonfinite=t.get("on_nonfinite", "stop"), max_skipped=t.get("max_skipped", 10), on_log=throughput,
                 evaluate=validation)
    state = result.state
    history = read_metrics(workdir)
    summary = {
        "workdir": str(workdir), "steps": int(state.step), "params": Model(mcfg, state.params).num_params,
        "train_loss": next((m["loss"] for m in reversed(history) if m["split"] == "train"), None),
        "validation_loss": next((m["loss"] for m in reversed(history) if m["split"] == "validation"), None),
    }
    if jax.process_index() == 0:
        plot_losses(history, workdir / "loss.png")
    return {"summary": summary, "state": state, "model": as_model(mcfg, state.params)}


def restore_model(config: ml_collections.ConfigDict, workdir: str | Path, step: int | None = None) -> Model:
    """The model of a training workdir's newest (or given) checkpoint."""
    run = build(config)
    with jax.set_mesh(run.mesh):
        checkpoints = Checkpoints(workdir, _fingerprint(run.model_config, config))
        state = checkpoints.restore(run.abstract_state, step=step)
        checkpoints.close()
    return as_model(run.model_config, state.params)


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        points = [(m["step"], m["loss"]) for m in history if m["split"] == split]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
