"""The `nemojax prune` and `nemojax distill` jobs: a compression config (configs/minitron_small.py), a teacher
checkpoint and a workdir in; Hugging Face checkpoints of the pruned and the distilled student out.

    summary = prune_job(config, teacher, "runs/minitron", teacher_path="runs/demo")
        -> runs/minitron/scores.npz (reused when present), runs/minitron/pruned/, runs/minitron/prune.json
    summary = distill_job(config, teacher, "runs/minitron")
        -> runs/minitron/distilled/, runs/minitron/metrics.jsonl (+ TensorBoard), runs/minitron/distill.json

Validation loss everywhere is the token-weighted mean next-token NLL (no z-loss) over `config.eval.batches`
batches of the data config's validation split, the same batches for every model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import ml_collections

from nemojax.compress.distill import DEFAULT_OPTIMIZER, DistillConfig, distill
from nemojax.compress.importance import importance
from nemojax.compress.prune import prune, width_targets
from nemojax.compress.scores import Scores
from nemojax.interop.hf import load_hf, save_hf
from nemojax.jobs.common import (
    calibration_batches,
    check_vocab,
    copy_tokenizer,
    data_config,
    teacher_from_record,
    teacher_path_field,
    validation_loss,
    write_record,
)
from nemojax.model import Model
from nemojax.train.metrics import MetricsWriter

SCORES_FILE = "scores.npz"
PRUNED_DIR = "pruned"
DISTILLED_DIR = "distilled"
PRUNE_RECORD = "prune.json"
DISTILL_RECORD = "distill.json"
PRUNE_TARGETS = ("hidden", "ffn", "heads", "mamba_heads", "mamba_head_dim", "experts", "expert_ffn", "layers",
                 "drop_layers")


def prune_targets(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments of `prune` that config.prune sets (None entries keep a size)."""
    unknown = sorted(set(config.prune.keys()) - set(PRUNE_TARGETS))
    if unknown:
        raise ValueError(f"config.prune has unknown fields {unknown}; allowed: {list(PRUNE_TARGETS)}")
    targets = {k: v for k, v in config.prune.to_dict().items() if v is not None}
    if "drop_layers" in targets:
        targets["drop_layers"] = tuple(targets["drop_layers"])
    if not targets:
        raise ValueError("config.prune sets no target: give at least one of " + ", ".join(PRUNE_TARGETS))
    return targets


def sizes(model: Model) -> dict[str, Any]:
    """The sizes `prune` can change, for printing and records."""
    cfg = model.config
    out: dict[str, Any] = {"params": model.num_params, "hidden": cfg.hidden_size, "layers": cfg.num_layers,
                           "pattern": cfg.pattern}
    for rule in {id(rule): rule for rule in width_targets(cfg).values()}.values():
        out.update({target: axis.full for target, axis in rule.axes(cfg).items()})
    return out


