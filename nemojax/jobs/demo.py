"""`nemojax demo`, the main job: train the small hybrid, then compress it (Minitron prune + distill) and quantize it
(NVFP4 PTQ + QAD), printing a table and drawing a figure for each stage.

    run_demo("runs/demo", "configs/small_hybrid.py", compress_config="configs/minitron_small.py",
             quant_config="configs/nvfp4_qad.py")
        -> runs/demo/ (the training workdir, loss.png), runs/demo/minitron/, runs/demo/nvfp4/
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from nemojax import config_files, data
from nemojax.jobs import minitron, quantize
from nemojax.jobs.figures import stage_figure
from nemojax.model import Model
from nemojax.train.loop import train
from nemojax.train.metrics import read_metrics


def run_demo(workdir: str | Path, config: str, overrides: Sequence[str] = (), *, compress_config: str | None,
             compress_overrides: Sequence[str] = (), quant_config: str | None, quant_overrides: Sequence[str] = (),
             progress: bool = True) -> None:
    """Trains `config` (a config file, with dotted `overrides`) in `workdir` (resuming if a checkpoint is there),
    then runs the compression stage (unless `compress_config` is None) and the quantization stage (unless
    `quant_config` is None) on the trained model, each in its own folder under workdir."""
    train_config = config_files.load(config, list(overrides))
    workdir = Path(workdir)
    print(f"demo: training {config} in {workdir} (resumes if a checkpoint is there)")
    result = train(train_config, workdir, progress=progress)
    summary = result["summary"]
    entropy = data.corpus_unigram_entropy(data.DataConfig(**train_config.data.to_dict()), split="validation")
    val = summary["validation_loss"]
    print(f"\n{summary['params']:,}-parameter hybrid, {summary['steps']} steps of "
          f"{train_config.train.batch_size} x {train_config.train.seq_len} tokens")
    print(f"validation loss {val:.3f} nats/token vs the corpus' unigram entropy {entropy:.3f} "
          f"({val / entropy:.0%} of it); perplexity {math.exp(val):.2f}")
    print(f"metrics: {workdir / 'metrics.jsonl'}, TensorBoard: {workdir / 'tensorboard'}, "
          f"loss curve: {workdir / 'loss.png'}")
    if compress_config is not None:
        compress_stage(compress_config, compress_overrides, train_config, workdir, result["model"], entropy,
                       progress=progress)
    if quant_config is not None:
        quantize_stage(quant_config, quant_overrides, train_config, workdir, result["model"], entropy,
                       progress=progress)


def compress_stage(path: str, overrides: Sequence[str], train_config: ml_collections.ConfigDict, workdir: Path,
                   teacher: Model, entropy: float, *, progress: bool = True) -> None:
    """The demo's second stage, in workdir/minitron: prune the trained model to about half and distill it back."""
    config = config_files.load(path, list(overrides))
    config.data = train_config.data  # the teacher's own data
    out = workdir / "minitron"
    print(f"\ncompression: Minitron pruning + distillation of the trained model ({path}) in {out}")
    start = time.perf_counter()
    pruned = minitron.prune_job(config, teacher, out, teacher_path=workdir)
    print(f"pruned {pruned['teacher']['params']:,} -> {pruned['pruned']['params']:,} parameters "
          f"({minitron.size_change(pruned['teacher'], pruned['pruned'])}) in {pruned['seconds']:.0f} s")
    summary = minitron.distill_job(config, teacher, out, teacher_path=workdir, progress=progress)
    print(f"distilled for {summary['steps']} steps in {summary['seconds']:.0f} s; "
          f"compression stage {time.perf_counter() - start:.0f} s in all\n")
    print(minitron.table([("teacher", summary["teacher"]["params"], summary["teacher"]["val_loss"]),
                          ("pruned", summary["pruned"]["params"], summary["pruned"]["val_loss"]),
                          ("pruned + distilled", summary["distilled"]["params"], summary["distilled"]["val_loss"])],
                         entropy))
    figure = _stage_figure(out / "compression.png", "Minitron: prune to about half, then distill", [
        ("teacher", summary["teacher"]["val_loss"], f"{summary['teacher']['params'] / 1e6:.1f}M params"),
        ("pruned", summary["pruned"]["val_loss"], f"{summary['pruned']['params'] / 1e6:.1f}M params"),
        ("pruned + distilled", summary["distilled"]["val_loss"], f"{summary['distilled']['params'] / 1e6:.1f}M params"),
    ], out, "distill", "KL to the teacher (nats/token)", entropy)
    print(f"checkpoints: {out / minitron.PRUNED_DIR}, {out / minitron.DISTILLED_DIR} "
          f"(nemojax generate --checkpoint {out / minitron.DISTILLED_DIR} --tokenizer byte --prompt ...); "
          f"figure: {figure}")


def quantize_stage(path: str, overrides: Sequence[str], train_config: ml_collections.ConfigDict, workdir: Path,
                   teacher: Model, entropy: float, *, progress: bool = True) -> None:
    """The demo's third stage, in workdir/nvfp4: post-training quantization, then quantization-aware
    distillation."""
    config = config_files.load(path, list(overrides))
    config.data = train_config.data
    out = workdir / "nvfp4"
    print(f"\nquantization: {config.recipe} PTQ + QAD of the trained model ({path}) in {out}")
    start = time.perf_counter()
    ptq = quantize.quantize_job(config, teacher, out, teacher_path=workdir)
    summary = quantize.qad_job(config, teacher, out, progress=progress)
    print(f"QAD for {summary['steps']} steps in {summary['seconds']:.0f} s; quantization stage "
          f"{time.perf_counter() - start:.0f} s in all\n")
    param_dtype = teacher.config.runtime.param_dtype
    rows = [(f"teacher ({param_dtype})", ptq["teacher"]), (f"{config.recipe} PTQ", summary["ptq"]),
            (f"{config.recipe} QAD", summary["qad"])]
    print(quantize.table(rows, entropy))
    print("(weights MB: the stored size, counting every unquantized tensor in bfloat16, as a checkpoint would be "
          f"saved; the {param_dtype} teacher in memory is {teacher.num_params * 4 / 1e6:.1f} MB)"
          if param_dtype == "float32" else "(weights MB: the stored size)")
    figure = _stage_figure(out / "quantization.png", f"{config.recipe} PTQ, then QAD from the teacher",
                           [(name, s["val_loss"], f"{s['weight_bytes'] / 1e6:.1f} MB") for name, s in rows],
                           out, "qad", "KL to the teacher (nats/token)", entropy)
    print(f"quantized checkpoints (NVIDIA ModelOpt layout): {out / quantize.PTQ_DIR}, {out / quantize.QAD_DIR} "
          f"(nemojax generate --checkpoint {out / quantize.QAD_DIR} --tokenizer byte --prompt ...); figure: {figure}")


def _stage_figure(path: Path, title: str, rows, workdir: Path, split: str, label: str, entropy: float) -> Path:
    """A stage's PNG: its models' validation losses and the recovery run's per-step KL (metrics.jsonl)."""
    # a rerun appends to metrics.jsonl: the newest record of each step wins
    curve = {m["step"]: m["kl"] for m in read_metrics(workdir) if m["split"] == split and "kl" in m}
    return stage_figure(path, title, rows, sorted(curve.items()), label, entropy)
