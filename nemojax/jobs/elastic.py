"""The `nemojax elastify` job: a teacher checkpoint and an elastic config (configs/elastic_small.py) in; one
elastic checkpoint holding every nested model, and each budget's submodel as a Hugging Face checkpoint, out.

    summary = elastify_job(config, teacher, "runs/elastic", teacher_path="runs/demo")
        -> runs/elastic/scores.npz, elastic/, budget_<b>/, elastify.json, metrics.jsonl
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ml_collections

from nemojax.compress.importance import importance
from nemojax.compress.scores import Scores
from nemojax.elastic.count import count_exact
from nemojax.elastic.depth import layer_ranking
from nemojax.elastic.model import elastify, save
from nemojax.elastic.train import ElasticConfig, train
from nemojax.interop.hf import save_hf
from nemojax.jobs.common import (
    calibration_batches,
    check_vocab,
    copy_tokenizer,
    data_config,
    teacher_path_field,
    validation_loss,
    write_record,
)
from nemojax.model import Model
from nemojax.train.optim import OptimizerConfig

SCORES_FILE = "scores.npz"
ELASTIC_DIR = "elastic"
RECORD = "elastify.json"


def budget_dir(budget: float) -> str:
    return f"budget_{budget:g}"


def elastic_config(config: ml_collections.ConfigDict) -> ElasticConfig:
    t = config.train
    optimizer = OptimizerConfig(lr=float(t.lr), warmup_steps=int(t.warmup_steps), min_lr_ratio=float(t.min_lr_ratio),
                                total_steps=int(t.steps), schedule="cosine")
    return ElasticConfig(steps=int(t.steps), batch_size=int(t.batch_size), seq_len=int(t.seq_len),
                         stage2_seq_len=int(t.stage2_seq_len) or None, stage1_fraction=float(t.stage1_fraction),
                         budgets_per_step=int(t.budgets_per_step), temperature=float(t.temperature),
                         router_weight=float(t.router_weight), optimizer=optimizer, router_lr=float(t.router_lr),
                         seed=int(t.seed))


def _axes(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    names = [a.strip() for a in str(config.elastic.axes).split(",") if a.strip()]
    return tuple(names) or None


def elastify_job(config: ml_collections.ConfigDict, teacher: Model, workdir: str | Path, *,
                 teacher_path: str | Path | None = None, progress: bool = True, log=print,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Importance (workdir/scores.npz when present) -> layer ranking (with elastic.max_drop > 0) -> elastify ->
    elastic.train -> elastic.save(workdir/elastic) and save_hf(workdir/budget_<b>) per budget. Returns {"teacher":
    {params, val_loss}, "budgets": [{budget, sizes, params, fraction, val_loss}], "steps", "seconds",
    "checkpoint_bytes"}; with stop_after, {"stopped_at", "steps", "seconds"} once the run stopped early."""
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_vocab(teacher, config, "the teacher")
    e = config.elastic
    scores_path = workdir / SCORES_FILE
    if scores_path.is_file():
        scores = Scores.load(scores_path)
        log(f"elastify: reusing importance scores {scores_path} (delete it to recompute)")
    else:
        log(f"elastify: importance ({config.calibration.agg}) on {config.calibration.num_sequences} sequences")
        scores = importance(teacher, calibration_batches(config), agg=config.calibration.agg)
        scores.save(scores_path)
    removal_order: tuple[int, ...] = ()
    if int(e.max_drop) > 0:
        ranking = layer_ranking(teacher, list(calibration_batches(config)))
        removal_order = tuple(ranking.removal_order[:int(e.max_drop)])
        log(f"elastify: depth may drop layers {list(removal_order)} (in this order)")
    axes = _axes(config)
    if axes is not None and int(e.max_drop) > 0 and "depth" not in axes:
        axes = (*axes, "depth")
    em = elastify(teacher, scores, budgets=tuple(float(b) for b in e.budgets), axes=axes,
                  removal_order=removal_order, target=str(e.target), heterogeneous=bool(e.heterogeneous),
                  router_hidden=int(e.router_hidden), expert_score=str(e.expert_score))
    ecfg = elastic_config(config)
    log(f"elastify: {teacher.num_params:,} parameters, budgets {list(em.budgets)} of the {em.target}; "
        f"{ecfg.steps} steps of {ecfg.batch_size} x {ecfg.seq_len} tokens")
    trained, history = train(em, teacher, data_config(config), ecfg, workdir=workdir, stop_after=stop_after,
                             progress=progress, mesh=config.mesh.to_dict() if "mesh" in config else None)
    done = history[-1]["step"] if history else 0
    if done < ecfg.steps:
        return {"stopped_at": done, "steps": ecfg.steps, "seconds": time.perf_counter() - start}
    out = save(trained, workdir / ELASTIC_DIR)
    full = teacher.num_params
    rows = []
    for budget in trained.budgets:
        sizes = trained.sizes(budget)
        row = {"budget": budget, "sizes": sizes,
               "params": count_exact(trained.config, sizes, removal_order=trained.removal_order)}
        row["fraction"] = row["params"] / full
        small = trained.extract(budget)
        copy_tokenizer(teacher_path, config, save_hf(small, workdir / budget_dir(budget)))
        row["val_loss"] = validation_loss(small, config)
        rows.append(row)
    summary = {"teacher": {"params": full, "val_loss": validation_loss(teacher, config)}, "budgets": rows,
               "steps": done, "seconds": time.perf_counter() - start,
               "checkpoint_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
               "teacher_path": teacher_path_field(teacher_path)}
    write_record(workdir / RECORD, summary)
    return summary


def table(summary: dict[str, Any]) -> str:
    """Budget, sizes, parameters and validation loss per nested model, and the teacher's."""
    lines = [f"{'model':14s} {'params':>12s} {'of full':>8s} {'val loss':>9s}  sizes"]
    t = summary["teacher"]
    lines.append(f"{'teacher':14s} {t['params']:>12,} {1:>8.0%} {t['val_loss']:>9.3f}")
    for row in summary["budgets"]:
        loss = f"{row['val_loss']:>9.3f}" if "val_loss" in row else f"{'masked':>9s}"
        sizes = ", ".join(f"{k} {v}" for k, v in row["sizes"].items())
        lines.append(f"{'budget ' + format(row['budget'], 'g'):14s} {row['params']:>12,} {row['fraction']:>8.0%} "
                     f"{loss}  {sizes}")
    return "\n".join(lines)

