"""The Minitron / Minitron-SSM ablations at laptop scale: does each published claim hold on the demo hybrid?

    .venv/bin/python experiments/minitron_ablations.py            # ~15-20 minutes on a 2-core CPU
    .venv/bin/python experiments/minitron_ablations.py --quick    # ~3 minute smoke run (tiny steps and batches)
    options: --steps --teacher --seeds --out   (see --help)

Teacher: the demo model (runs/demo, `make demo`); when it is missing, configs/small_hybrid.py is trained there
for a few steps first (a weak teacher: the verdicts then mean little). Every arm starts from the same importance
scores (configs/minitron_small.py's calibration, agg mean_l2 unless the arm is about agg) and the width target
of configs/minitron_small.py (hidden 512 -> 384, FFN 1536 -> 1024, Mamba heads 16 -> 8, about half the
parameters). Every trained arm sees the same training batches (same seed, batch size, sequence length, steps)
with the same AdamW schedule; every model is scored on the same validation batches (the pipeline's validation
split and seed: token-weighted mean next-token NLL, nats/byte).

Claims (arXiv 2408.11796 depth pruning and teacher correction; arXiv 2504.11409 group-aware heads; arXiv
2407.14679 importance aggregation) and the arms compared:

(a) prune + distill beats training the same architecture from random init on the same tokens:
    width-pruned + logit KD  vs  random init of the pruned config + LM loss.
(b) width pruning beats depth pruning at about equal parameters, both distilled the same way:
    width-pruned + KD  vs  depth-pruned + KD, the depth target dropping the lowest block-importance (BI) layers
    (ModelOpt's non-contiguous choice) until the parameter count is closest to the width model's.
(c) group-aware Mamba head pruning beats unconstrained head pruning: the same width target with
    `prune(..., group_aware=False)` (heads ranked globally, re-packed into the SSM groups, so some heads read
    another group's B/C; see nemojax/compress/prune.py), compared zero-shot and after KD.
(d) logit KD beats LM-loss-only retraining of the same pruned model on the same tokens.
(e) aggregation: zero-shot (pruned, not retrained) validation loss of the width target for each of the nine
    {mean, l2, var} (sequence) x {mean, l2, var} (batch) aggregations, over `--seeds` calibration sets; the
    paper's recipe is mean_l2 (mean over the sequence, L2 over the batch). "Held" = mean_l2 is the best (lowest
    mean) of the nine; the margin is the next best minus mean_l2.

A claim "held" when the paper's winner has the lower validation loss; the margin is loser - winner (nats/byte,
positive = held) and the relative margin divides by the loser's loss. One seed per trained arm: margins of a few
hundredths are within run-to-run noise at this scale.

Writes runs/minitron_ablations.json and runs/minitron_ablations.png (validation loss per arm; zero-shot loss per
aggregation) and prints a summary table; with --quick the files end in _quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nemojax import config_files  # noqa: E402
from nemojax.compress.distill import distill, teacher_correction  # noqa: E402
from nemojax.compress.importance import AGGS, importance  # noqa: E402
from nemojax.compress.prune import prune  # noqa: E402
from nemojax.jobs import common, minitron  # noqa: E402
from nemojax.model import Model  # noqa: E402
from nemojax.train.step import eval_step, lm_loss  # noqa: E402

COMPRESS_CONFIG = REPO_ROOT / "configs" / "minitron_small.py"
TEACHER_CONFIG = REPO_ROOT / "configs" / "small_hybrid.py"
DEFAULT_TEACHER = REPO_ROOT / "runs" / "demo"
PAPER_AGG = "mean_l2"


# ------------------------------------------------------------------------------------------------- settings


def settings(quick: bool, steps: int | None, seeds: int | None) -> dict[str, Any]:
    """Sizes of the run: training steps and batch, calibration, validation, calibration seeds for (e)."""
    if quick:
        s = {"steps": 4, "batch_size": 4, "seq_len": 64, "warmup_steps": 1,
             "calibration": {"num_sequences": 8, "seq_len": 128, "batch_size": 8},
             "eval": {"batches": 2, "batch_size": 4, "seq_len": 128}, "seeds": 1}
    else:
        s = {"steps": 40, "batch_size": 8, "seq_len": 128, "warmup_steps": 5,
             "calibration": {"num_sequences": 32, "seq_len": 256, "batch_size": 8},
             "eval": {"batches": 6, "batch_size": 8, "seq_len": 256}, "seeds": 2}
    if steps is not None:
        s["steps"] = steps
    if seeds is not None:
        s["seeds"] = seeds
    return s


def compress_config(s: dict[str, Any]):
    """configs/minitron_small.py with this run's sizes."""
    config = config_files.load(COMPRESS_CONFIG, [])
    config.calibration.update(s["calibration"])
    config.eval.update(s["eval"])
    config.distill.update({"steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"],
                           "warmup_steps": s["warmup_steps"]})
    return config


