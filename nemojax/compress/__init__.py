"""Compression as pure functions of a `Model`: importance estimation and pruning (Minitron, Minitron-SSM).

    scores = compress.importance(model, calibration_batches)       # forward only; Scores.save / Scores.load
    small = compress.prune(model, scores, hidden=3072, ffn=9216, mamba_heads=112, layers=48)
    small, history = compress.distill(small, teacher=model, data=batches, steps=200)
    best, report = compress.search(model, scores, budget_params=0.6 * model.num_params, data=batches)
"""

from nemojax.compress.distill import DistillConfig, distill, distillation_loss, teacher_correction
from nemojax.compress.importance import AGGS, LAYER_METRICS, importance
from nemojax.compress.prune import keep_top, keep_top_grouped, prune
from nemojax.compress.scores import Scores
from nemojax.compress.search import Candidate, SearchReport, default_grid, distill_trial, enumerate_candidates, search

__all__ = ["AGGS", "LAYER_METRICS", "Candidate", "DistillConfig", "Scores", "SearchReport", "default_grid", "distill",
           "distill_trial", "distillation_loss", "enumerate_candidates", "importance", "keep_top", "keep_top_grouped",
           "prune", "search", "teacher_correction"]
