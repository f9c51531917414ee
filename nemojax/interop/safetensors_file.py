"""The safetensors files of a checkpoint folder: read into numpy (float8 and bfloat16 included), written sharded,
swapped in whole.

    tensors = read_safetensors("ckpt/")    # {name: np.ndarray}: model.safetensors, or an index + its shards
    save_folder("out/", lambda tmp: write_tensors(tmp, tensors, max_shard_bytes))

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
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.flax import save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

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


def shards(state_dict: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """`state_dict` cut, in order, into shards of at most `max_bytes` (a larger tensor is a shard alone)."""
    parts: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        if parts[-1] and size + tensor.nbytes > max_bytes:
            parts.append({})
            size = 0
        parts[-1][name] = tensor
        size += tensor.nbytes
    return parts


def write_tensors(directory: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    """Writes `tensors` into the folder `directory` as model.safetensors or, above `max_shard_bytes`, as numbered
    shards with model.safetensors.index.json (the Hub's layout, torch metadata; float8 included)."""
    parts = shards(tensors, max_shard_bytes)
    if len(parts) == 1:
        _save(parts[0], directory / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, part in enumerate(parts, 1):
        file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        _save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.nbytes for t in tensors.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


def _save(tensors: Mapping[str, np.ndarray], file: Path) -> None:
    # through jax arrays: safetensors' numpy writer has no float8 or bfloat16
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, file, metadata={"format": "pt"})


def save_folder(directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Runs `fill(staging)` on a sibling temporary folder, then swaps it in at `directory`: a save that fails
    part-way leaves any previous checkpoint at `directory` intact, and nothing half-written behind."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    try:
        fill(staging)
        swap_in(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def swap_in(staging: Path, directory: Path) -> None:
    """Replaces `directory` by `staging`; the old directory is removed only once the new one is in place."""
    if not directory.exists():
        staging.rename(directory)
        return
    backup = staging.with_name(staging.name + ".old")
    directory.rename(backup)
    try:
        staging.rename(directory)
    except BaseException:
        backup.rename(directory)
        raise
    shutil.rmtree(backup)
