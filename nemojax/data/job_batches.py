"""The batches a job config (configs/minitron_small.py, configs/nvfp4_qad.py) names: its `DataConfig`, the
calibration sequences (`config.calibration`) and the validation batches (`config.eval`).

Shared by the compression and quantization jobs (`nemojax.compress.minitron`, `nemojax.quant.ptq_qad`) so both
score every model on the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from nemojax.data.config import DataConfig
from nemojax.data.datasets import make_dataset


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
    """`config.data` as a `DataConfig`."""
    return DataConfig(**config.data.to_dict())


def calibration_batches(config: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
    """config.calibration.num_sequences training sequences as [batch_size, seq_len] token arrays (the last batch
    may be smaller)."""
    c = config.calibration
    if c.num_sequences <= 0:
        raise ValueError(f"calibration.num_sequences={c.num_sequences!r} is invalid: must be a positive integer")
    batches = make_dataset(data_config(config), "train", seq_len=c.seq_len, batch_size=c.batch_size, seed=c.seed)
    left = c.num_sequences
    while left > 0:
        tokens = np.asarray(next(batches)["tokens"])[:left]
        left -= tokens.shape[0]
        yield tokens


def validation_batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """The first config.eval.batches batches of the validation split (each the pipeline's dict of [batch_size,
    seq_len] arrays); the same batches on every call."""
    e = config.eval
    batches = make_dataset(data_config(config), "validation", seq_len=e.seq_len, batch_size=e.batch_size,
                           seed=e.seed)
    for _, batch in zip(range(e.batches), batches, strict=False):
        yield {k: np.asarray(v) for k, v in batch.items()}
