"""`Scores`: the frozen result of `nemojax.compress.importance`, a name -> float32 numpy array map.

Keys (see `importance` for the exact definitions and their sources):

    hidden                    [hidden_size]
    layers_{i}/heads          [num_heads]               attention layer i
    layers_{i}/mlp            [intermediate_size]       MLP layer i
    layers_{i}/mamba_x        [H, P]                    Mamba layer i, per-channel scores of the in_proj_x output
    layers_{i}/mamba_heads    [H]                       Mamba layer i
    layers_{i}/mamba_channels [P]                       Mamba layer i
    layers_{i}/experts        [E]                       MoE layer i
    layers_{i}/expert_ffn     [E, F]                    MoE layer i
    layers_{i}/shared_mlp     [F_shared]                MoE layer i with shared experts
    layer/block               [num_layers]              (and layer/lm_loss, layer/logits_mse when requested)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Scores(Mapping[str, np.ndarray]):
    """Read-only mapping of score names to float32 numpy arrays; `save` / `load` round-trip them exactly (npz)."""

    data: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        frozen = {}
        for key, value in self.data.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"Scores key {key!r} is invalid: must be a non-empty str")
            arr = np.array(value, dtype=np.float32, copy=True)
            arr.flags.writeable = False
            frozen[key] = arr
        object.__setattr__(self, "data", dict(sorted(frozen.items())))

    def __getitem__(self, key: str) -> np.ndarray:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.data.items())
        return f"Scores({shapes})"

    def save(self, path: str | os.PathLike) -> None:
        """Writes every array to an uncompressed `.npz` at `path` (keys keep their `/`)."""
        with open(path, "wb") as f:
            np.savez(f, **self.data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        """Reads a file written by `save`."""
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})
