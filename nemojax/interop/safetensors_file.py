"""The safetensors files of a checkpoint folder: read into numpy (float8 and bfloat16 included), written sharded,
committed into the folder file by file, crash-safe.

    tensors = read_safetensors("ckpt/")    # {name: np.ndarray}: model.safetensors, or an index + its shards
    save_folder("out/", lambda tmp: write_tensors(tmp, tensors, max_shard_bytes))

safetensors' own numpy and flax readers cannot return F8_E4M3 / F8_E5M2 / F8_E8M0 tensors (numpy has no such
dtypes; the flax reader asks numpy for them and fails with "module 'numpy' has no attribute 'float8_e4m3fn'"), and
NVIDIA's quantized checkpoints store their block scales in F8_E4M3. So the file is parsed here, by the format's
definition (github.com/huggingface/safetensors README, "Format"): an 8-byte little-endian header length N, N bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}, then the raw
little-endian tensor bytes, offsets relative to the end of the header. Float8 and bfloat16 become ml_dtypes arrays.
Every reading error (bad JSON, an index without "weight_map", a missing or truncated shard) is a CheckpointError
naming the file.

Saving (`save_folder`) writes only the checkpoint's own files (`is_own_file`: config.json, hf_quant_config.json,
model.safetensors, numbered shards, the index) and leaves every other file of the folder (a tokenizer, a README)
alone. The protocol, so that a kill at any instant leaves the old or the new checkpoint at the path:

  1. the new files are written into a staging folder inside the target (`.nemojax-saving-*`, same filesystem)
     and fsynced;
  2. a journal (`.nemojax-save-journal.json`: the staging folder, the files to move in, the stale own files of the
     previous save to remove) is written beside it and renamed into place: this rename is the commit point;
  3. each staged file is `os.replace`d into the folder, the stale own files are removed, then the staging folder
     and the journal.

A kill before step 2 leaves the old checkpoint untouched (the staging folder is removed by the next save); a kill
after it is rolled forward by the next save or load (`finish_interrupted_save`), which replays step 3 (every step
of it can be repeated). A save holds the folder's lock (`.nemojax-save.lock`, `nemojax.locks.FolderLock`) from
start to end: a second save into it, or a load of it, while a live process saves there is refused naming that
process (two saves would delete each other's staging folders). Folders left by the older sibling-folder protocol
(`.NAME.saving-*`) are recovered (if the target is missing) and removed. The target must be a real folder: a
symlink, a regular file or a training workdir (run.json or checkpoints/ inside) is refused with a CheckpointError,
so that a save never writes through a link into some other folder nor mixes weights into a training run's files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.flax import save_file

from nemojax.errors import CheckpointError
from nemojax.locks import FolderLock, FolderLockedError, describe_owner, held_by_live_owner

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUANT_CONFIG_NAME = "hf_quant_config.json"  # NVIDIA ModelOpt's marker of a quantized checkpoint (modelopt writes it)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# nemojax.elastic.save's choices, routers and (a quantized elastic model) quantization state
ELASTIC_NAMES = ("elastic.json", "elastic_routers.safetensors", "elastic_quant_state.safetensors")
OWN_NAMES = (CONFIG_NAME, QUANT_CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, *ELASTIC_NAMES)
STAGING_PREFIX = ".nemojax-saving-"
JOURNAL_NAME = ".nemojax-save-journal.json"
SAVE_LOCK_NAME = ".nemojax-save.lock"  # held by the process saving into the folder
WORKDIR_MARKERS = ("run.json", "checkpoints")  # nemojax.train's workdir layout: never a save_hf target
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_json(file: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `file` (config.json, an index, hf_quant_config.json). Raises FileNotFoundError for a
    missing file and CheckpointError naming the file for bad JSON or JSON that is not an object."""
    file = Path(file)
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(value).__name__}, expected an object")
    return value


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, else model.safetensors.
    Raises FileNotFoundError naming the folder when it has neither, and CheckpointError naming the index for an
    index without a {tensor: shard file} "weight_map" or one that names a shard missing from the folder."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f'{index}: needs a "weight_map" object {{tensor name: shard file name}}')
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {name!r} is not a file name in the folder")
            if not (directory / name).is_file():
                raise CheckpointError(f"{index} names shard {name}, which is missing from {directory}")
            files.append(directory / name)
        return files
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _header(file: Path, raw: np.ndarray) -> tuple[dict[str, Any], int]:
    """The header dict of a safetensors file's bytes and the offset of its data; CheckpointError naming `file`
    for a file too short for its header or a header that is not a JSON object."""
    if raw.size < 8:
        raise CheckpointError(f"{file}: {raw.size} bytes, too short for a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    if 8 + n > raw.size:
        raise CheckpointError(f"{file}: header of {n} bytes but the file holds {raw.size} (truncated?)")
    try:
        header = json.loads(raw[8:8 + n].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _tensor(file: Path, raw: np.ndarray, start: int, name: str, info: Any) -> np.ndarray:
    """One tensor of a safetensors file (a copy off the memmap), checked against its header entry."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: tensor {name} has a malformed header entry {info!r}") from e
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{file}: tensor {name} has dtype {dtype_name}; allowed: {sorted(DTYPES)}")
    if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or begin < 0:
        raise CheckpointError(f"{file}: tensor {name} holds {end - begin} bytes, not the {dtype_name} {list(shape)} "
                              "its header declares")
    if start + end > raw.size:
        raise CheckpointError(f"{file}: tensor {name} ends at byte {start + end} but the file holds {raw.size} "
                              "(truncated?)")
    # the stored bytes are little-endian, as are the hosts JAX runs on: a view, then a copy off the memmap
    return np.asarray(raw[start + begin: start + end]).view(dtype).reshape(shape).copy()


def read_file(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, each a numpy array of its stored dtype and shape (a copy, so the
    file can be replaced afterwards). Raises CheckpointError (a ValueError) naming the file, and the tensor where
    there is one, for a truncated file, a bad header, an unknown dtype or a byte range that does not match."""
    file = Path(file)
    if file.stat().st_size == 0:  # np.memmap cannot map an empty file
        raise CheckpointError(f"{file}: empty file, not a safetensors file (truncated?)")
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    header, start = _header(file, raw)
    return {name: _tensor(file, raw, start, name, info) for name, info in header.items()}


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


def is_own_file(name: str) -> bool:
    """Whether a file name is one a checkpoint save writes (and so may replace or remove): config.json,
    hf_quant_config.json, model.safetensors, the index, numbered shards model-00001-of-00003.safetensors and an
    elastic model's elastic.json and elastic_routers.safetensors."""
    return name in OWN_NAMES or SHARD_NAME.fullmatch(name) is not None


def check_save_target(directory: Path) -> None:
    """Raises CheckpointError unless `directory` is missing or a real folder that is not a training workdir.
    A symlink is refused rather than followed (a loop, or a link into another checkpoint, would be written
    through silently): pass the resolved path to save there."""
    if directory.is_symlink():
        raise CheckpointError(f"{directory} is a symlink; save to a real folder (its target, if intended: "
                              f"{os.path.realpath(directory)})")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a folder; a checkpoint is saved into a folder")
    for marker in WORKDIR_MARKERS:
        if (directory / marker).exists():
            raise CheckpointError(f"{directory} is a training workdir ({marker} inside); save the checkpoint into "
                                  "another folder, e.g. a subfolder of it")


def _fsync(path: Path) -> None:
    """Flushes a file's or folder's contents (a folder: its entries) to disk; so that a power cut after a rename
    cannot leave a renamed but empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_sibling_swap(directory: Path) -> None:
    """Cleans up after the older protocol, which staged a sibling `.NAME.saving-*` folder and swapped it in whole:
    a kill between its two renames left `directory` missing, the old checkpoint in `.NAME.saving-X.old` and the
    complete new one in `.NAME.saving-X`. That new one (else the old one) is moved back to `directory`; every
    other leftover is removed."""
    if not directory.parent.is_dir():
        return
    leftovers = sorted(p for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.saving-"))
    if not leftovers:
        return
    if not directory.exists() and not directory.is_symlink():
        backup = next((p for p in leftovers if p.name.endswith(".old") and p.is_dir()), None)
        if backup is not None:  # the backup was made only once its new sibling was complete
            new = backup.with_name(backup.name[: -len(".old")])
            (new if new.is_dir() else backup).rename(directory)
    for path in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _read_journal(directory: Path) -> dict[str, Any] | None:
    """The journal of an interrupted save in `directory`, validated (only own files, a staging folder inside);
    None when there is none."""
    file = directory / JOURNAL_NAME
    if not file.exists():
        return None
    journal = read_json(file)
    staging, move, remove = journal.get("staging"), journal.get("move"), journal.get("remove")
    names = (move or []) + (remove or [])
    if (not isinstance(staging, str) or not staging.startswith(STAGING_PREFIX) or Path(staging).name != staging
            or not isinstance(move, list) or not isinstance(remove, list)
            or not all(isinstance(n, str) and is_own_file(n) for n in names)):
        raise CheckpointError(f"{file}: not a save journal of nemojax (staging, move, remove of checkpoint files); "
                              "remove it by hand if the folder's checkpoint is otherwise complete")
    return journal


def _roll_forward(directory: Path, journal: Mapping[str, Any]) -> None:
    """Step 3 of the save protocol (module docstring), repeatable after a kill at any point in it: moves each
    staged file into `directory` (one already moved is skipped), removes the stale own files, then the staging
    folder and the journal."""
    staging = directory / journal["staging"]
    for name in journal["move"]:
        try:
            os.replace(staging / name, directory / name)
        except FileNotFoundError:
            if not (directory / name).exists():  # neither staged nor in place: the journal cannot be completed
                raise CheckpointError(f"{directory / JOURNAL_NAME}: file {name} is neither in {staging} nor in "
                                      f"{directory}; the interrupted save cannot be completed") from None
    for name in journal["remove"]:
        (directory / name).unlink(missing_ok=True)
    _fsync(directory)
    shutil.rmtree(staging, ignore_errors=True)
    (directory / JOURNAL_NAME).unlink(missing_ok=True)


def check_no_save_in_progress(directory: Path) -> None:
    """Raises FolderLockedError naming the saving process while another live process saves into `directory` (its
    files are then a mix of the old and the new checkpoint); a lock left by a dead process is ignored here (the
    next save takes it over)."""
    held = held_by_live_owner(directory / SAVE_LOCK_NAME)
    if held is not None and held.get("pid") != os.getpid():
        raise FolderLockedError(f"{directory}: a checkpoint save by {describe_owner(held)} is in progress; load it "
                                f"once that save has ended (or delete {directory / SAVE_LOCK_NAME} if it is gone)")


def finish_interrupted_save(directory: str | os.PathLike) -> bool:
    """Completes a save into `directory` that was killed after its commit point (its journal is rolled forward),
    and recovers a folder left missing by the older sibling-folder protocol. Called by every load and save
    before it reads or writes; returns whether there was anything to finish."""
    directory = Path(directory)
    _recover_sibling_swap(directory)
    check_no_save_in_progress(directory)
    journal = _read_journal(directory) if directory.is_dir() else None
    if journal is None:
        return False
    _roll_forward(directory, journal)
    return True


def _commit(directory: Path, staging: Path) -> dict[str, Any]:
    """Steps 1-2 of the save protocol: fsyncs the staged files and atomically writes the journal naming them and
    the stale own files of `directory`. Raises ValueError for a staged file that is not a checkpoint file."""
    move = sorted(p.name for p in staging.iterdir())
    foreign = [name for name in move if not is_own_file(name)]
    if foreign:  # a save may only write files it will replace or remove the next time
        raise ValueError(f"save_folder: fill wrote {foreign}; allowed: {list(OWN_NAMES)} and numbered shards")
    remove = sorted(p.name for p in directory.iterdir() if is_own_file(p.name) and p.name not in move)
    journal = {"staging": staging.name, "move": move, "remove": remove}
    for name in move:
        _fsync(staging / name)
    pending = staging / f"{JOURNAL_NAME}.pending"  # inside staging: removed with it if the rename never happens
    pending.write_text(json.dumps(journal, indent=2))
    _fsync(pending)
    os.replace(pending, directory / JOURNAL_NAME)
    _fsync(directory)
    return journal


def save_folder(directory: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Runs `fill(staging)` on an empty staging folder inside `directory` (created if missing), then commits its
    files into `directory` by the module docstring's protocol: other files of the folder are left alone, own
    files of a previous save that the new one lacks (old shards, an index) are removed, and a save that fails or
    is killed at any point leaves the old or the new checkpoint loadable. Raises CheckpointError for a target
    that is a symlink, a file or a training workdir (`check_save_target`), before anything is written."""
    directory = Path(directory)
    check_save_target(directory)
    _recover_sibling_swap(directory)
    with FolderLock(directory, SAVE_LOCK_NAME, purpose="a checkpoint save"):
        finish_interrupted_save(directory)
        for stale in directory.glob(f"{STAGING_PREFIX}*"):  # a save killed before its commit point
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        try:
            fill(staging)
            journal = _commit(directory, staging)
        except BaseException:
            if not (directory / JOURNAL_NAME).exists():  # committed (a failed fsync after the rename): keep it
                shutil.rmtree(staging, ignore_errors=True)
            raise
        _roll_forward(directory, journal)
    return directory
