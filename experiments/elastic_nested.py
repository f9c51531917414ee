"""Nemotron Elastic at laptop scale: one elastic run giving three nested models against separately pruned and
distilled models of the same sizes, and the two-stage curriculum against stage 1 alone.

    .venv/bin/python experiments/elastic_nested.py            # ~6.5 minutes on a 2-core CPU with runs/demo present
    .venv/bin/python experiments/elastic_nested.py --tiny     # test scale (the suite runs it), under a minute
    options: --steps --teacher --workdir --out   (see --help)

Teacher: the demo model (runs/demo, `make demo`), found and, when missing, trained briefly into that folder exactly
as experiments/minitron_ablations.py does (configs/small_hybrid.py for 120 steps, ~10 more minutes: a weaker
teacher than the demo's 240 steps). --tiny trains the tiny hybrid (configs/tiny.py, one layer of each kind) for a
few steps into the workdir instead.

Every width axis of the teacher (hidden, FFN, attention heads, Mamba heads and head channels) is made elastic by
importance permutation (`nemojax.elastic.elastify`, agg mean_l2 on calibration sequences), with routers for the
budgets 1.0 / 0.75 / 0.5 of the parameters (arXiv 2511.16664 sec. 3-4; arXiv 2605.07182 nests the same way). The
arms, all distilled from the same frozen teacher by forward KL on the logits at the same model learning rate:

- elastic, two-stage: `elastic.train` with stage 1 (uniform budgets, sequence length L) for half the steps, then
  stage 2 (budgets sampled 0.5 / 0.3 / 0.2, sequence length 2L: the paper's extended-context stage, scaled down).
- elastic, stage 1 only (stage1_fraction=1.0): uniform budgets at length L throughout, for as many tokens as the
  two-stage run (so it takes more steps).
- separate: `compress.prune` of the teacher to the sizes the two-stage routers chose for 0.75 and 0.5, then
  `compress.distill` of each at length L; the two runs together get the elastic run's token budget (half each).
  The separate "1.0" model is the teacher itself.
- zero-shot: the same pruned models before any training. The elastic run starts from nearly these models: when
  head channels are pruned too, `prune` ranks the Mamba heads on the kept channels only, while the elastic
  permutation holds one head order for every channel count (report["zero_shot_elastic_start"] scores the
  elastic starting point at the same sizes).

Every model is scored on the same validation batches (token-weighted mean next-token NLL, nats/byte). Claims
(arXiv 2511.16664 tables 1, 4 and 5; arXiv 2605.07182 abstract), each judged from the numbers measured here:

(1) nested matches independent: each extracted elastic submodel's loss is within 2% of (or below) the separately
    pruned + distilled model's of the same size, trained on the same total tokens.
(2) stage 2 helps the small models: two-stage loss below stage-1-only loss at 0.75 and 0.5.
(3) skewed sampling protects the full model: two-stage loss at 1.0 not above stage-1-only's (stage 2 samples the
    full model half of the time, stage 1 a third). The stage-1-only run is the uniform control; the two runs also
    differ in stage 2's longer context, so (2) and (3) measure the curriculum as the paper runs it, not each knob.
    Every arm is scored at the sizes the two-stage routers chose (the stage-1-only run's nested weights sliced
    there too), so each comparison is between equal architectures; each run's own routers' choice is reported.
(4) memory: one nested checkpoint (`elastic.save`: the full model plus the routers) against the separate
    checkpoints (`save_hf` of the three models).

One seed per arm: margins of a few hundredths of a nat are within run-to-run noise at this scale.

Writes experiments/results/elastic/elastic_nested.json, .md (the table and the verdicts) and .png (validation loss per
budget and arm; checkpoint bytes; distillation curves); --tiny writes ..._tiny.* unless --out names another stem.
The checkpoints go to the workdir (default runs/elastic_nested, runs/elastic_nested_tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = Path(__file__).resolve().parent
for _path in (REPO_ROOT, EXPERIMENTS):  # runnable without `pip install -e .`; minitron_ablations is a sibling
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from nemojax import config_files, elastic  # noqa: E402
from nemojax.compress.distill import DistillConfig, distill  # noqa: E402
from nemojax.compress.importance import importance  # noqa: E402
from nemojax.compress.prune import prune  # noqa: E402
from nemojax.elastic.train import ElasticConfig  # noqa: E402
from nemojax.elastic.train import train as elastic_train  # noqa: E402
from nemojax.interop.hf import save_hf  # noqa: E402
from nemojax.jobs import common  # noqa: E402
from nemojax.model import Model  # noqa: E402
from nemojax.train.optim import OptimizerConfig  # noqa: E402

DEFAULT_TEACHER = REPO_ROOT / "runs" / "demo"
TINY_TEACHER_CONFIG = REPO_ROOT / "configs" / "tiny.py"
TINY_PATTERN = "M*-"  # one layer of each kind (every width axis elastic) keeps --tiny's compiles short
RESULTS = REPO_ROOT / "experiments" / "results" / "elastic"  # own folder: the device-bench tests read results/*.json
BUDGETS = (1.0, 0.75, 0.5)
STAGE2_WEIGHTS = (0.5, 0.3, 0.2)
# The router loss's weight against the KD loss. The KD gradient also reaches the routers (through the multiplier
# pi of the sampled choice, which scales the kept activations) and reinforces whichever size was sampled: at weight
# 1.0 and 56 steps the 0.75 router settled on a 50% submodel in both runs (measured); at 5.0 the two-stage routers
# land on 75.1% / 50.2%.
ROUTER_WEIGHT = 5.0
MATCH_TOLERANCE = 0.02  # claim (1): "matches" = the nested model's loss at most 2% above the independent one's
ARMS = ("zero-shot", "separate", "elastic stage 1 only", "elastic two-stage")


# ------------------------------------------------------------------------------------------------- settings


def settings(tiny: bool, steps: int | None) -> dict[str, Any]:
    """Sizes of the run. steps: the two-stage run's optimizer steps (a multiple of 4: half in each stage, stage 2's
    twice as long; stage 1 alone then takes 1.5 x steps and each separate model 0.75 x steps for the same tokens)."""
    if tiny:
        s = {"teacher_steps": 24, "steps": 8, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
             "calibration": {"num_sequences": 8, "seq_len": 64, "batch_size": 8, "seed": 1, "agg": "mean_l2"},
             "eval": {"batches": 2, "batch_size": 4, "seq_len": 64, "seed": 0}}
    else:
        s = {"teacher_steps": None, "steps": 56, "batch_size": 4, "seq_len": 128, "warmup_steps": 5,
             "calibration": {"num_sequences": 32, "seq_len": 256, "batch_size": 8, "seed": 1, "agg": "mean_l2"},
             "eval": {"batches": 4, "batch_size": 8, "seq_len": 256, "seed": 0}}
    if steps is not None:
        s["steps"] = steps
    if s["steps"] < 4 or s["steps"] % 4:
        raise SystemExit(f"--steps {s['steps']}: must be a multiple of 4 (half the steps in each stage, and the "
                         "separate models' half of the token budget in whole steps)")
    # one budget per step at test scale: one masked forward in the compiled step instead of two
    s.update({"stage1_fraction": 0.5, "stage2_seq_len": 2 * s["seq_len"], "budgets_per_step": 1 if tiny else 2,
              "lr": 1e-3, "min_lr_ratio": 0.1, "router_lr": 3e-2, "router_weight": ROUTER_WEIGHT,
              "router_hidden": 64, "seed": 0})
    # token budget of the two-stage run, in stage-1 batches (B x L tokens): half the steps at L, half at 2L
    half = s["steps"] // 2
    s["stage1_only_steps"] = half + half * s["stage2_seq_len"] // s["seq_len"]
    s["separate_steps"] = s["stage1_only_steps"] // 2  # each of the two separate models: half the tokens
    s["tokens"] = s["stage1_only_steps"] * s["batch_size"] * s["seq_len"]
    return s


def job_config(s: dict[str, Any]) -> ml_collections.ConfigDict:
    """The data, calibration and eval fields `nemojax.jobs.common` reads (the teacher's stdlib corpus, bytes)."""
    return ml_collections.ConfigDict({"data": {"kind": "stdlib", "tokenizer": "byte"},
                                      "calibration": dict(s["calibration"]), "eval": dict(s["eval"])})


def optimizer(s: dict[str, Any]) -> OptimizerConfig:
    """The model's AdamW for every trained arm (total_steps is each run's own)."""
    return OptimizerConfig(lr=s["lr"], warmup_steps=s["warmup_steps"], schedule="cosine",
                           min_lr_ratio=s["min_lr_ratio"])


def elastic_config(s: dict[str, Any], two_stage: bool) -> ElasticConfig:
    common_fields = dict(batch_size=s["batch_size"], seq_len=s["seq_len"], budgets_per_step=s["budgets_per_step"],
                         optimizer=optimizer(s), router_lr=s["router_lr"], router_weight=s["router_weight"],
                         seed=s["seed"])
    if two_stage:
        return ElasticConfig(steps=s["steps"], stage1_fraction=s["stage1_fraction"],
                             stage2_seq_len=s["stage2_seq_len"], stage2_weights=STAGE2_WEIGHTS, **common_fields)
    return ElasticConfig(steps=s["stage1_only_steps"], stage1_fraction=1.0, **common_fields)


# -------------------------------------------------------------------------------------------------- teacher


def load_teacher(path: Path, tiny: bool, s: dict[str, Any], workdir: Path) -> tuple[Model, str, str]:
    """(teacher, where it came from, a note). Full scale: minitron_ablations' demo teacher mechanism; --tiny: the
    tiny hybrid trained for a few steps into workdir/teacher (resumed when already there)."""
    if not tiny:
        from minitron_ablations import load_teacher as demo_teacher

        model, note = demo_teacher(path, quick=False)
        return model, str(path), note
    from nemojax.train.loop import train

    steps = s["teacher_steps"]
    config = config_files.load(TINY_TEACHER_CONFIG, [
        f"model.overrides.pattern={TINY_PATTERN}", f"train.steps={steps}", "train.batch_size=4", "train.seq_len=64",
        f"train.eval_every={steps}", "train.eval_batches=1", f"train.checkpoint_every={steps}",
        f"train.log_every={steps}"])
    run = train(config, workdir / "teacher", progress=False)
    return run["model"], str(workdir / "teacher"), f"configs/tiny.py trained {steps} steps (tiny mode)"


# ----------------------------------------------------------------------------------------------- measures


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fraction(model: Model, full: int) -> float:
    return model.num_params / full


def curve(history: list[dict[str, float]], key: str = "kl") -> np.ndarray:
    """The per-step metric, smoothed by a trailing mean over a tenth of the run (each elastic step trains another
    sampled budget, so its raw KL jumps from step to step)."""
    values = np.asarray([float(h[key]) for h in history if key in h])
    window = max(1, len(values) // 10)
    return np.convolve(values, np.ones(window), "full")[: len(values)] / np.minimum(np.arange(1, len(values) + 1),
                                                                                    window)


def tokens_per_step(s: dict[str, Any], arm: str) -> list[int]:
    """Training tokens of each step of an arm (the x axis that puts the arms on one token budget)."""
    stage1 = s["batch_size"] * s["seq_len"]
    if arm == "elastic two-stage":
        half = s["steps"] // 2
        return [stage1] * half + [s["batch_size"] * s["stage2_seq_len"]] * (s["steps"] - half)
    return [stage1] * (s["stage1_only_steps"] if arm == "elastic stage 1 only" else s["separate_steps"])


def budget_key(budget: float) -> str:
    return f"{budget:g}"


# --------------------------------------------------------------------------------------------------- claims


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The claims (module docstring) judged on report["loss"] ({arm: {budget: loss}}, every arm at the two-stage
    routers' sizes) and report["checkpoint"]; report["submodels"] adds each elastic run's own routers' choice to
    the details."""
    loss, sub = report["loss"], report["submodels"]
    two, one, sep = loss["elastic two-stage"], loss["elastic stage 1 only"], loss["separate"]
    small = [budget_key(b) for b in BUDGETS if b < 1]
    full = budget_key(1.0)
    gaps = {b: (two[b] - sep[b]) / sep[b] for b in small}
    stage2 = {b: one[b] - two[b] for b in small}
    own = {b: {"fraction": sub["elastic stage 1 only"][b]["fraction"],
               "val_loss": sub["elastic stage 1 only"][b]["val_loss"]} for b in small}
    ckpt = report["checkpoint"]
    return [
        {"claim": "1", "text": f"nested matches independent (each within {MATCH_TOLERANCE:.0%} or below)",
         "held": all(g <= MATCH_TOLERANCE for g in gaps.values()),
         "detail": {b: {"elastic": two[b], "separate": sep[b], "relative_gap": gaps[b]} for b in small}},
        {"claim": "2", "text": "stage 2 helps the small models (two-stage below stage-1-only)",
         "held": all(m > 0 for m in stage2.values()),
         "detail": {b: {"two_stage": two[b], "stage1_only": one[b], "margin": stage2[b],
                        "stage1_only_own_routers": own[b]} for b in small}},
        {"claim": "3", "text": "skewed stage-2 sampling protects the full model (two-stage not above stage-1-only)",
         "held": two[full] <= one[full],
         "detail": {"two_stage": two[full], "stage1_only": one[full], "margin": one[full] - two[full],
                    "teacher": report["teacher"]["val_loss"]}},
        {"claim": "4", "text": "one nested checkpoint is smaller than the separate ones",
         "held": ckpt["nested_bytes"] < ckpt["separate_bytes"],
         "detail": {"nested_bytes": ckpt["nested_bytes"], "separate_bytes": ckpt["separate_bytes"],
                    "ratio": ckpt["nested_bytes"] / ckpt["separate_bytes"],
                    "router_fraction": ckpt["router_bytes"] / ckpt["nested_bytes"]}},
    ]


# ------------------------------------------------------------------------------------------- table and plot


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo) and core count, printed beside every figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"unknown CPU x{os.cpu_count()}"


def reading(claim: dict[str, Any]) -> str:
    """One sentence on what the numbers of a claim say (signs and sizes, not only held / not held)."""
    d = claim["detail"]
    if claim["claim"] == "1":
        gaps = ", ".join(f"{b}: {v['relative_gap']:+.1%}" for b, v in d.items())
        return (f"nested minus separate, relative ({gaps}); the separate models spent the whole token budget on "
                "two models, the elastic run also kept the full one")
    def better(margin: float) -> str:
        return "two-stage better" if margin > 0 else "stage 1 alone better"

    if claim["claim"] == "2":
        parts = ", ".join(f"{b}: {v['margin']:+.3f} nats, {better(v['margin'])}" for b, v in d.items())
        return f"stage-1-only minus two-stage at equal sizes ({parts})"
    if claim["claim"] == "3":
        cost = (d["two_stage"] - d["teacher"], d["stage1_only"] - d["teacher"])
        return (f"full model: two-stage {d['two_stage']:.4f}, stage 1 only {d['stage1_only']:.4f} "
                f"({better(d['margin'])} by {abs(d['margin']):.3f}); against the teacher's {d['teacher']:.4f}, "
                f"elastic training cost the full model {cost[0]:+.3f} / {cost[1]:+.3f}")
    return (f"{d['ratio']:.0%} of the separate checkpoints' bytes; the routers are {d['router_fraction']:.3%} of the "
            "nested checkpoint (the paper: under 2%)")


CAVEATS = ("Caveats: one seed per arm, so margins of a few hundredths of a nat are within run-to-run noise. For the "
           "same tokens the two-stage run takes two thirds of the optimizer steps of stage 1 alone (stage 2's "
           "sequences are twice as long), and its stage 2 changes both the budget sampling and the context length; "
           "the paper's stage-2 gains are reasoning accuracy at 49K-token context (AIME, GPQA), which a short-context "
           "validation loss does not measure. Every arm is scored at the sizes the two-stage routers chose.")


def rounded(value: Any, digits: int = 4) -> Any:
    """`value` with every float rounded (for the table)."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    return round(value, digits) if isinstance(value, float) else value


def markdown(report: dict[str, Any]) -> str:
    s, t = report["settings"], report["teacher"]
    lines = [
        f"# Nemotron Elastic, nested against separate ({'tiny' if report['tiny'] else 'default'} scale)", "",
        f"Teacher `{report['teacher_path']}`: {t['params']:,} params, validation loss {t['val_loss']:.4f} nats/byte "
        f"({report['teacher_note']}). CPU: {report['cpu']}; total {report['seconds']:.0f} s.", "",
        f"Token budget {s['tokens']:,} per method: elastic two-stage {s['steps']} steps ({s['steps'] // 2} x "
        f"{s['batch_size']} x {s['seq_len']} uniform, then {s['steps'] // 2} x {s['batch_size']} x "
        f"{s['stage2_seq_len']} at 0.5/0.3/0.2); stage 1 only {s['stage1_only_steps']} x {s['batch_size']} x "
        f"{s['seq_len']} uniform; separate {s['separate_steps']} x {s['batch_size']} x {s['seq_len']} for each "
        f"small model. Model LR {s['lr']:g} (cosine), router LR {s['router_lr']:g}, router loss weight "
        f"{s['router_weight']:g}; validation "
        f"{s['eval']['batches']} x {s['eval']['batch_size']} x {s['eval']['seq_len']} tokens.", "",
        "| budget | params and sizes (every arm) | stage-1-only routers' own choice: params, loss | "
        + " | ".join(ARMS) + " |",
        "|---|---|---|" + "---|" * len(ARMS),
    ]
    for b in BUDGETS:
        k = budget_key(b)
        two, one = (report["submodels"][arm][k] for arm in ("elastic two-stage", "elastic stage 1 only"))
        sizes = ", ".join(f"{a} {v}" for a, v in two["sizes"].items())
        cells = [f"{report['loss'][arm][k]:.4f}" for arm in ARMS]
        lines.append(f"| {k} | {two['params']:,} ({two['fraction']:.1%}): {sizes} | {one['params']:,} "
                     f"({one['fraction']:.1%}), {one['val_loss']:.4f} | " + " | ".join(cells) + " |")
    c = report["checkpoint"]
    lines += ["", f"Checkpoints: one nested (`elastic.save`) {c['nested_bytes'] / 1e6:.2f} MB (routers "
              f"{c['router_bytes'] / 1e3:.1f} kB) against separate (`save_hf` x 3) {c['separate_bytes'] / 1e6:.2f} MB "
              f"({c['nested_bytes'] / c['separate_bytes']:.0%}).", "", "| claim | held | statement | reading |",
              "|---|---|---|---|"]
    for v in report["claims"]:
        lines.append(f"| ({v['claim']}) | {'YES' if v['held'] else 'NO'} | {v['text']} | {reading(v)} |")
    lines += ["", CAVEATS, "", "Details: `" + json.dumps(rounded({v["claim"]: v["detail"] for v in report["claims"]}))
              + "`", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [3, 1.3, 2]})
    x = np.arange(len(BUDGETS))
    width = 0.8 / len(ARMS)
    colors = dict(zip(ARMS, ("#bbbbbb", "#e69f00", "#56b4e9", "#0072b2"), strict=True))
    for i, arm in enumerate(ARMS):
        values = [report["loss"][arm][budget_key(b)] for b in BUDGETS]
        left.bar(x + (i - (len(ARMS) - 1) / 2) * width, values, width, label=arm, color=colors[arm])
    left.axhline(report["teacher"]["val_loss"], color="k", ls="--", lw=1, label="teacher")
    left.set_xticks(x, [f"budget {budget_key(b)}" for b in BUDGETS])
    finite = [v for arm in ARMS for v in report["loss"][arm].values()]
    left.set_ylim(0.95 * min(finite + [report["teacher"]["val_loss"]]), 1.03 * max(finite))
    left.set(ylabel="validation loss (nats/byte)", title="same tokens per method, same validation batches")
    left.legend(fontsize=8)
    c = report["checkpoint"]
    middle.bar([0], [c["nested_bytes"] / 1e6], color="#0072b2")
    bottom = 0.0
    for b in BUDGETS:
        value = c["separate_per_budget"][budget_key(b)] / 1e6
        middle.bar([1], [value], bottom=bottom, color="#e69f00", edgecolor="white", label=f"separate {budget_key(b)}")
        bottom += value
    middle.set_xticks([0, 1], ["nested\n(elastic.save)", "separate\n(save_hf x 3)"])
    middle.set(ylabel="checkpoint MB", title="memory of the three models")
    s = report["settings"]
    for arm in ("elastic stage 1 only", "elastic two-stage"):
        right.plot(np.cumsum(tokens_per_step(s, arm)), curve(report["history"][arm]), label=arm, color=colors[arm])
    for b in BUDGETS[1:]:
        name = f"separate {budget_key(b)}"
        right.plot(np.cumsum(tokens_per_step(s, "separate")), curve(report["history"][name]), ls=":", label=name)
    right.set(xlabel="training tokens", ylabel="KL to the teacher (training batch, smoothed)",
              title="distillation", yscale="log")
    right.legend(fontsize=8)
    for ax in (left, middle, right):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Nemotron Elastic nested vs separate ({report['teacher']['params'] / 1e6:.2f}M-param teacher); "
                 f"CPU: {report['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main


def run_arms(teacher: Model, teacher_loss: float, scores: Any, s: dict[str, Any], config: ml_collections.ConfigDict,
             workdir: Path, progress: bool, validate) -> dict[str, Any]:
    """Every arm's models, losses, sizes, training curves and seconds, and the checkpoint bytes."""
    full = teacher.num_params
    dcfg = common.data_config(config)
    start_em = elastic.elastify(teacher, scores, budgets=BUDGETS, router_hidden=s["router_hidden"], key=s["seed"])
    loss: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
    submodels: dict[str, dict[str, Any]] = {}
    history: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    trained: dict[str, elastic.ElasticModel] = {}
    for arm, two_stage in (("elastic two-stage", True), ("elastic stage 1 only", False)):
        t0 = time.perf_counter()
        em, history[arm] = elastic_train(start_em, teacher, dcfg, elastic_config(s, two_stage), progress=progress,
                                         desc=arm.replace(" ", "_"))
        seconds[arm] = time.perf_counter() - t0
        trained[arm] = em
        submodels[arm] = {}
        for b in BUDGETS:
            sizes = {axis: int(v) for axis, v in em.sizes(b).items()}
            model = em.extract(b)
            submodels[arm][budget_key(b)] = {"sizes": sizes, "params": model.num_params,
                                             "fraction": fraction(model, full), "val_loss": validate(model)}
            print(f"{arm}: budget {b:g} -> {model.num_params:,} params ({fraction(model, full):.1%}), val loss "
                  f"{submodels[arm][budget_key(b)]['val_loss']:.4f}  sizes {sizes}")
    # every arm is scored at the two-stage routers' sizes: the stage-1-only run's nested weights are sliced there
    # too (its own routers' choice, recorded in submodels, may sit a notch away on some axis)
    reference = {k: v["sizes"] for k, v in submodels["elastic two-stage"].items()}
    for k, sizes in reference.items():
        loss["elastic two-stage"][k] = submodels["elastic two-stage"][k]["val_loss"]
        own = submodels["elastic stage 1 only"][k]
        loss["elastic stage 1 only"][k] = own["val_loss"] if own["sizes"] == sizes else validate(
            trained["elastic stage 1 only"].extract(sizes=sizes))
    separate: dict[str, Model] = {budget_key(1.0): teacher}
    elastic_start: dict[str, float] = {}
    loss["zero-shot"][budget_key(1.0)] = loss["separate"][budget_key(1.0)] = teacher_loss
    distill_config = DistillConfig(steps=s["separate_steps"], batch_size=s["batch_size"], seq_len=s["seq_len"],
                                   optimizer=optimizer(s), seed=s["seed"])
    for b in BUDGETS[1:]:
        k = budget_key(b)
        sizes = reference[k]
        student = prune(teacher, scores, **sizes)
        loss["zero-shot"][k] = validate(student)
        # the elastic run's starting point at these sizes: the same model up to the Mamba head order (docstring)
        elastic_start[k] = validate(start_em.extract(sizes=sizes))
        t0 = time.perf_counter()
        separate[k], history[f"separate {k}"] = distill(student, teacher, dcfg, config=distill_config,
                                                        progress=progress, desc=f"separate_{k}")
        seconds[f"separate {k}"] = time.perf_counter() - t0
        loss["separate"][k] = validate(separate[k])
        print(f"separate {k}: {student.num_params:,} params, zero-shot {loss['zero-shot'][k]:.4f}, distilled "
              f"{loss['separate'][k]:.4f} ({seconds[f'separate {k}']:.0f} s)")
    checkpoint = checkpoint_bytes(trained["elastic two-stage"], separate, workdir)
    return {"loss": loss, "submodels": submodels, "history": history, "seconds": seconds, "checkpoint": checkpoint,
            "zero_shot_elastic_start": elastic_start}


def checkpoint_bytes(em: elastic.ElasticModel, separate: dict[str, Model], workdir: Path) -> dict[str, Any]:
    """Bytes on disk of one nested checkpoint and of the separate models' save_hf folders (written to workdir)."""
    nested = elastic.save(em, workdir / "nested")
    per_budget = {}
    for k, model in separate.items():
        per_budget[k] = folder_bytes(save_hf(model, workdir / "separate" / f"budget_{k}"))
    routers = nested / "elastic_routers.safetensors"
    return {"nested_bytes": folder_bytes(nested), "router_bytes": routers.stat().st_size,
            "separate_bytes": sum(per_budget.values()), "separate_per_budget": per_budget,
            "nested_dir": str(nested), "separate_dir": str(workdir / "separate")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="test scale: a tiny teacher trained here, a few steps per arm")
    p.add_argument("--steps", type=int, help="two-stage elastic steps, a multiple of 4 (default 56; 8 with --tiny); "
                   "the other arms get the same tokens")
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="teacher checkpoint (default runs/demo; ignored "
                   "with --tiny)")
    p.add_argument("--workdir", help="checkpoints (default runs/elastic_nested, runs/elastic_nested_tiny)")
    p.add_argument("--out", help="output stem: writes STEM.json, STEM.md, STEM.png (default "
                   "experiments/results/elastic/elastic_nested, ..._tiny)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    suffix = "_tiny" if args.tiny else ""
    stem = Path(args.out) if args.out else RESULTS / f"elastic_nested{suffix}"
    workdir = Path(args.workdir) if args.workdir else REPO_ROOT / "runs" / f"elastic_nested{suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    s = settings(args.tiny, args.steps)
    config = job_config(s)
    cpu = cpu_model()
    print(f"CPU: {cpu}; settings {s}")

    teacher, teacher_path, note = load_teacher(Path(args.teacher), args.tiny, s, workdir)
    from minitron_ablations import Validator

    validate = Validator(config)
    teacher_loss = validate(teacher)
    print(f"teacher: {teacher.num_params:,} params, val loss {teacher_loss:.4f} ({note})")
    scores = importance(teacher, common.calibration_batches(config), agg=s["calibration"]["agg"])
    arms = run_arms(teacher, teacher_loss, scores, s, config, workdir, progress=not args.tiny, validate=validate)
    report = {"tiny": args.tiny, "cpu": cpu, "teacher_path": teacher_path, "teacher_note": note,
              "teacher": {"params": teacher.num_params, "val_loss": teacher_loss, "pattern": teacher.config.pattern},
              "settings": s, "budgets": list(BUDGETS), "stage2_weights": list(STAGE2_WEIGHTS), **arms}
    report["claims"] = verdicts(report)
    report["seconds"] = time.perf_counter() - start
    paths = {ext: stem.with_name(stem.name + ext) for ext in (".json", ".md", ".png")}
    paths[".json"].write_text(json.dumps(report, indent=1) + "\n")
    paths[".md"].write_text(markdown(report))
    plot(report, paths[".png"])
    print(markdown(report))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return report


if __name__ == "__main__":
    main()