# -------------------------------------------------------------------------------------------------- teacher


def load_teacher(path: Path, quick: bool) -> tuple[Model, str]:
    """The demo teacher; trains configs/small_hybrid.py into `path` (briefly) when it has no checkpoint."""
    from nemojax.infer.load import load_checkpoint

    if not ((path / "run.json").is_file() or (path / "config.json").is_file()):
        from nemojax.train.loop import train

        steps = 12 if quick else 120
        print(f"teacher: {path} has no checkpoint; training {TEACHER_CONFIG.name} for {steps} steps there")
        config = config_files.load(TEACHER_CONFIG, [f"train.steps={steps}"])
        train(config, path, progress=True)
        note = f"trained here for {steps} steps (no demo checkpoint found)"
    else:
        note = "existing checkpoint"
    model, _ = load_checkpoint(path)
    return model, note


# ----------------------------------------------------------------------------------------------- evaluation


class Validator:
    """jobs.common.validation_loss on batches read once, with one compiled eval step per model config."""

    def __init__(self, config) -> None:
        self.batches = list(common.validation_batches(config))
        if not self.batches:
            raise ValueError("config.eval: the validation split gave no batches")
        self._compiled: dict[Any, Any] = {}

    def __call__(self, model: Model) -> float:
        run = self._compiled.get(model.config)
        if run is None:
            run = self._compiled[model.config] = jax.jit(eval_step(lm_loss(model.config)))
        nll_sum, tokens = 0.0, 0.0
        for batch in self.batches:
            metrics = jax.device_get(run(model.params, batch))
            nll_sum += float(metrics["nll"]) * float(metrics["tokens"])
            tokens += float(metrics["tokens"])
        return nll_sum / tokens


# -------------------------------------------------------------------------------------------------- helpers


def width_targets(config) -> dict[str, Any]:
    return minitron.prune_targets(config)


def depth_match(teacher: Model, scores, params_goal: int) -> tuple[Model, int]:
    """Depth-pruned teacher (lowest-BI layers dropped) whose parameter count is closest to params_goal."""
    best = None
    for n in range(teacher.config.num_layers - 1, 0, -1):
        candidate = prune(teacher, scores, layers=n)
        gap = abs(candidate.num_params - params_goal)
        if best is None or gap < best[0]:
            best = (gap, candidate, n)
        if candidate.num_params < params_goal:
            break
    return best[1], best[2]


