# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Minitron, step by step: `distill(prune(teacher))` on a tiny Nemotron-H
#
# The Minitron recipe (Muralidharan et al., 2024; Sreenivas et al., 2024) compresses a trained model in three
# moves, each a pure function of a `Model` value in `nemojax.compress`:
#
# 1. **importance**: run the teacher forward on a few calibration batches and score every prunable axis from its
#    activations (hidden channels, attention heads, MLP neurons, Mamba heads) and every layer (block importance).
# 2. **prune**: keep the top-scoring channels / heads / layers; the result is a new, smaller `Model`.
# 3. **distill**: recover the lost accuracy by training the pruned student to match the teacher's logits (KL).
#
# Here the teacher is the `nemotron-h-8b-tiny` preset (pattern `M-M*-MM-`: Mamba-2, MLP and one attention
# layer, hidden 64) trained briefly on the Python standard library with the byte tokenizer. We width-prune it to
# about half its parameters, depth-prune it to half its layers, distill both and compare.
#
# **Scale.** By default the notebook runs a meaningful (few-minute, CPU) experiment. With the environment
# variable `NEMOJAX_NOTEBOOK_QUICK=1` it runs at test scale (well under a minute); the test suite executes it
# that way. `NEMOJAX_NOTEBOOK_OUT` sets where the teacher run, figures and results go (default
# `runs/minitron_notebook` in the repository).

# %%
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import nemojax
from nemojax import compress, config_files, data
from nemojax.model import Model
from nemojax.train.loop import train
from nemojax.train.losses import cross_entropy
from nemojax.train.optim import OptimizerConfig, make_optimizer
from nemojax.train.step import TrainState, make_train_step

QUICK = os.environ.get("NEMOJAX_NOTEBOOK_QUICK", "0") not in ("", "0", "false", "False")
SCALE = dict(
    teacher_steps=20, batch_size=4, seq_len=32, calib_batches=2, val_batches=2, distill_steps=10, eval_every=5,
) if QUICK else dict(
    teacher_steps=400, batch_size=8, seq_len=128, calib_batches=8, val_batches=8, distill_steps=200, eval_every=20,
)
STEPS = SCALE["distill_steps"]

ROOT = Path(nemojax.__file__).resolve().parents[1]  # the repository (nemojax is installed editable)
OUT = Path(os.environ.get("NEMOJAX_NOTEBOOK_OUT", ROOT / "runs" / "minitron_notebook"))
OUT = OUT / ("quick" if QUICK else "full")
FIGURES = OUT / "figures"
FIGURES.mkdir(parents=True, exist_ok=True)
print(f"QUICK={QUICK}  scale={SCALE}  out={OUT}")

# %% [markdown]
# ## 1. The teacher
#
# `configs/tiny.py` is the tiny hybrid on the stdlib corpus; the training loop resumes from its workdir, so a
# second run of this cell loads the finished teacher instead of training it again.

# %%
train_config = config_files.load(ROOT / "configs" / "tiny.py", [
    f"train.steps={SCALE['teacher_steps']}",
    f"train.batch_size={SCALE['batch_size']}",
    f"train.seq_len={SCALE['seq_len']}",
    f"train.eval_every={SCALE['teacher_steps']}",
    f"train.eval_batches={SCALE['val_batches']}",
    f"train.checkpoint_every={SCALE['teacher_steps']}",
    f"train.log_every={max(1, SCALE['teacher_steps'] // 20)}",
])
run = train(train_config, OUT / "teacher", progress=not QUICK)
teacher = run["model"]
print(teacher.config)
print(f"teacher: {teacher.num_params:,} params, {run['summary']}")

# %% [markdown]
# Fixed batches for everything that follows: calibration and distillation batches come from the training split
# (with a different seed than the teacher's own run), validation batches from the held-out split.

# %%
data_config = data.DataConfig(**dict(train_config.data))
B, L = SCALE["batch_size"], SCALE["seq_len"]


