"""Quantization-aware distillation (QAD, arXiv 2601.20088) and quantization-aware training (QAT).

    student = quant.calibrate(quant.apply(model, "nvfp4"), calib_batches)      # PTQ
    student, history = quant.qad(student, teacher=model, data=data, steps=200)  # KL to the frozen teacher
    student, history = quant.qat(student, data=data, steps=200)                 # next-token loss instead

QAD (arXiv 2601.20088; docs/formats.md 6): the teacher is the high-precision model, frozen; the student is the same
network with fake-quantized weights and activations (calibrated amaxes frozen). The loss is the per-token forward KL
KL(p_T || p_S) of the next-token distributions at temperature T, times T^2, averaged over the unmasked tokens,
with no label term by default (`lm_weight` adds one). It is `compress.distill` with those settings, so the
student learns only through the straight-through estimator of its quantizers.
QAT fine-tunes the fake-quantized student with the next-token cross entropy on the data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nemojax.compress.distill import DistillConfig, distill, finetune
from nemojax.model import Model
from nemojax.train.optim import OptimizerConfig

# NVIDIA's QAD schedule (ModelOpt / Megatron-Bridge: LR 1e-5 -> 1e-6 cosine, ~5% warmup; docs/formats.md 6). Tiny models
# trained for a few hundred steps want a larger LR (the experiments set one).
QAD_OPTIMIZER = OptimizerConfig(lr=1e-5, total_steps=1000, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1,
                                weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class QADConfig:
    """temperature: T of the KL (> 0); lm_weight: weight of an added next-token loss (0: logit-only, NVIDIA's
    choice); steps, batch_size, seq_len, seed: the run (data given as a DataConfig is batched with them);
    optimizer: AdamW settings (its total_steps becomes the run's steps)."""

    temperature: float = 1.0
    lm_weight: float = 0.0
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    optimizer: OptimizerConfig = QAD_OPTIMIZER

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"QADConfig.temperature={self.temperature!r} is invalid: must be > 0")
        if self.lm_weight < 0:
            raise ValueError(f"QADConfig.lm_weight={self.lm_weight!r} is invalid: must be >= 0")


def _check_student(student: Model, role: str = "student") -> None:
    if student.config.runtime.quant is None:
        raise ValueError(f"{role}.config.runtime.quant is None: quantize it first (nemojax.quant.apply, then "
                         "calibrate)")


def qad(student: Model, teacher: Model, data: Any, steps: int | None = None, config: QADConfig = QADConfig(), *,
        progress: bool = False, mesh: dict[str, int] | None = None, workdir: str | Path | None = None,
        stop_after: int | None = None, checkpoint_every: int | None = None) -> tuple[Model, list[dict[str, float]]]:
    """Distils the frozen `teacher` into the fake-quantized `student`; returns (student, per-step metrics).

    data: batches ({"tokens", "targets", "loss_mask"} [B, L]; targets matter only with lm_weight > 0) or a
    `nemojax.data.DataConfig`. steps: default config.steps. Neither input is changed; the student's
    quantization state stays frozen. mesh (e.g. {"data": 2, "fsdp": 2, "tensor": 2}), workdir (checkpoints,
    resume, metrics split "qad"), stop_after and checkpoint_every: as for `nemojax.compress.distill`.
    """
    _check_student(student)
    if teacher.config.runtime.quant is not None:
        raise ValueError("teacher.config.runtime.quant is set: the QAD teacher is the high-precision model "
                         "(nemojax.quant.strip gives it)")
    dcfg = DistillConfig(kl_weight=1.0, temperature=config.temperature, scale_by_temperature=True,
                         lm_weight=config.lm_weight, steps=config.steps, optimizer=config.optimizer,
                         batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
    return distill(student, teacher, data, steps, dcfg, progress=progress, mesh=mesh, workdir=workdir,
                   stop_after=stop_after, checkpoint_every=checkpoint_every, desc="qad")


def qat(student: Model, data: Any, steps: int | None = None, config: QADConfig = QADConfig(), *,
        progress: bool = False, mesh: dict[str, int] | None = None, workdir: str | Path | None = None,
        stop_after: int | None = None, checkpoint_every: int | None = None) -> tuple[Model, list[dict[str, float]]]:
    """Fine-tunes the fake-quantized `student` with the next-token loss on `data`; returns (student, metrics).
    `config` supplies the run settings (temperature and lm_weight are not used); mesh, workdir (metrics split
    "qat"), stop_after and checkpoint_every as for `qad`."""
    _check_student(student)
    steps = config.steps if steps is None else steps
    return finetune(student, data, steps, optimizer=config.optimizer, batch_size=config.batch_size,
                    seq_len=config.seq_len, seed=config.seed, progress=progress, desc="qat", mesh=mesh,
                    workdir=workdir, stop_after=stop_after, checkpoint_every=checkpoint_every)