def unbalanced_layers(teacher: Model, scores, mamba_heads: int) -> list[int]:
    """Mamba layers whose global top-k heads are not k/G per group (where group_aware matters)."""
    m = teacher.config.mamba
    out = []
    for i, kind in enumerate(teacher.config.pattern):
        if kind != "M":
            continue
        s = np.asarray(scores[f"layers_{i}/mamba_heads"], np.float64)
        top = np.argsort(-s, kind="stable")[:mamba_heads]
        counts = np.bincount(top // (m.num_heads // m.n_groups), minlength=m.n_groups)
        if np.any(counts != mamba_heads // m.n_groups):
            out.append(i)
    return out


def claim(name: str, text: str, winner: str, loser: str, winner_loss: float, loser_loss: float,
          **extra) -> dict[str, Any]:
    margin = loser_loss - winner_loss
    return {"claim": name, "text": text, "winner": winner, "loser": loser, "winner_loss": winner_loss,
            "loser_loss": loser_loss, "margin": margin, "relative_margin": margin / loser_loss,
            "held": bool(margin > 0), **extra}


# ------------------------------------------------------------------------------------------------------ plot


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    arms = report["arms"]
    names = list(arms)
    final = [arms[n]["val_loss"] for n in names]
    zero = [arms[n].get("zero_shot_loss", np.nan) for n in names]
    x = np.arange(len(names))
    left.bar(x - 0.2, zero, 0.4, label="before training (zero-shot)", color="#bbbbbb")
    left.bar(x + 0.2, final, 0.4, label=f"after {report['settings']['steps']} steps", color="#3a7bd5")
    left.axhline(report["teacher"]["val_loss"], color="k", ls="--", lw=1, label="teacher")
    left.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    left.set(ylabel="validation loss (nats/byte)", title="arms (same tokens, same validation batches)")
    finite = [v for v in zero + final if np.isfinite(v)]
    left.set_ylim(0.9 * min(finite + [report["teacher"]["val_loss"]]), 1.05 * max(finite))
    left.legend(fontsize=8)
    agg = report["aggregation"]
    keys = list(agg["per_agg"])
    means = [agg["per_agg"][k]["mean"] for k in keys]
    spread = [agg["per_agg"][k]["std"] for k in keys]
    colors = ["#d55e00" if k == PAPER_AGG else "#3a7bd5" for k in keys]
    right.bar(np.arange(len(keys)), means, yerr=spread, color=colors, capsize=3)
    right.set_xticks(np.arange(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    right.set_ylim(0.95 * min(means), 1.03 * max(means))
    right.set(ylabel="zero-shot validation loss",
              title=f"(e) aggregation seq_batch, {agg['seeds']} calibration seed(s)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- table


def summary_block(report: dict) -> str:
    s = report["settings"]
    t = report["teacher"]
    lines = [
        "=" * 100,
        f"Minitron ablations: teacher {report['teacher_path']} ({t['params'] / 1e6:.2f}M params, val loss "
        f"{t['val_loss']:.3f} nats/byte, {report['teacher_note']})",
        f"every trained arm: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens "
        f"({s['steps'] * s['batch_size'] * s['seq_len']:,} tokens), same batches and AdamW schedule; validation "
        f"{s['eval']['batches']} x {s['eval']['batch_size']} x {s['eval']['seq_len']} tokens, the same for all",
        "",
        f"{'arm':28} {'params':>11} {'zero-shot':>10} {'final':>8} {'train s':>8}  pattern",
    ]
    for name, a in report["arms"].items():
        zero = a.get("zero_shot_loss")
        zero_s = "-" if zero is None else f"{zero:.3f}"
        lines.append(f"{name:28} {a['params']:>11,} {zero_s:>10} {a['val_loss']:>8.3f} {a['seconds']:>8.1f}  "
                     f"{a['pattern']}")
    lines += ["", f"{'claim':5} {'held':5} {'winner':>8} {'loser':>8} {'margin':>8} {'rel':>7}  statement"]
    for c in report["claims"]:
        lines.append(f"{'(' + c['claim'] + ')':5} {'YES' if c['held'] else 'NO':5} {c['winner_loss']:>8.3f} "
                     f"{c['loser_loss']:>8.3f} {c['margin']:>+8.3f} {100 * c['relative_margin']:>+6.1f}%  "
                     f"{c['text']}")
    agg = report["aggregation"]
    lines += ["", f"(e) zero-shot val loss per aggregation (mean +- std over {agg['seeds']} calibration seed(s)):"]
    ranked = sorted(agg["per_agg"].items(), key=lambda kv: kv[1]["mean"])
    for rank, (k, v) in enumerate(ranked, 1):
        mark = "  <- paper's recipe" if k == PAPER_AGG else ""
        lines.append(f"    {rank}. {k:10} {v['mean']:.3f} +- {v['std']:.3f}{mark}")
    lines += ["", f"(c) Mamba layers where the global top-k is unbalanced over groups (group_aware matters): "
              f"{report['group_unbalanced_layers']}",
              f"claims held: {sum(c['held'] for c in report['claims'])} / {len(report['claims'])}; "
              f"total {report['seconds']:.0f} s", "=" * 100]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps of 4 x 64 tokens, tiny "
                        "calibration and validation, one calibration seed")
    parser.add_argument("--steps", type=int, help="training steps per arm (default 40; 4 with --quick)")
    parser.add_argument("--seeds", type=int, help="calibration seeds for the aggregation ablation (default 2; 1 "
                        "with --quick)")
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="teacher checkpoint (default runs/demo)")
    parser.add_argument("--out", help="output JSON (default runs/minitron_ablations.json, ..._quick.json)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else REPO_ROOT / "runs" / f"minitron_ablations{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    s = settings(args.quick, args.steps, args.seeds)
    config = compress_config(s)
    dcfg = common.data_config(config)
    dist_cfg = minitron.distill_config(config)

    teacher, note = load_teacher(Path(args.teacher), args.quick)
    validate = Validator(config)
    teacher_loss = validate(teacher)
    print(f"teacher: {teacher.num_params:,} params, val loss {teacher_loss:.3f} ({note})")

    # importance for every aggregation (seed 0 of the calibration = the config's seed); mean_l2 drives the arms
    targets = width_targets(config)
    agg_losses: dict[str, list[float]] = {k: [] for k in AGGS}
    paper_scores = None
    for seed in range(s["seeds"]):
        cal = config.copy_and_resolve_references()
        cal.calibration.seed = int(config.calibration.seed) + seed
        for agg in AGGS:
            t0 = time.perf_counter()
            scores = importance(teacher, common.calibration_batches(cal), agg=agg, layer_metrics=("block",))
            if agg == PAPER_AGG and seed == 0:
                paper_scores = scores
            agg_losses[agg].append(validate(prune(teacher, scores, **targets)))
            print(f"(e) seed {seed} agg {agg:8}: zero-shot {agg_losses[agg][-1]:.3f} "
                  f"({time.perf_counter() - t0:.1f} s)")

    arms: dict[str, dict[str, Any]] = {}

    def record(name: str, student: Model, zero: float | None, trained: Model, seconds: float) -> None:
        arms[name] = {"params": trained.num_params, "pattern": trained.config.pattern,
                      "zero_shot_loss": zero, "val_loss": validate(trained), "seconds": seconds}
        print(f"arm {name:28}: {trained.num_params:,} params, zero-shot "
              f"{'-' if zero is None else f'{zero:.3f}'}, final {arms[name]['val_loss']:.3f} ({seconds:.1f} s)")

    def run_kd(student: Model) -> tuple[Model, float]:
        t0 = time.perf_counter()
        model, _ = distill(student, teacher, dcfg, config=dist_cfg)
        return model, time.perf_counter() - t0

    def run_lm(student: Model) -> tuple[Model, float]:
        t0 = time.perf_counter()
        model = teacher_correction(student, dcfg, dist_cfg.steps, optimizer=dist_cfg.optimizer,
                                   batch_size=dist_cfg.batch_size, seq_len=dist_cfg.seq_len, seed=dist_cfg.seed)
        return model, time.perf_counter() - t0

    width = prune(teacher, paper_scores, **targets)
    width_zero = validate(width)
    record("width + KD", width, width_zero, *run_kd(width))
    record("width + LM only", width, width_zero, *run_lm(width))
    random = Model.init(width.config, 0)
    record("random init + LM", random, validate(random), *run_lm(random))
    depth, depth_layers = depth_match(teacher, paper_scores, width.num_params)
    record(f"depth ({depth_layers} layers) + KD", depth, validate(depth), *run_kd(depth))
    unconstrained = prune(teacher, paper_scores, **targets, group_aware=False)
    unbalanced = unbalanced_layers(teacher, paper_scores, targets["mamba_heads"])
    record("width unconstrained + KD", unconstrained, validate(unconstrained), *run_kd(unconstrained))

    a = {k: v["val_loss"] for k, v in arms.items()}
    z = {k: v["zero_shot_loss"] for k, v in arms.items()}
    depth_name = f"depth ({depth_layers} layers) + KD"
    claims = [
        claim("a", "prune + KD beats random init + LM on the same tokens", "width + KD", "random init + LM",
              a["width + KD"], a["random init + LM"]),
        claim("b", "width beats depth at ~equal params, both distilled", "width + KD", depth_name,
              a["width + KD"], a[depth_name],
              params={"width": arms["width + KD"]["params"], "depth": arms[depth_name]["params"]},
              zero_shot={"width": z["width + KD"], "depth": z[depth_name]}),
        claim("c", "group-aware Mamba heads beat unconstrained (after KD)", "width + KD",
              "width unconstrained + KD", a["width + KD"], a["width unconstrained + KD"],
              zero_shot={"group_aware": z["width + KD"], "unconstrained": z["width unconstrained + KD"],
                         "margin": z["width unconstrained + KD"] - z["width + KD"]},
              unbalanced_layers=unbalanced),
        claim("c0", "group-aware Mamba heads beat unconstrained (zero-shot)", "width (pruned)",
              "width unconstrained (pruned)", z["width + KD"], z["width unconstrained + KD"]),
        claim("d", "logit KD beats LM-only retraining of the same pruned model", "width + KD", "width + LM only",
              a["width + KD"], a["width + LM only"]),
    ]
    per_agg = {k: {"losses": v, "mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in agg_losses.items()}
    others = min(v["mean"] for k, v in per_agg.items() if k != PAPER_AGG)
    best = min(per_agg, key=lambda k: per_agg[k]["mean"])
    claims.append(claim("e", f"{PAPER_AGG} gives the lowest zero-shot loss of the 9 aggregations (best: {best})",
                        PAPER_AGG, "best other", per_agg[PAPER_AGG]["mean"], others,
                        rank=1 + sorted(per_agg, key=lambda k: per_agg[k]["mean"]).index(PAPER_AGG)))

    report = {
        "quick": args.quick, "teacher_path": str(args.teacher), "teacher_note": note,
        "teacher": {"params": teacher.num_params, "val_loss": teacher_loss},
        "settings": {**s, "targets": targets, "lr": dist_cfg.optimizer.lr, "kd": "forward KL on logits, T=1",
                     "compress_config": str(COMPRESS_CONFIG.relative_to(REPO_ROOT))},
        "arms": arms, "claims": claims,
        "aggregation": {"seeds": s["seeds"], "target": targets, "per_agg": per_agg},
        "group_unbalanced_layers": unbalanced, "seconds": time.perf_counter() - start,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(summary_block(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