def take(split: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    stream = data.make_dataset(data_config, split, seq_len=L, batch_size=B, seed=seed)
    return [{k: np.asarray(v) for k, v in next(stream).items()} for _ in range(n)]


calibration = take("train", SCALE["calib_batches"], seed=1)
validation = take("validation", SCALE["val_batches"], seed=0)
distill_data = take("train", STEPS, seed=2)


@jax.jit
def _nll(model: Model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed next-token NLL, token count) of one batch; jit retraces once per config (config is static)."""
    _, metrics = cross_entropy(model(batch["tokens"]), batch["targets"], batch["loss_mask"])
    return metrics["nll"] * metrics["tokens"], metrics["tokens"]


def val_loss(model: Model) -> float:
    """Token-weighted mean validation LM loss (nats/token) over the fixed validation batches."""
    sums = [jax.device_get(_nll(model, b)) for b in validation]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


teacher_loss = val_loss(teacher)
print(f"teacher validation loss {teacher_loss:.4f} nats/token (uniform over 260 bytes: {np.log(260):.3f})")

# %% [markdown]
# ## 2. Importance
#
# `compress.importance` taps activations during forward passes only (no gradients) and reduces them with the
# paper's default aggregation `mean_l2`: mean of |activation| over the sequence, L2 over batch rows. `layer/block`
# is the block importance BI = 1 - cos(block input, block output), averaged over tokens.

# %%
scores = compress.importance(teacher, [b["tokens"] for b in calibration])
print(scores)
scores.save(OUT / "scores.npz")

# %%
hidden = np.asarray(scores["hidden"])
order = np.argsort(-hidden)
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(np.arange(hidden.size), hidden[order], color="tab:blue")
ax.set_xlabel("hidden channel (sorted by score)")
ax.set_ylabel("importance (mean_l2)")
ax.set_title(f"hidden-channel importance, summed over the {teacher.config.num_layers} block pre-norms")
fig.tight_layout()
fig.savefig(FIGURES / "hidden_scores.png", dpi=110)
plt.show()

# %%
KIND = {"M": ("mamba_heads", "Mamba heads"), "*": ("heads", "attention heads"), "-": ("mlp", "MLP neurons")}
pattern = teacher.config.pattern
cols = 4
rows = -(-len(pattern) // cols)
fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows))
for i, (kind, ax) in enumerate(zip(pattern, axes.ravel(), strict=False)):
    key, what = KIND[kind]
    values = np.asarray(scores[f"layers_{i}/{key}"])
    ax.bar(np.arange(values.size), values, color={"M": "tab:green", "*": "tab:red", "-": "tab:orange"}[kind])
    ax.set_title(f"layer {i} ({kind}): {what}", fontsize=9)
    ax.tick_params(labelsize=7)
for ax in axes.ravel()[len(pattern):]:
    ax.axis("off")
fig.suptitle("per-layer importance of heads and neurons")
fig.tight_layout()
fig.savefig(FIGURES / "layer_axis_scores.png", dpi=110)
plt.show()

# %%
block = np.asarray(scores["layer/block"])
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(np.arange(block.size), block, color=[{"M": "tab:green", "*": "tab:red", "-": "tab:orange"}[k] for k in pattern])
ax.set_xticks(np.arange(block.size), [f"{i}\n{k}" for i, k in enumerate(pattern)])
ax.set_xlabel("layer (kind)")
ax.set_ylabel("block importance 1 - cos")
ax.set_title("block importance per layer (green Mamba, red attention, orange MLP)")
fig.tight_layout()
fig.savefig(FIGURES / "block_importance.png", dpi=110)
plt.show()

# %% [markdown]
# ## 3. Prune
#
# **Width**: hidden 64 -> 48, MLP 128 -> 64, attention heads 4 -> 2 (one per KV group) and Mamba heads 8 -> 4
# (two per SSM group; `prune` ranks heads within their group so every head keeps its B/C group). That is about
# half of the parameters.
#
# **Depth**: drop the half of the layers with the lowest block importance (the paper's depth-pruning
# experiments halve the layer count). The embedding and output layers stay whole, so this keeps more parameters
# than the width-pruned student.

# %%
width = compress.prune(teacher, scores, hidden=48, ffn=64, heads=2, mamba_heads=4)
depth = compress.prune(teacher, scores, layers=teacher.config.num_layers // 2)
dropped = sorted(np.argsort(block)[: teacher.config.num_layers - depth.config.num_layers].tolist())

for name, m in (("teacher", teacher), ("width-pruned", width), ("depth-pruned", depth)):
    c = m.config
    print(f"{name:13s} {m.num_params:8,d} params ({m.num_params / teacher.num_params:5.1%})  pattern={c.pattern!r} "
          f"hidden={c.hidden_size} ffn={c.intermediate_size} heads={c.attention.num_heads} "
          f"mamba_heads={c.mamba.num_heads}")
print(f"depth pruning dropped layers {dropped} (lowest block importance)")
assert width.num_params < 0.55 * teacher.num_params and depth.config.num_layers < teacher.config.num_layers

pruned_loss = {"width": val_loss(width), "depth": val_loss(depth)}
print(f"validation loss before distillation: teacher {teacher_loss:.4f}, width {pruned_loss['width']:.4f}, "
      f"depth {pruned_loss['depth']:.4f}")

# %% [markdown]
# ## 4. Distill
#
# Logit distillation (forward KL from the teacher, no LM loss: the papers' recipe) on the fixed distillation
# batches. For the width-pruned student we unroll the loop `compress.distill` runs, with the same pieces
# (`compress.distillation_loss` on the shared train step), so we can measure the validation loss along the way.
# The depth-pruned student goes through `compress.distill` itself.

# %%
optimizer_config = OptimizerConfig(lr=2e-3, total_steps=STEPS, warmup_steps=max(1, STEPS // 10), schedule="cosine",
                                   min_lr_ratio=0.1)
distill_config = compress.DistillConfig(steps=STEPS, optimizer=optimizer_config, batch_size=B, seq_len=L)

optimizer = make_optimizer(optimizer_config)
loss_fn = compress.distillation_loss(width.config, teacher.config, teacher.params, distill_config)
step_fn = jax.jit(make_train_step(optimizer, loss_fn))
params = {"student": width.params, "maps": {}}  # no intermediate-layer losses, so no learned projection
state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.key(0))

history, val_curve = [], [(0, pruned_loss["width"])]
for step, batch in enumerate(distill_data, start=1):
    state, metrics = step_fn(state, batch)
    history.append({"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}})
    if step % SCALE["eval_every"] == 0 or step == STEPS:
        val_curve.append((step, val_loss(Model(width.config, state.params["student"]))))
        print(f"step {step:4d}  kl {history[-1]['kl']:.4f}  validation loss {val_curve[-1][1]:.4f}")
width_distilled = Model(width.config, state.params["student"])

depth_distilled, depth_history = compress.distill(depth, teacher, distill_data, config=distill_config)

distilled_loss = {"width": val_loss(width_distilled), "depth": val_loss(depth_distilled)}
print(f"validation loss after {STEPS} distillation steps: width {distilled_loss['width']:.4f}, "
      f"depth {distilled_loss['depth']:.4f} (teacher {teacher_loss:.4f})")

# %%
fig, (ax_kl, ax_val) = plt.subplots(1, 2, figsize=(11, 3.8))
ax_kl.plot([h["step"] for h in history], [h["kl"] for h in history], label="width-pruned")
ax_kl.plot([h["step"] for h in depth_history], [h["kl"] for h in depth_history], label="depth-pruned", alpha=0.8)
ax_kl.set_xlabel("distillation step")
ax_kl.set_ylabel("KL(teacher || student), nats/token")
ax_kl.set_yscale("log")
ax_kl.set_title("distillation loss (training batches)")
ax_kl.legend()

ax_val.plot(*zip(*val_curve, strict=True), "o-", label="width-pruned, distilled")
ax_val.plot([0, STEPS], [pruned_loss["depth"], distilled_loss["depth"]], "s--", label="depth-pruned, distilled")
ax_val.axhline(teacher_loss, color="k", lw=1, label=f"teacher ({teacher.num_params:,} params)")
ax_val.axhline(pruned_loss["width"], color="tab:blue", ls=":", lw=1, label="width-pruned, not distilled")
ax_val.set_xlabel("distillation step")
ax_val.set_ylabel("validation LM loss, nats/token")
ax_val.set_title("loss recovery")
ax_val.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "distillation.png", dpi=110)
plt.show()

# %% [markdown]
# ## 5. Does the story hold?
#
# Distillation must lower the pruned students' validation loss, and its own KL objective must fall. Width
# against depth is reported, not asserted: the depth-pruned student keeps more parameters here (the embeddings
# are not pruned), so it is not an equal-budget comparison (at the default scale both end within a few hundredths
# of a nat of the teacher).

# %%
results = {
    "quick": QUICK, "scale": SCALE,
    "params": {"teacher": teacher.num_params, "width": width.num_params, "depth": depth.num_params},
    "configs": {name: dataclasses.asdict(m.config) for name, m in (("width", width), ("depth", depth))},
    "dropped_layers": dropped,
    "validation_loss": {"teacher": teacher_loss, "pruned": pruned_loss, "distilled": distilled_loss,
                        "width_curve": val_curve},
    "kl": {"width": [history[0]["kl"], history[-1]["kl"]], "depth": [depth_history[0]["kl"], depth_history[-1]["kl"]]},
}
(OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
print(json.dumps(results["validation_loss"], indent=1))

for name in ("width", "depth"):
    assert distilled_loss[name] < pruned_loss[name], (name, pruned_loss[name], distilled_loss[name])
assert np.isfinite(teacher_loss) and teacher_loss < np.log(260), teacher_loss
first, last = (np.mean([h["kl"] for h in part]) for part in (history[:3], history[-3:]))
assert last < first, ("KL did not fall", first, last)
print(f"width-pruned recovers {pruned_loss['width'] - distilled_loss['width']:.3f} nats/token, depth-pruned "
      f"{pruned_loss['depth'] - distilled_loss['depth']:.3f}; gap to the teacher after distillation: width "
      f"{distilled_loss['width'] - teacher_loss:.3f}, depth {distilled_loss['depth'] - teacher_loss:.3f}")
