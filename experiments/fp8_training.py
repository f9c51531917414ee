"""FP8-recipe training of the small hybrid against bfloat16 training over the demo budget (issue acceptance point 5).

    .venv/bin/python experiments/fp8_training.py                 # the demo budget: 240 steps of 8 x 256 bytes
    .venv/bin/python experiments/fp8_training.py --quick         # smoke run: a small model, 30 steps of 4 x 128
    options: --steps N   --nvfp4 (adds an nvfp4_training arm, ~3x slower)   --sequential   --out DIR

What it runs: the library's trainer (`nemojax train`, one subprocess per arm, workdirs under runs/fp8_training/) on
configs/small_hybrid.py with its demo settings (AdamW 2e-3, WSD schedule, z-loss, seed 0, the same batches in the
same order) and float32 master params, changing only
  - bf16:  `model.runtime.dtype=bfloat16` (activations and GEMMs in bfloat16 compute, float32 params);
  - fp8:   the same, plus `train.low_precision=fp8_training` (quant.named_recipes.fp8_training): the fprop, dgrad
           and wgrad GEMMs of every linear layer on E4M3 weights/activations and E5M2 gradients with per-tensor
           current scaling, emulated as quantize -> dequantize -> float32 dot (nemojax.lowp.matmul); the first
           and the last layer of the pattern and lm_head stay in bfloat16;
  - nvfp4 (only with --nvfp4, reported separately): `train.low_precision=nvfp4_training` (16x16 weight blocks, 1x16
           activations/gradients, stochastic rounding of gradients, RHT on the wgrad inputs, last 15% of layers and
           lm_head high precision).
and for bookkeeping only: the training loss logged every step (`train.log_every=1`) and one checkpoint at the end.
Validation (8 batches x 8 x 256 held-out bytes, every 60 steps) runs each arm's own forward, i.e. the FP8 arm is
scored with its FP8 forward. By default the arms run at the same time (two processes): on a shared CPU they then
see the same load, which keeps the wall-time comparison fair, and the pair finishes sooner; --sequential runs
them one after the other.

Acceptance criteria, fixed before the first run (FP8 vs bf16; "gap" = (loss_fp8 - loss_bf16) / loss_bf16):
  (1) final validation loss: |gap| <= 2%   (Nemotron-H reports FP8 matching or slightly beating BF16);
  (2) training loss: the mean |gap| of the smoothed curves over the last half of the steps <= 2%, smoothing =
      a trailing moving average over max(5, steps // 12) steps (20 at the demo's 240).
Both must hold for the verdict "tracks". The NVFP4 arm, when run, is measured the same way against bf16 and
against FP8; the paper's figure (arXiv 2509.25149: relative loss error vs FP8 under ~1.5%) is printed beside it
but is not part of the verdict.

Timing: wall time of each arm's process (start-up, compilation, training, validation, the final checkpoint); the
first step (compilation + one step); the median time of the remaining steps (from the trainer's per-step
tokens/s). The emulation slowdown is the FP8 arm's median step time over bf16's. FP8 emulation on a CPU is
*slower* than bf16 by construction (extra quantize/dequantize passes and float32 GEMMs), the opposite of FP8 on
tensor cores; it measures the cost of the emulation, not of FP8.

Measured on the 2-core CPU shared with other jobs (load average 4-9): the default run took 32 min (the two arms at
once, ~6.3 s per step each; about 20 min at load ~4), --quick 1.6 min.

Writes runs/fp8_training/results.json and results.png (results_quick.* with --quick), prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
from nemojax.model import abstract_params  # noqa: E402
from nemojax.train import loop  # noqa: E402
from nemojax.train.metrics import read_metrics  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "small_hybrid.py"
DEFAULT_OUT = REPO_ROOT / "runs" / "fp8_training"
VAL_GAP_BOUND = 0.02
TRAIN_GAP_BOUND = 0.02
NVFP4_PAPER_GAP_VS_FP8 = 0.015
ARMS = {"bf16": "", "fp8": "fp8_training", "nvfp4": "nvfp4_training"}
POLL_S = 30.0

# --quick: a ~0.5M-parameter hybrid with the same layer kinds (7 layers, so 5 are FP8 between the kept first/last)
QUICK_MODEL = {
    "hidden_size": 128, "pattern": "M-M*-M-", "intermediate_size": 384,
    "mamba.num_heads": 4, "mamba.head_dim": 32, "mamba.state_size": 16, "mamba.n_groups": 2, "mamba.chunk_size": 32,
    "attention.num_heads": 2, "attention.num_kv_heads": 1, "attention.head_dim": 64,
}


# --------------------------------------------------------------------------------------------------- settings


def settings(quick: bool, steps: int | None) -> dict[str, Any]:
    """The training budget and the bookkeeping of every arm (the model is configs/small_hybrid.py's unless quick)."""
    base = config_files.load(CONFIG)
    t = base.train
    if quick:
        s = {"steps": 30, "batch_size": 4, "seq_len": 128, "eval_batches": 2, "warmup_steps": 5,
             "model": dict(QUICK_MODEL)}
    else:
        s = {"steps": t.steps, "batch_size": t.batch_size, "seq_len": t.seq_len, "eval_batches": t.eval_batches,
             "warmup_steps": base.optimizer.warmup_steps, "model": {}}
    if steps is not None:
        if steps < 2:
            raise SystemExit(f"--steps {steps}: at least 2 steps are needed")
        s["steps"] = steps
        s["warmup_steps"] = min(s["warmup_steps"], max(1, steps // 10))
    n = s["steps"]
    s["eval_every"] = t.eval_every if (not quick and n == t.steps) else max(1, n // 4)
    s["smooth_window"] = max(5, n // 12)
    s["demo_budget"] = not quick and n == t.steps
    return s


def overrides(s: dict[str, Any], recipe: str) -> list[str]:
    """Dotted config overrides of one arm: bfloat16 compute, the recipe, the budget and per-step logging."""
    out = ["model.runtime.dtype=bfloat16", "model.runtime.param_dtype=float32",
           f"train.low_precision={recipe}", f"train.steps={s['steps']}", f"train.batch_size={s['batch_size']}",
           f"train.seq_len={s['seq_len']}", f"train.eval_batches={s['eval_batches']}",
           f"train.eval_every={s['eval_every']}", "train.log_every=1", f"train.checkpoint_every={s['steps']}",
           "train.keep_checkpoints=1", f"optimizer.warmup_steps={s['warmup_steps']}"]
    out += [f"model.overrides.{k}={v!r}" if isinstance(v, str) else f"model.overrides.{k}={v}"
            for k, v in s["model"].items()]
    return out


def describe_arm(s: dict[str, Any], recipe: str) -> dict[str, Any]:
    """The arm's model config facts: compute dtype, parameter count inputs, and which layers the recipe quantizes."""
    config = config_files.load(CONFIG, overrides(s, recipe))
    mcfg = loop.model_config(config)
    runtime = mcfg.runtime
    out = {"recipe": recipe or None, "dtype": runtime.dtype, "param_dtype": runtime.param_dtype,
           "pattern": mcfg.pattern}
    if runtime.quant is not None:
        kept = sorted(runtime.quant.kept_layers(mcfg.pattern))
        out["high_precision_layers"] = kept
        out["quantized_layers"] = [i for i in range(len(mcfg.pattern)) if i not in kept]
        out["quant"] = runtime.quant.to_dict()
    return out


# ------------------------------------------------------------------------------------------------------ runs


def launch(name: str, s: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen, float, Any]:
    """Starts `nemojax train` for one arm in a fresh workdir (the trainer would otherwise resume)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "nemojax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
           "--no-progress"] + [f"--config.{o}" for o in overrides(s, ARMS[name])]
    (workdir / "command.txt").write_text(" ".join(cmd) + "\n")
    log = open(workdir / "log.txt", "w")  # noqa: SIM115  (closed in wait_all)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"[{name}] started: nemojax train ... --config.train.low_precision={ARMS[name]!r} -> {workdir}",
          flush=True)
    return proc, time.perf_counter(), log


def last_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().strip().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def wait_all(running: dict[str, tuple[subprocess.Popen, float, Any]], workdirs: dict[str, Path],
             steps: int) -> dict[str, float]:
    """Waits for the arms, printing their progress every POLL_S seconds; returns each arm's wall seconds."""
    walls: dict[str, float] = {}
    while len(walls) < len(running):
        for name, (proc, start, log) in running.items():
            if name not in walls and proc.poll() is not None:
                walls[name] = time.perf_counter() - start
                log.close()
                if proc.returncode:
                    tail = (workdirs[name] / "log.txt").read_text()[-3000:]
                    raise SystemExit(f"[{name}] nemojax train failed (exit {proc.returncode}):\n{tail}")
                print(f"[{name}] done in {walls[name]:.0f} s", flush=True)
        if len(walls) < len(running):
            busy = [f"{n} {last_step(workdirs[n])}/{steps}" for n in running if n not in walls]
            print(f"  ... {', '.join(busy)} (load {os.getloadavg()[0]:.1f})", flush=True)
            for _ in range(int(POLL_S / 0.5)):
                if any(proc.poll() is not None for n, (proc, _, _) in running.items() if n not in walls):
                    break
                time.sleep(0.5)
    return walls


# -------------------------------------------------------------------------------------------------- analysis


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def arm_metrics(workdir: Path, batch_tokens: int, window: int) -> dict[str, Any]:
    history = read_metrics(workdir)
    train = sorted((m for m in history if m["split"] == "train"), key=lambda m: m["step"])
    train = list({m["step"]: m for m in train}.values())  # one record per step
    val = sorted({m["step"]: m for m in history if m["split"] == "validation"}.items())
    steps = np.array([m["step"] for m in train])
    loss = np.array([m["loss"] for m in train])
    step_s = np.array([batch_tokens / m["tokens_per_s"] for m in train])
    return {
        "steps": steps.tolist(), "train_loss": loss.tolist(), "train_loss_smoothed": smooth(loss, window).tolist(),
        "grad_norm": [m["grad_norm"] for m in train], "step_s": step_s.tolist(),
        "validation": {int(k): v["loss"] for k, v in val},
        "first_train_loss": float(loss[0]), "final_train_loss": float(loss[-1]),
        "final_train_loss_smoothed": float(smooth(loss, window)[-1]),
        "final_validation_loss": val[-1][1]["loss"] if val else None,
        "first_step_s": float(step_s[0]), "median_step_s": float(np.median(step_s[1:])) if len(step_s) > 1 else None,
    }


def gaps(q: dict[str, Any], ref: dict[str, Any], steps: int) -> dict[str, Any]:
    """Relative gaps (q - ref) / ref of the validation losses and of the smoothed training curves."""
    if q["steps"] != ref["steps"]:
        raise ValueError(f"the arms logged different steps: {q['steps'][:5]}... vs {ref['steps'][:5]}...")
    rel = np.asarray(q["train_loss_smoothed"]) / np.asarray(ref["train_loss_smoothed"]) - 1.0
    raw = np.asarray(q["train_loss"]) / np.asarray(ref["train_loss"]) - 1.0
    half = np.asarray(q["steps"]) > steps / 2
    val = {k: q["validation"][k] / ref["validation"][k] - 1.0 for k in ref["validation"] if k in q["validation"]}
    return {
        "train_rel_gap_smoothed": rel.tolist(),
        "train_mean_abs_gap_last_half": float(np.mean(np.abs(rel[half]))),
        "train_mean_gap_last_half": float(np.mean(rel[half])),
        "train_max_abs_gap_last_half": float(np.max(np.abs(rel[half]))),
        "train_raw_mean_abs_gap_last_half": float(np.mean(np.abs(raw[half]))),
        "first_step_gap": float(raw[0]),
        "validation_rel_gap": val,
        "final_validation_gap": val[max(val)] if val else None,
    }


def verdict(g: dict[str, Any]) -> dict[str, Any]:
    val_ok = g["final_validation_gap"] is not None and abs(g["final_validation_gap"]) <= VAL_GAP_BOUND
    train_ok = g["train_mean_abs_gap_last_half"] <= TRAIN_GAP_BOUND
    return {"final_validation_within_bound": bool(val_ok), "train_curve_within_bound": bool(train_ok),
            "tracks": bool(val_ok and train_ok)}


# ------------------------------------------------------------------------------------------------------ plot


COLORS = {"bf16": "#1f77b4", "fp8": "#d62728", "nvfp4": "#2ca02c"}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    w = report["settings"]["smooth_window"]
    for name, a in report["arms"].items():
        c = COLORS[name]
        top.plot(a["steps"], a["train_loss"], color=c, alpha=0.25, lw=0.8)
        top.plot(a["steps"], a["train_loss_smoothed"], color=c, lw=1.8, label=f"{name} train ({w}-step mean)")
        v = sorted(a["validation"].items())
        top.plot([k for k, _ in v], [x for _, x in v], "o--", color=c, ms=5, lw=1, label=f"{name} validation")
    top.set(ylabel="loss (nats/byte)", title=f"{report['model']}, {report['settings']['steps']} steps x "
            f"{report['settings']['batch_size']} x {report['settings']['seq_len']} bytes: bf16 vs FP8 recipe")
    lo = min(min(a["train_loss_smoothed"]) for a in report["arms"].values())
    top.set_ylim(0.95 * lo, min(4.0, max(a["train_loss_smoothed"][0] for a in report["arms"].values())))
    top.legend(fontsize=8, ncol=2)
    steps = report["settings"]["steps"]
    for name, g in report["gaps"].items():
        q = name.split("_vs_")[0]
        ref = name.split("_vs_")[1]
        ls = "-" if ref == "bf16" else ":"
        a = report["arms"][q]
        bottom.plot(a["steps"], 100 * np.asarray(g["train_rel_gap_smoothed"]), ls, color=COLORS[q],
                    label=f"{q} vs {ref}: smoothed train")
        v = sorted(g["validation_rel_gap"].items())
        bottom.plot([k for k, _ in v], [100 * x for _, x in v], "s", color=COLORS[q], ms=6,
                    mfc="none" if ref != "bf16" else COLORS[q], label=f"{q} vs {ref}: validation")
    for b in (VAL_GAP_BOUND, -VAL_GAP_BOUND):
        bottom.axhline(100 * b, color="k", ls="--", lw=0.8)
    bottom.axhline(0, color="k", lw=0.5)
    bottom.axvspan(steps / 2, steps, color="0.9", zorder=0, label="last half (criterion 2)")
    bottom.set(xlabel="step", ylabel="relative gap (%)", title=f"(loss - reference) / reference; bound "
               f"+-{100 * VAL_GAP_BOUND:.0f}%")
    bottom.legend(fontsize=8, ncol=2)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- summary


def summary_block(report: dict[str, Any]) -> str:
    s = report["settings"]
    budget = "the demo budget" if s["demo_budget"] else "NOT the demo budget (240 steps)"
    lines = [
        "=" * 100,
        f"FP8-recipe training vs bf16: {report['model']}, {report['params']:,} params, {s['steps']} steps x "
        f"{s['batch_size']} x {s['seq_len']} bytes = {s['steps'] * s['batch_size'] * s['seq_len']:,} tokens "
        f"({budget}); seed 0, same batches; {'concurrent' if report['concurrent'] else 'sequential'} arms",
        f"FP8 layers: {report['arms_config']['fp8'].get('quantized_layers')} of pattern "
        f"{report['arms_config']['fp8']['pattern']} (kept bf16: "
        f"{report['arms_config']['fp8'].get('high_precision_layers')} and lm_head)",
        "",
        f"{'arm':6} {'loss@1':>7} {'train':>7} {'train~':>7} {'val':>7}   {'wall s':>7} {'1st step s':>10} "
        f"{'median step s':>13}  {'x bf16':>6}",
    ]
    base_step = report["arms"]["bf16"]["median_step_s"]
    for name, a in report["arms"].items():
        lines.append(f"{name:6} {a['first_train_loss']:7.4f} {a['final_train_loss']:7.4f} "
                     f"{a['final_train_loss_smoothed']:7.4f} {a['final_validation_loss']:7.4f}   {a['wall_s']:7.0f} "
                     f"{a['first_step_s']:10.1f} {a['median_step_s']:13.2f}  {a['median_step_s'] / base_step:6.2f}")
    lines += ["  (loss@1: the first step's loss, same params and batch, so it isolates the quantized forward; "
              "train: last step; train~: smoothed)", ""]
    for name, g in report["gaps"].items():
        val = ", ".join(f"{k}: {100 * v:+.2f}%" for k, v in sorted(g["validation_rel_gap"].items()))
        lines += [f"{name}: validation gap per eval step {val}",
                  "    smoothed train gap over the last half: mean |gap| "
                  f"{100 * g['train_mean_abs_gap_last_half']:.2f}%"
                  f" (signed mean {100 * g['train_mean_gap_last_half']:+.2f}%, max |gap| "
                  f"{100 * g['train_max_abs_gap_last_half']:.2f}%; unsmoothed mean |gap| "
                  f"{100 * g['train_raw_mean_abs_gap_last_half']:.2f}%); step-1 gap {100 * g['first_step_gap']:+.2f}%"]
    v = report["verdict"]
    g = report["gaps"]["fp8_vs_bf16"]
    lines += ["",
              f"criterion (1) |final val gap| <= {100 * VAL_GAP_BOUND:.0f}%: "
              f"{100 * abs(g['final_validation_gap']):.2f}%"
              f" -> {'HELD' if v['final_validation_within_bound'] else 'FAILED'}",
              f"criterion (2) mean |smoothed train gap| over the last half <= {100 * TRAIN_GAP_BOUND:.0f}%: "
              f"{100 * g['train_mean_abs_gap_last_half']:.2f}% -> "
              f"{'HELD' if v['train_curve_within_bound'] else 'FAILED'}",
              f"verdict: FP8-recipe training {'TRACKS' if v['tracks'] else 'DOES NOT TRACK'} bf16 within the stated "
              f"gap over {s['steps']} steps"]
    if "nvfp4_vs_fp8" in report["gaps"]:
        n = report["gaps"]["nvfp4_vs_fp8"]["final_validation_gap"]
        lines.append(f"nvfp4 (separate, not in the verdict): final val gap vs FP8 {100 * n:+.2f}% (paper: under "
                     f"~{100 * NVFP4_PAPER_GAP_VS_FP8:.1f}% at 10T tokens)")
    lines += [f"FP8 emulation slowdown (median step time vs bf16): {report['slowdown']['fp8']:.2f}x; total "
              f"{report['seconds']:.0f} s; load average before {report['load_before'][0]:.1f}, after "
              f"{report['load_after'][0]:.1f}", "=" * 100]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (< 2 min): a ~0.5M-param hybrid, 30 steps "
                        "of 4 x 128 bytes")
    parser.add_argument("--steps", type=int, help="training steps per arm (default: the demo's 240; 30 with --quick)")
    parser.add_argument("--nvfp4", action="store_true", help="also train with nvfp4_training (reported separately)")
    parser.add_argument("--sequential", action="store_true", help="run the arms one after another, not at once")
    parser.add_argument("--out", help="output folder (default runs/fp8_training)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from experiments.bench_forward import environment

    threads = len(os.sched_getaffinity(0))
    env, load_before = environment(threads)
    s = settings(args.quick, args.steps)
    out_dir = Path(args.out) if args.out else DEFAULT_OUT
    suffix = "_quick" if args.quick else ""
    names = ["bf16", "fp8"] + (["nvfp4"] if args.nvfp4 else [])
    workdirs = {n: out_dir / f"{n}{suffix}" for n in names}
    arms_config = {n: describe_arm(s, ARMS[n]) for n in names}
    print(f"settings: {json.dumps({k: v for k, v in s.items() if k != 'model'})}; model overrides {s['model']}")
    print(f"fp8_training quantizes layers {arms_config['fp8']['quantized_layers']} of "
          f"{arms_config['fp8']['pattern']}")

    walls: dict[str, float] = {}
    if args.sequential:
        for n in names:
            walls.update(wait_all({n: launch(n, s, workdirs[n])}, workdirs, s["steps"]))
    else:
        walls = wait_all({n: launch(n, s, workdirs[n]) for n in names}, workdirs, s["steps"])

    batch_tokens = s["batch_size"] * s["seq_len"]
    arms = {n: {**arm_metrics(workdirs[n], batch_tokens, s["smooth_window"]), "wall_s": walls[n],
                "workdir": str(workdirs[n])} for n in names}
    g = {"fp8_vs_bf16": gaps(arms["fp8"], arms["bf16"], s["steps"])}
    if args.nvfp4:
        g["nvfp4_vs_bf16"] = gaps(arms["nvfp4"], arms["bf16"], s["steps"])
        g["nvfp4_vs_fp8"] = gaps(arms["nvfp4"], arms["fp8"], s["steps"])
    mcfg = loop.model_config(config_files.load(CONFIG, overrides(s, "")))
    report = {
        "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
        "config": str(CONFIG.relative_to(REPO_ROOT)),
        "model": "configs/small_hybrid.py" if not args.quick else "quick hybrid (" + mcfg.pattern + ")",
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(mcfg)))),
        "settings": s, "concurrent": not args.sequential,
        "criteria": {"final_validation_abs_rel_gap_max": VAL_GAP_BOUND,
                     "train_smoothed_mean_abs_rel_gap_last_half_max": TRAIN_GAP_BOUND,
                     "smoothing": f"trailing moving average over {s['smooth_window']} steps",
                     "nvfp4_paper_gap_vs_fp8": NVFP4_PAPER_GAP_VS_FP8},
        "arms_config": arms_config, "arms": arms, "gaps": g, "verdict": verdict(g["fp8_vs_bf16"]),
        "slowdown": {n: arms[n]["median_step_s"] / arms["bf16"]["median_step_s"] for n in names if n != "bf16"},
        "wall_slowdown": {n: walls[n] / walls["bf16"] for n in names if n != "bf16"},
        "env": env, "load_before": list(load_before),
        "load_after": list(os.getloadavg()), "seconds": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results{suffix}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, path.with_suffix(".png"))
    print(summary_block(report))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
