"""The `nemojax quantize` (PTQ) and `nemojax qad` jobs: a quantization config (configs/nvfp4_qad.py), a teacher
checkpoint and a workdir in; NVIDIA-layout quantized checkpoints out.

    summary = quantize_job(config, teacher, "runs/nvfp4", teacher_path="runs/demo")
        -> runs/nvfp4/ptq/ (quantized checkpoint), runs/nvfp4/quantize.json
    summary = qad_job(config, teacher, "runs/nvfp4")
        -> runs/nvfp4/qad/, runs/nvfp4/metrics.jsonl (+ TensorBoard), runs/nvfp4/qad.json

Validation losses are `nemojax.jobs.common.validation_loss` (config.eval), the same batches for every model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ml_collections

from nemojax.interop.modelopt import load_quantized, save_quantized
from nemojax.jobs.common import (
    calibration_batches,
    data_config,
    teacher_from_record,
    teacher_path_field,
    validation_loss,
    write_record,
)
from nemojax.model import Model
from nemojax.quant.aware import QAD_OPTIMIZER, QADConfig, qad
from nemojax.quant.calibration import calibrate
from nemojax.quant.storage import weight_bytes
from nemojax.quant.transform import apply, strip
from nemojax.train.metrics import MetricsWriter

PTQ_DIR = "ptq"
QAD_DIR = "qad"
QUANTIZE_RECORD = "quantize.json"
QAD_RECORD = "qad.json"


def _summary(model: Model, config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"params": model.num_params, "weight_bytes": weight_bytes(model), "val_loss": validation_loss(model, config)}


def quantize_job(config: ml_collections.ConfigDict, teacher: Model, workdir: str | Path, *,
                 teacher_path: str | Path | None = None, log=print) -> dict[str, Any]:
    """PTQ: apply config.recipe to `teacher`, calibrate on config.calibration batches (config.calibration.method
    "max" or "mse"), save the quantized checkpoint in workdir/ptq; returns {"teacher", "ptq": params,
    weight_bytes, val_loss; "recipe", "seconds"}."""
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = strip(teacher) if teacher.config.runtime.quant is not None else teacher
    c = config.calibration
    log(f"quantize: recipe {config.recipe!r}, {c.method} calibration on {c.num_sequences} x {c.seq_len} tokens")
    student = calibrate(apply(teacher, config.recipe), calibration_batches(config), method=c.method)
    save_quantized(student, workdir / PTQ_DIR)
    summary = {"teacher": _summary(teacher, config), "ptq": _summary(student, config), "recipe": config.recipe,
               "seconds": time.perf_counter() - start,
               "teacher_path": teacher_path_field(teacher_path)}
    write_record(workdir / QUANTIZE_RECORD, summary)
    return summary


def qad_config(config: ml_collections.ConfigDict) -> QADConfig:
    q = config.qad
    optimizer = dataclasses.replace(QAD_OPTIMIZER, lr=float(q.lr), warmup_steps=int(q.warmup_steps),
                                    min_lr_ratio=float(q.min_lr_ratio), total_steps=int(q.steps))
    return QADConfig(temperature=float(q.temperature), lm_weight=float(q.lm_weight), steps=int(q.steps),
                     batch_size=int(q.batch_size), seq_len=int(q.seq_len), seed=int(q.seed), optimizer=optimizer)


def recorded_teacher(workdir: str | Path) -> str | None:
    """The teacher path `quantize_job` recorded in workdir/quantize.json, if any."""
    return teacher_from_record(Path(workdir) / QUANTIZE_RECORD)


def qad_job(config: ml_collections.ConfigDict, teacher: Model, workdir: str | Path, *,
            student: Model | None = None, progress: bool = True, log=print,
            stop_after: int | None = None) -> dict[str, Any]:
    """QAD of workdir/ptq (or `student`) from the high-precision `teacher` for config.qad.steps; saves
    workdir/qad, appends the final validation losses to workdir/metrics.jsonl; returns
    {"teacher", "ptq", "qad": params, weight_bytes, val_loss; "steps", "seconds", "final_kl"}.

    The run checkpoints into workdir (run.json, checkpoints/; per-step metrics in metrics.jsonl, split "qad") on
    the mesh `config.mesh` (when the config has one; else one device) and a rerun resumes it. `stop_after` ends
    it after that many steps: then only the checkpoint is written and the summary is {"stopped_at", "steps",
    "seconds"}."""
    workdir = Path(workdir)
    if student is None:
        folder = workdir / PTQ_DIR
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} has no quantized checkpoint (config.json); run `nemojax quantize` with this "
                             "workdir first")
        student = load_quantized(folder, runtime={"dtype": teacher.config.runtime.dtype})
    teacher = strip(teacher) if teacher.config.runtime.quant is not None else teacher
    qcfg = qad_config(config)
    before, teacher_summary = _summary(student, config), _summary(teacher, config)
    log(f"qad: {qcfg.steps} steps of {qcfg.batch_size} x {qcfg.seq_len} tokens, KL to the high-precision teacher")
    start = time.perf_counter()
    mesh = config.mesh.to_dict() if "mesh" in config else None
    trained, history = qad(student, teacher, data_config(config), config=qcfg, progress=progress, mesh=mesh,
                           workdir=workdir, stop_after=stop_after)
    seconds = time.perf_counter() - start
    done = history[-1]["step"] if history else 0
    if done < qcfg.steps:
        return {"stopped_at": done, "steps": qcfg.steps, "seconds": seconds}
    after = _summary(trained, config)
    save_quantized(trained, workdir / QAD_DIR)
    writer = MetricsWriter(workdir)
    try:
        writer.write(done, "validation", {"loss": after["val_loss"], "ptq_loss": before["val_loss"],
                                          "teacher_loss": teacher_summary["val_loss"]})
    finally:
        writer.close()
    summary = {"teacher": teacher_summary, "ptq": before, "qad": after, "steps": done, "seconds": seconds,
               "final_kl": history[-1].get("kl") if history else None}
    write_record(workdir / QAD_RECORD, summary)
    return summary


def table(rows: list[tuple[str, dict[str, Any]]], entropy: float | None = None) -> str:
    """(name, summary) rows: weight storage and validation loss, plus the unigram entropy for reference."""
    lines = [f"{'model':22s} {'weights MB':>10s} {'val loss':>9s}"]
    lines += [f"{name:22s} {s['weight_bytes'] / 1e6:>10.2f} {s['val_loss']:>9.3f}" for name, s in rows]
    if entropy is not None:
        lines.append(f"{'unigram entropy':22s} {'':>10s} {entropy:>9.3f}")
    return "\n".join(lines)
