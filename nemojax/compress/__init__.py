"""Compression as pure functions of a `Model`: importance estimation and pruning (Minitron, Minitron-SSM).

    scores = compress.importance(model, calibration_batches)       # forward only; Scores.save / Scores.load
    small = compress.prune(model, scores, hidden=3072, ffn=9216, mamba_heads=112, layers=48)
    small, history = compress.distill(small, teacher=model, data=batches, steps=200)
"""

from nemojax.compress.distill import DistillConfig, distill, distillation_loss, teacher_correction
from nemojax.compress.importance import AGGS, LAYER_METRICS, importance
from nemojax.compress.prune import keep_top, keep_top_grouped, prune
from nemojax.compress.scores import Scores

__all__ = ["AGGS", "LAYER_METRICS", "DistillConfig", "Scores", "distill", "distillation_loss", "importance", "keep_top",
           "keep_top_grouped", "prune", "teacher_correction"]
