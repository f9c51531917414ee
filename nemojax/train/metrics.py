"""Training metrics: JSON lines (one object per logged step) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, "split": ..., name: value}` lines to workdir/metrics.jsonl and the same scalars to
    TensorBoard under workdir/tensorboard (`split/name`)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        scalars = {name: float(value) for name, value in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
        for name, value in scalars.items():
            self.tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