def size_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The sizes that differ between two `sizes` records, as "hidden 512 -> 384, ..."."""
    keys = [k for k in before if k not in ("params", "val_loss", "pattern") and before[k] != after.get(k)]
    return ", ".join(f"{k} {before[k]} -> {after[k]}" for k in keys) or "no size changed"


def prune_job(config: ml_collections.ConfigDict, teacher: Model, workdir: str | Path, *,
              teacher_path: str | Path | None = None, log=print) -> dict[str, Any]:
    """Importance (from workdir/scores.npz when present) -> prune -> save_hf(workdir/pruned); returns a summary
    {"teacher": sizes + val_loss, "pruned": sizes + val_loss, "scores_reused", "seconds"}."""
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_vocab(teacher, config, "the teacher")
    targets = prune_targets(config)
    scores_path = workdir / SCORES_FILE
    reused = scores_path.is_file()
    if reused:
        scores = Scores.load(scores_path)
        log(f"prune: reusing importance scores {scores_path} (delete it to recompute)")
    else:
        c = config.calibration
        log(f"prune: importance ({c.agg}) on {c.num_sequences} x {c.seq_len} training tokens")
        scores = importance(teacher, calibration_batches(config), agg=c.agg, layer_metrics=("block",))
        scores.save(scores_path)
    try:
        pruned = prune(teacher, scores, **targets)
    except ValueError as error:
        if reused:
            raise ValueError(f"{error} (scores from {scores_path}: delete it if they belong to another teacher or "
                             "target)") from error
        raise
    out = save_hf(pruned, workdir / PRUNED_DIR)
    copy_tokenizer(teacher_path, config, out)
    summary = {"teacher": {**sizes(teacher), "val_loss": validation_loss(teacher, config)},
               "pruned": {**sizes(pruned), "val_loss": validation_loss(pruned, config)},
               "targets": targets, "scores_reused": reused, "seconds": time.perf_counter() - start,
               "teacher_path": teacher_path_field(teacher_path)}
    write_record(workdir / PRUNE_RECORD, summary)
    return summary


def distill_config(config: ml_collections.ConfigDict) -> DistillConfig:
    d = config.distill
    optimizer = dataclasses.replace(DEFAULT_OPTIMIZER, lr=float(d.lr), warmup_steps=int(d.warmup_steps),
                                    min_lr_ratio=float(d.min_lr_ratio), total_steps=int(d.steps))
    return DistillConfig(kl_weight=float(d.kl_weight), temperature=float(d.temperature), top_k=int(d.top_k),
                         lm_weight=float(d.lm_weight), steps=int(d.steps), batch_size=int(d.batch_size),
                         seq_len=int(d.seq_len), seed=int(d.seed), optimizer=optimizer)


def _mesh(config: ml_collections.ConfigDict) -> dict[str, int] | None:
    """The distillation run's mesh layout: config.mesh (as `nemojax train`'s) when the config has one."""
    return config.mesh.to_dict() if "mesh" in config else None


def recorded_teacher(workdir: str | Path) -> str | None:
    """The teacher path `prune_job` recorded in workdir/prune.json, if any."""
    return teacher_from_record(Path(workdir) / PRUNE_RECORD)


def distill_job(config: ml_collections.ConfigDict, teacher: Model, workdir: str | Path, *,
                student: Model | None = None, teacher_path: str | Path | None = None, progress: bool = True,
                log=print, stop_after: int | None = None) -> dict[str, Any]:
    """Distills workdir/pruned (or `student`) from `teacher` for config.distill.steps, saves workdir/distilled and
    appends the final validation losses to workdir/metrics.jsonl; returns a summary {"teacher", "pruned",
    "distilled": {params, val_loss}, "steps", "seconds"}.

    The run checkpoints into workdir (run.json, checkpoints/; per-step metrics in metrics.jsonl, split "distill")
    on the mesh `config.mesh` (when the config has one; else one device) and a rerun resumes it. `stop_after`
    ends it after that many steps: then only the checkpoint is written and the summary is {"stopped_at",
    "steps", "seconds"}."""
    workdir = Path(workdir)
    if student is None:
        folder = workdir / PRUNED_DIR
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} has no pruned checkpoint (config.json); run `nemojax prune` with this "
                             "workdir first")
        student = load_hf(folder, runtime={"dtype": teacher.config.runtime.dtype})
    check_vocab(student, config, "the student")
    dist_cfg = distill_config(config)
    before = validation_loss(student, config)
    teacher_loss = validation_loss(teacher, config)
    log(f"distill: {student.num_params:,}-parameter student from a {teacher.num_params:,}-parameter teacher, "
        f"{dist_cfg.steps} steps of {dist_cfg.batch_size} x {dist_cfg.seq_len} tokens")
    start = time.perf_counter()
    distilled, history = distill(student, teacher, data_config(config), config=dist_cfg, progress=progress,
                                 mesh=_mesh(config), workdir=workdir, stop_after=stop_after)
    seconds = time.perf_counter() - start
    done = history[-1]["step"] if history else 0
    if done < dist_cfg.steps:
        return {"stopped_at": done, "steps": dist_cfg.steps, "seconds": seconds}
    after = validation_loss(distilled, config)
    out = save_hf(distilled, workdir / DISTILLED_DIR)
    copy_tokenizer(teacher_path, config, out)
    writer = MetricsWriter(workdir)
    try:
        writer.write(done, "validation", {"loss": after, "pruned_loss": before, "teacher_loss": teacher_loss})
    finally:
        writer.close()
    summary = {"teacher": {"params": teacher.num_params, "val_loss": teacher_loss},
               "pruned": {"params": student.num_params, "val_loss": before},
               "distilled": {"params": distilled.num_params, "val_loss": after},
               "steps": done, "seconds": seconds,
               "final_kl": history[-1].get("kl") if history else None}
    write_record(workdir / DISTILL_RECORD, summary)
    return summary


def table(rows: list[tuple[str, int, float]], entropy: float | None = None) -> str:
    """A before/after table: (name, params, validation loss) rows, plus the unigram entropy for reference."""
    lines = [f"{'model':22s} {'params':>12s} {'val loss':>9s}"]
    lines += [f"{name:22s} {params:>12,} {loss:>9.3f}" for name, params, loss in rows]
    if entropy is not None:
        lines.append(f"{'unigram entropy':22s} {'':>12s} {entropy:>9.3f}")
    return "\n".join(lines)
