"""What the compression and quantization jobs share: the batches a job config names (its `DataConfig`, the
calibration sequences of `config.calibration`, the validation batches of `config.eval`), the validation loss every
job reports on those same batches, and the records a job leaves in its workdir.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from nemojax import data as data_lib
from nemojax.infer.validation import mean_nll
from nemojax.model import Model


def data_config(config: ml_collections.ConfigDict) -> data_lib.DataConfig:
    """`config.data` as a `DataConfig`."""
    return data_lib.DataConfig(**config.data.to_dict())


def check_vocab(model: Model, config: ml_collections.ConfigDict, what: str) -> None:
    """Refuses a model whose vocabulary is smaller than the token ids config.data produces."""
    vocab = data_lib.vocab_size(data_config(config))
    if vocab > model.config.vocab_size:
        raise ValueError(f"{what} has vocab_size={model.config.vocab_size}, smaller than the data's {vocab} token "
                         "ids; config.data must be the teacher's data")


def calibration_batches(config: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
    """config.calibration.num_sequences training sequences as [batch_size, seq_len] token arrays (the last batch
    may be smaller)."""
    c = config.calibration
    if c.num_sequences <= 0:
        raise ValueError(f"calibration.num_sequences={c.num_sequences!r} is invalid: must be a positive integer")
    batches = data_lib.make_dataset(data_config(config), "train", seq_len=c.seq_len, batch_size=c.batch_size,
                                    seed=c.seed)
    left = c.num_sequences
    while left > 0:
        tokens = np.asarray(next(batches)["tokens"])[:left]
        left -= tokens.shape[0]
        yield tokens


def validation_batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """The first config.eval.batches batches of the validation split (each the pipeline's dict of [batch_size,
    seq_len] arrays); the same batches on every call."""
    e = config.eval
    batches = data_lib.make_dataset(data_config(config), "validation", seq_len=e.seq_len, batch_size=e.batch_size,
                                    seed=e.seed)
    for _, batch in zip(range(e.batches), batches, strict=False):
        yield {k: np.asarray(v) for k, v in batch.items()}


def validation_loss(model: Model, config: ml_collections.ConfigDict) -> float:
    """Mean next-token NLL (nats/token, no z-loss) of `model` over config.eval.batches validation batches of
    config.data: the number every job reports for every model it produces, so the numbers compare."""
    try:
        return mean_nll(model, validation_batches(config))
    except ValueError as error:
        raise ValueError(f"config.eval: the validation split gave no tokens ({error})") from error


def write_record(path: Path, record: dict[str, Any]) -> None:
    """A job's JSON record (prune.json, qad.json, ...)."""
    path.write_text(json.dumps(record, indent=2) + "\n")


def teacher_from_record(record: Path) -> str | None:
    """The teacher path a first-stage job wrote into its record (`write_record`), if the record exists."""
    return json.loads(record.read_text()).get("teacher_path") if record.is_file() else None


def teacher_path_field(teacher_path: str | Path | None) -> str | None:
    """How a record stores the teacher's path: absolute, so a later stage finds it from any directory."""
    return None if teacher_path is None else str(Path(teacher_path).absolute())


def copy_tokenizer(teacher_path: str | Path | None, config: ml_collections.ConfigDict, out: Path) -> None:
    """Puts the teacher's tokenizer.json (or config.data.tokenizer's) beside a saved student when there is one (a
    byte tokenizer has none: `nemojax generate` then needs --tokenizer byte)."""
    candidates = []
    if teacher_path is not None:
        candidates.append(Path(teacher_path) / "tokenizer.json")
    if config.data.get("tokenizer") not in (None, "byte"):
        spec = Path(config.data.tokenizer)
        candidates.append(spec / "tokenizer.json" if spec.is_dir() else spec)
    for candidate in candidates:
        if candidate.is_file():
            (out / "tokenizer.json").write_bytes(candidate.read_bytes())
            return
