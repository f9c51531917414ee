"""Read safetensors checkpoints into numpy, float8 and bfloat16 tensors included.

    tensors = read_safetensors("ckpt/")    # {name: np.ndarray}: model.safetensors, or an index + its shards

safetensors' own numpy and flax readers cannot return F8_E4M3 / F8_E5M2 / F8_E8M0 tensors (numpy has no such
dtypes; the flax reader asks numpy for them and fails with "module 'numpy' has no attribute 'float8_e4m3fn'"), and
NVIDIA's quantized checkpoints store their block scales in F8_E4M3. So the file is parsed here, by the format's
definition (github.com/huggingface/safetensors README, "Format"): an 8-byte little-endian header length N, N bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}, then the raw
little-endian tensor bytes, offsets relative to the end of the header. Float8 and bfloat16 become ml_dtypes arrays.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, else model.safetensors.
    Raises FileNotFoundError naming the folder when it has neither."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def read_file(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, each a numpy array of its stored dtype and shape (a copy, so the
    file can be replaced afterwards). Raises ValueError naming the file and tensor for an unknown dtype or a
    tensor whose byte range does not match its shape."""
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    header = json.loads(raw[8:8 + n].tobytes())
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}; allowed: {sorted(DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{file}: tensor {name} holds {end - begin} bytes, not the {info['dtype']} {list(shape)} "
                             "its header declares")
        # the stored bytes are little-endian, as are the hosts JAX runs on: a view, then a copy off the memmap
        tensors[name] = np.asarray(raw[8 + n + begin: 8 + n + end]).view(dtype).reshape(shape).copy()
    return tensors


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder (model.safetensors, or model.safetensors.index.json and its shards)."""
    tensors: dict[str, np.ndarray] = {}
    for file in checkpoint_files(directory):
        tensors.update(read_file(file))
    return tensors
