"""The pictures of `nemojax demo`'s compression and quantization stages (the training stage draws loss.png).

    stage_figure(path, title, rows, curve, curve_label)

One PNG per stage: on the left the stage's models side by side (validation loss, with each model's parameter count
or weight storage written on its bar, and the corpus' unigram entropy as a reference line); on the right the
per-step curve of the recovery run (distillation or QAD KL to the teacher) read back from the stage's
metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def stage_figure(path: Path, title: str, rows: Sequence[tuple[str, float, str]],
                 curve: Sequence[tuple[int, float]], curve_label: str, entropy: float | None = None) -> Path:
    """Writes the stage's PNG at `path` and returns it.

    rows: (model name, validation loss in nats/token, a note drawn on the bar such as "10.7M params").
    curve: (step, value) points of the recovery run; curve_label names the value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, line) = plt.subplots(1, 2, figsize=(10, 4))
    names = [name for name, _, _ in rows]
    losses = [loss for _, loss, _ in rows]
    drawn = bars.bar(range(len(rows)), losses, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(rows)])
    for rect, (_, loss, note) in zip(drawn, rows, strict=True):
        bars.annotate(f"{loss:.3f}\n{note}", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                      ha="center", va="bottom", fontsize=8)
    if entropy is not None:
        bars.axhline(entropy, color="gray", linestyle="--", linewidth=1, label=f"unigram entropy {entropy:.2f}")
        bars.legend(loc="lower right", fontsize=8)
    bars.set_xticks(range(len(rows)), names, fontsize=8)
    bars.set_ylabel("validation loss (nats/token)")
    bars.set_ylim(0, max(losses + ([entropy] if entropy is not None else [])) * 1.25)
    if curve:
        line.plot(*zip(*curve, strict=True), "-")
    line.set_xlabel("step")
    line.set_ylabel(curve_label)
    line.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
