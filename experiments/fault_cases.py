"""A catalogue of fault and bad-input cases for issue 15 ("nothing lost, nothing silent"), run against whichever
nemojax is importable, so that two commits can be compared.

    git worktree add /tmp/fault_before 8c80014
    PYTHONPATH=/tmp/fault_before .venv/bin/python experiments/fault_cases.py --json /tmp/fault_before.json
    .venv/bin/python experiments/fault_cases.py --json experiments/results/faults/fault_cases_after.json
    .venv/bin/python experiments/fault_cases.py --compare /tmp/fault_before.json \
        experiments/results/faults/fault_cases_after.json --md experiments/results/faults/fault_cases.md

Each case exercises the library as a user (or an unlucky operator) would, in its own temporary folder, and returns
("clean" | "bad", a short observation). "clean" is the issue's wanted behaviour: an error whose message names the
field, argument or file at fault; the old checkpoint intact; or the correct result. "bad" is silent garbage, data
loss, a raw error that does not name what is wrong (a TypeError / KeyError / IndexError from deep inside), a hang,
or a traceback where one error line was wanted. The judgement is the same on both sides: it looks only at what
the call did (the message's words, the files on disk, the values), never at which commit runs. A case that uses a
keyword or field the older code lacks records what that code does with it (accepted and ignored, or refused).

Subprocesses are used only where a process boundary is the point: the CLI, kills, two live processes, and the
cases that may hang (run in background threads, each with a 60 s limit, a timeout counting as "bad: hang").
jax's persistent compilation cache (a fresh folder per run) makes the repeated tiny trainings cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLEAN, BAD = "clean", "bad"
Outcome = tuple[str, str]
HANG_TIMEOUT_S = 60.0

# The first section, bullet by bullet (the "What to build" inputs last): the groups of the table.
GROUPS = {
    "save": "save_hf / save_quantized: destructive, non-atomic checkpoint writes",
    "nan": "training never checks its loss (NaN, bit flips)",
    "hang": "an unwritable checkpoints folder hangs training",
    "empty": "jobs that end with nothing (bad train config, empty validation)",
    "lock": "no workdir lock: two jobs on one workdir",
    "garbage": "silent garbage: pad ids, stop strings, NaN/int weights, empty corpora, prompt ids",
    "config": "config fields never validated",
    "names": "errors without names: files, index, CLI tracebacks",
    "inputs": "inputs (What to build): generation arguments and quantize arrays",
}


@dataclasses.dataclass
class Case:
    group: str
    name: str
    run: Callable[[Path], Outcome]
    background: bool = False  # may hang: run in a thread beside the others (it waits on a subprocess)


CASES: list[Case] = []


def case(group: str, name: str, *, background: bool = False) -> Callable:
    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        assert group in GROUPS, group
        CASES.append(Case(group, name, fn, background))
        return fn
    return register


# ------------------------------------------------------------------------------------------- environment

import jax  # noqa: E402 - after the docstring's constants; configured before nemojax compiles anything
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nemojax  # noqa: E402

ROOT = Path(nemojax.__file__).resolve().parents[1]  # the tree under test: its configs, tests and CLI
CACHE_DIR = Path(tempfile.mkdtemp(prefix="fault-cases-xla-"))
FIXTURES = Path(tempfile.mkdtemp(prefix="fault-cases-fixtures-"))  # shared trained run and sharded checkpoint
VOCAB = 260
PRESET = "nemotron-h-8b-tiny"
TINY = ["train.steps=2", "optimizer.warmup_steps=1", "train.batch_size=2", "train.seq_len=32",
        "train.eval_batches=1", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=2"]


def _configure_jax() -> None:
    jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("orbax").setLevel(logging.ERROR)


def tree_commit(root: Path) -> str:
    """The git commit of the tree nemojax is imported from (+ "-dirty" when its nemojax/ has local changes)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "nemojax"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def subprocess_env() -> dict[str, str]:
    """The environment of every child: the same nemojax tree, CPU jax, the same compilation cache."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


# ------------------------------------------------------------------------------------------- judging


def short(text: str, limit: int = 170) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException) -> str:
    return short(f"{type(error).__name__}: {error}")


Fragment = str | tuple[str, ...]  # a name, or alternatives (a config.json key or the field it sets)


def names(text: str, fragment: Fragment) -> bool:
    """Whether `text` names `fragment` (one of the alternatives) as a whole word: "steps" is not named by
    "warmup_steps" or "total_steps"."""
    alternatives = fragment if isinstance(fragment, tuple) else (fragment,)
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text) for a in alternatives)


def named(error: BaseException, fragments: tuple[Fragment, ...]) -> Outcome:
    """CLEAN when the error's message names every fragment (the field / argument / file at fault)."""
    missing = [f for f in fragments if not names(str(error), f)]
    if missing:
        return BAD, short(f"{describe(error)} [does not name {', '.join(repr(m) for m in missing)}]")
    return CLEAN, describe(error)


def expect_error(call: Callable[[], Any], *fragments: Fragment,
                 accepted: Callable[[Any], str] | None = None) -> Outcome:
    """The wanted behaviour is an error naming `fragments`; anything accepted is bad (`accepted(value)` says what
    came out)."""
    try:
        value = call()
    except Exception as error:  # noqa: BLE001 - the case judges it
        return named(error, fragments)
    return BAD, short("accepted silently" + (f": {accepted(value)}" if accepted else ""))


# ------------------------------------------------------------------------------------------- shared fixtures

_memo: dict[str, Any] = {}


def memo(fn: Callable[[], Any]) -> Callable[[], Any]:
    def get() -> Any:
        if fn.__name__ not in _memo:
            _memo[fn.__name__] = fn()
        return _memo[fn.__name__]
    return get


@memo
def old_model():
    return nemojax.Model.init(nemojax.presets.get(PRESET, vocab_size=VOCAB), 0)


@memo
def new_model():
    """old_model with every float weight moved by 1: a mix of the two checkpoints' files matches neither."""
    old = old_model()
    return nemojax.Model(old.config, jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, old.params))


def _host_leaves(tree: Any) -> list[np.ndarray]:
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return [host(x) for x in jax.tree.leaves(tree)]


def same_params(a, b) -> bool:
    la, lb = _host_leaves(a.params), _host_leaves(b.params)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
                                      for x, y in zip(la, lb, strict=True))


def which(model, *candidates: tuple[str, Any]) -> str:
    return next((name for name, ref in candidates if same_params(model, ref)), "neither")


def tiny(*extra: str):
    from nemojax import config_files

    return config_files.load(str(ROOT / "configs" / "tiny.py"), [*TINY, *extra])


def train(config, workdir) -> dict[str, Any]:
    from nemojax.train import loop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loop.train(config, workdir, progress=False)


@memo
def trained_workdir() -> tuple[Path, list[np.ndarray]]:
    """A tiny run of 2 steps (checkpoints 1 and 2) and its final state's leaves; cases copy the folder."""
    workdir = FIXTURES / "run"
    result = train(tiny(), workdir)
    return workdir, _host_leaves(result["state"])


def copy_run(tmp: Path) -> Path:
    source, _ = trained_workdir()
    shutil.copytree(source, tmp / "run")
    return tmp / "run"


def steps_on_disk(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def restorable_finite(config, workdir: Path, step: int) -> str:
    """"finite", "non-finite" or "unreadable: ..." for a training checkpoint's params."""
    from nemojax.train import loop

    try:
        model = loop.restore_model(config, workdir, step=step)
    except Exception as error:  # noqa: BLE001
        return "unreadable: " + describe(error)
    return "finite" if all(np.isfinite(x).all() for x in _host_leaves(model.params)) else "non-finite"


def run_cli(tmp: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemojax.cli", *argv], cwd=tmp, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def cli_outcome(done: subprocess.CompletedProcess, *fragments: Fragment) -> Outcome:
    """CLEAN: a non-zero exit with one line on stderr (after argparse's usage, if any) naming `fragments`, no
    traceback. The exit status is shown, not judged."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse's own style: the usage, then one error line
        lines = lines[-1:]
    last = lines[-1] if lines else ""
    where = f"exit {done.returncode}, {len(lines)} stderr lines"
    if "Traceback" in done.stderr:
        return BAD, short(f"{where}, traceback ending {last!r}")
    if done.returncode == 0:
        return BAD, short(f"exit 0; stdout ends {done.stdout.strip().splitlines()[-1:]!r}")
    if len(lines) != 1:
        return BAD, short(f"{where}: {' / '.join(lines[-3:])}")
    missing = [f for f in fragments if not names(last, f)]
    if missing:
        return BAD, short(f"{where}: {last} [does not name {missing}]")
    return CLEAN, short(f"{where}: {last}")


# ------------------------------------------------------------------------------------------- crash injection


class Killed(BaseException):
    """A simulated kill: not an Exception, so handlers that catch Exception do not run."""


@contextlib.contextmanager
def crash_at(k: int | None, first_of: tuple[str, ...] = ()):
    """Counts every disk-changing call (rename, replace, unlink, rmdir, rmtree; also the ones inside rmtree) and,
    with `k`, dies at the k-th (with `first_of`, at the first call of one of those kinds): that call and every
    later one raise Killed, as in a process that is gone (its cleanup handlers cannot touch the disk either)."""
    calls: list[str] = []
    dead = [False]
    targets = [(os, "rename"), (os, "replace"), (os, "unlink"), (os, "remove"), (os, "rmdir"), (shutil, "rmtree")]
    originals = [(module, name, getattr(module, name)) for module, name in targets]

    def wrap(name: str, real: Callable) -> Callable:
        def step(*args, **kwargs):
            if dead[0]:
                raise Killed(f"{name} after the kill")
            calls.append(name)
            if (k is not None and len(calls) == k) or name in first_of:
                dead[0] = True
                raise Killed(name)
            return real(*args, **kwargs)
        return step

    for module, name, real in originals:
        setattr(module, name, wrap(name, real))
    try:
        yield calls
    finally:
        for module, name, real in originals:
            setattr(module, name, real)


def load_outcome(target: Path, *candidates: tuple[str, Any]) -> str:
    from nemojax.interop import hf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return which(hf.load_hf(target), *candidates)
    except Exception as error:  # noqa: BLE001
        return "unloadable (" + short(describe(error), 90) + ")"


def loaded_reference(tmp: Path, save: Callable[[Path], Any], label: str):
    """What a clean save by `save` loads as (for a quantized save: the dequantized model, not the source)."""
    from nemojax.interop import hf

    folder = tmp / f"reference-{label}"
    save(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.load_hf(folder)


def kill_every_step(tmp: Path, save_old: Callable[[Path], Any], save_new: Callable[[Path], Any]) -> Outcome:
    """For every k, a save of `new` over a folder holding `old` dies at its k-th disk-changing step; then the
    folder is loaded (a load may finish the interrupted save). CLEAN when every k leaves old or new."""
    old, new = loaded_reference(tmp, save_old, "old"), loaded_reference(tmp, save_new, "new")
    probe = tmp / "probe"
    save_old(probe)
    with crash_at(None) as calls:
        save_new(probe)
    n = len(calls)
    outcomes = []
    for k in range(1, n + 1):
        target = tmp / f"ckpt{k}"
        save_old(target)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with crash_at(k):
                    save_new(target)
            except Killed:
                pass
        outcomes.append(load_outcome(target, ("old", old), ("new", new)))
    bad = [(k, o) for k, o in enumerate(outcomes, 1) if o not in ("old", "new")]
    counts = f"{n} steps: {outcomes.count('old')} old, {outcomes.count('new')} new"
    if bad:
        return BAD, short(f"{counts}, {len(bad)} lost; killed at step {bad[0][0]} ({calls[bad[0][0] - 1]}): "
                          f"{bad[0][1]}")
    return CLEAN, counts + ", every one loads"


def debris(target: Path) -> list[str]:
    """Staging leftovers of a save: sibling `.NAME.saving-*` folders and `.nemojax-saving-*` / journal inside."""
    found = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.saving")]
    if target.is_dir():
        found += [f"{target.name}/{p.name}" for p in target.iterdir()
                  if p.name.startswith((".nemojax-saving", ".nemojax-save-journal"))]
    return sorted(found)


# =========================================================================================== save


def _save_hf(model, max_shard_bytes: int | None = None) -> Callable[[Path], Any]:
    from nemojax.interop import hf

    return lambda target: hf.save_hf(model, target, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes
                                                          else {}))


@memo
def quant_models():
    """Two calibrated FP8 models of tests/quant/test_export.py (seeds 0 and 1) for save_quantized."""
    sys.path.insert(0, str(ROOT))
    from tests.quant.test_export import _calibrated

    return _calibrated("fp8", 0), _calibrated("fp8", 1)


def _save_quantized(model) -> Callable[[Path], Any]:
    from nemojax.interop import modelopt

    return lambda target: modelopt.save_quantized(model, target)


def save_into_loaded_folder(tmp: Path, saver: Callable[[Any], Callable[[Path], Any]], old, new) -> Outcome:
    new_loaded = loaded_reference(tmp, saver(new), "new")
    target = tmp / "ckpt"
    saver(old)(target)
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "notes").mkdir()
    (target / "notes" / "README.md").write_text("keep me")
    try:
        saver(new)(target)
    except Exception as error:  # noqa: BLE001
        return BAD, "save refused: " + describe(error)
    lost = [name for name in ("tokenizer.json", "notes/README.md") if not (target / name).exists()]
    loaded = load_outcome(target, ("new", new_loaded))
    if lost or loaded != "new":
        return BAD, short(f"deleted {lost}; folder loads as {loaded}")
    return CLEAN, "tokenizer.json and notes/README.md kept; loads as the new model"


@case("save", "save_hf back into the folder it was loaded from (tokenizer.json, notes/ beside)")
def _(tmp):
    return save_into_loaded_folder(tmp, _save_hf, old_model(), new_model())


@case("save", "save_quantized into a folder holding tokenizer.json and notes/")
def _(tmp):
    old, new = quant_models()
    return save_into_loaded_folder(tmp, _save_quantized, old, new)


def save_into_workdir(tmp: Path, save: Callable[[Path], Any]) -> Outcome:
    workdir = copy_run(tmp)
    before = sorted(p.name for p in workdir.iterdir())
    try:
        save(workdir)
    except Exception as error:  # noqa: BLE001
        after = sorted(p.name for p in workdir.iterdir())
        if after != before:
            return BAD, short(f"{describe(error)}; workdir now {after}")
        return named(error, ("workdir",))
    lost = sorted(set(before) - {p.name for p in workdir.iterdir()})
    return (BAD, short(f"accepted: deleted {lost} of the training workdir")) if lost else (
        BAD, "accepted: weights mixed into the training workdir")


@case("save", "save_hf into a training workdir (run.json, checkpoints/, metrics)")
def _(tmp):
    return save_into_workdir(tmp, _save_hf(old_model()))


@case("save", "save_quantized into a training workdir")
def _(tmp):
    return save_into_workdir(tmp, _save_quantized(quant_models()[0]))


@case("save", "save_hf into a folder holding only a checkpoints/ subfolder")
def _(tmp):
    target = tmp / "ckpt"
    (target / "checkpoints" / "7").mkdir(parents=True)
    (target / "checkpoints" / "7" / "state").write_text("orbax")
    try:
        _save_hf(old_model())(target)
    except Exception as error:  # noqa: BLE001
        if not (target / "checkpoints" / "7" / "state").exists():
            return BAD, "checkpoints/ deleted; " + describe(error)
        return named(error, ("checkpoints",))
    return (CLEAN, "accepted; checkpoints/ kept") if (target / "checkpoints" / "7").exists() else (
        BAD, "accepted: checkpoints/ deleted")


def save_onto_file(tmp: Path, save: Callable[[Path], Any]) -> Outcome:
    file = tmp / "weights.bin"
    file.write_bytes(b"precious")
    try:
        save(file)
    except Exception as error:  # noqa: BLE001
        kept = file.is_file() and file.read_bytes() == b"precious"
        leftovers = sorted(p.name for p in tmp.iterdir() if p.name != "weights.bin")
        if not kept or leftovers:
            return BAD, short(f"{describe(error)}; file kept={kept}, leftovers {leftovers}")
        return named(error, ("weights.bin",))
    return BAD, "accepted: the file was replaced by a folder" if file.is_dir() else "accepted"


@case("save", "save_hf onto an existing regular file")
def _(tmp):
    return save_onto_file(tmp, _save_hf(old_model()))


@case("save", "save_quantized onto an existing regular file")
def _(tmp):
    return save_onto_file(tmp, _save_quantized(quant_models()[0]))


@case("save", "save_hf onto a symlink to a folder")
def _(tmp):
    real = tmp / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp / "link"
    link.symlink_to(real)
    try:
        _save_hf(old_model())(link)
    except Exception as error:  # noqa: BLE001
        intact = link.is_symlink() and (real / "keep.txt").exists()
        others = sorted(p.name for p in tmp.iterdir() if p.name not in ("real", "link"))
        if not intact or others:
            return BAD, short(f"half done: {describe(error)}; link intact={link.is_symlink()}, leftovers {others}")
        return named(error, ("link",))
    if not link.is_symlink():
        return BAD, "accepted: the symlink was replaced by a folder"
    return CLEAN, "saved through the link into its target"


def save_onto_loop(tmp: Path, save: Callable[[Path], Any]) -> Outcome:
    loop_ = tmp / "loop"
    loop_.symlink_to(loop_)
    try:
        save(loop_)
    except Exception as error:  # noqa: BLE001
        others = sorted(p.name for p in tmp.iterdir() if p.name != "loop")
        if not loop_.is_symlink() or others:
            return BAD, short(f"{describe(error)}; leftovers {others}")
        return named(error, ("loop",))
    return BAD, "accepted"


@case("save", "save_hf onto a symlink loop")
def _(tmp):
    return save_onto_loop(tmp, _save_hf(old_model()))


@case("save", "save_quantized onto a symlink loop")
def _(tmp):
    return save_onto_loop(tmp, _save_quantized(quant_models()[0]))


@case("save", "save_hf (sharded -> single file) killed at each disk-changing step, then loaded")
def _(tmp):
    return kill_every_step(tmp, _save_hf(old_model(), 40_000), _save_hf(new_model()))


@case("save", "save_hf (single -> sharded) killed at each disk-changing step, then loaded")
def _(tmp):
    return kill_every_step(tmp, _save_hf(old_model()), _save_hf(new_model(), 150_000))


@case("save", "save_quantized killed at each disk-changing step, then loaded")
def _(tmp):
    old, new = quant_models()
    return kill_every_step(tmp, _save_quantized(old), _save_quantized(new))


@case("save", "leftovers of a kill between the two renames of the sibling swap (path missing), then loaded")
def _(tmp):
    """The pre-issue swap renamed ckpt -> .ckpt.saving-X.old, then .ckpt.saving-X -> ckpt; a kill between the two
    left exactly this."""
    _save_hf(old_model())(tmp / "a")
    _save_hf(new_model())(tmp / "b")
    (tmp / "a").rename(tmp / ".ckpt.saving-x1y2.old")
    (tmp / "b").rename(tmp / ".ckpt.saving-x1y2")
    loaded = load_outcome(tmp / "ckpt", ("new", new_model()), ("old", old_model()))
    if loaded not in ("new", "old"):
        return BAD, short(f"ckpt {loaded}; data only in {sorted(p.name for p in tmp.iterdir())}")
    return CLEAN, f"recovered on load as the {loaded} checkpoint; left {sorted(p.name for p in tmp.iterdir())}"


@case("save", "orphaned staging folder of a killed save is cleaned by the next save")
def _(tmp):
    target = tmp / "ckpt"
    _save_hf(old_model())(target)
    try:
        with crash_at(None, first_of=("rename", "replace")):  # the staged files are written by then
            _save_hf(new_model())(target)
    except Killed:
        pass
    left = debris(target)
    try:
        _save_hf(old_model())(target)
    except Exception as error:  # noqa: BLE001
        return BAD, "the next save failed: " + describe(error)
    remaining = debris(target)
    loaded = load_outcome(target, ("old", old_model()))
    if remaining or loaded != "old":
        return BAD, short(f"after the kill {left}; after the next save still {remaining}; loads as {loaded}")
    return CLEAN, short(f"after the kill {left or 'no debris'}; the next save left none")


@case("save", "orphaned .ckpt.saving-* sibling folders of an earlier crash are cleaned")
def _(tmp):
    target = tmp / "ckpt"
    _save_hf(old_model())(target)
    (tmp / ".ckpt.saving-orphan").mkdir()
    (tmp / ".ckpt.saving-orphan" / "model.safetensors").write_bytes(b"half")
    (tmp / ".ckpt.saving-dead.old").mkdir()
    _save_hf(new_model())(target)
    remaining = debris(target)
    return (BAD, f"still there after a save: {remaining}") if remaining else (CLEAN, "removed by the next save")


_SAVE_LOOP = """
import itertools, shutil, sys
from pathlib import Path
from nemojax.interop.safetensors_file import save_folder
a, b, target = map(Path, sys.argv[1:4])
print("ready", flush=True)
for source in itertools.cycle([a, b]):
    save_folder(target, lambda staging: [shutil.copy(f, staging / f.name) for f in source.iterdir()])
"""


@case("save", "SIGKILL at 4 random instants of a process saving two checkpoints in turn")
def _(tmp):
    a, b, target = tmp / "a", tmp / "b", tmp / "ckpt"
    _save_hf(old_model(), 40_000)(a)
    _save_hf(new_model())(b)
    shutil.copytree(a, target)
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(a), str(b), str(target)], cwd=tmp,
                                 env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        child.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.8))
        child.send_signal(signal.SIGKILL)
        child.wait()
        outcomes.append(load_outcome(target, ("old", old_model()), ("new", new_model())))
    lost = [o for o in outcomes if o not in ("old", "new")]
    return (BAD, short(f"{outcomes}")) if lost else (CLEAN, f"loads every time: {outcomes}")


_RACER = """
import os, sys, time
from nemojax.interop import hf
model = hf.load_hf(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[4]):  # both racers start saving at the same instant
    time.sleep(0.005)
refused = 0
for _ in range(int(sys.argv[3])):
    try:
        hf.save_hf(model, sys.argv[2])
    except ValueError as e:
        if "process" not in str(e):
            raise
        refused += 1
print(refused)
"""


@case("save", "two processes saving different checkpoints into one folder at once (12 saves each)")
def _(tmp):
    a, b, target = tmp / "a", tmp / "b", tmp / "ckpt"
    _save_hf(old_model())(a)
    _save_hf(new_model())(b)
    go = tmp / "go"
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(src), str(target), "12", str(go)], cwd=tmp,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for src in (a, b)]
    for racer in racers:
        racer.stdout.readline()
    go.touch()
    outputs = [r.communicate(timeout=300) for r in racers]
    failed = [short(err.strip().splitlines()[-1] if err.strip() else f"exit {r.returncode}", 110)
              for r, (_, err) in zip(racers, outputs, strict=True) if r.returncode != 0]
    loaded = load_outcome(target, ("old", old_model()), ("new", new_model()))
    left = debris(target)
    if failed or loaded not in ("old", "new") or left:
        return BAD, short(f"crashed: {failed}; folder loads as {loaded}; debris {left}")
    return CLEAN, f"both ran to the end (refusals: {[o.strip() for o, _ in outputs]}); loads as {loaded}"


@case("save", "save_hf sharded, then single file: stale shards and index removed")
def _(tmp):
    from nemojax.interop import hf

    target = tmp / "ckpt"
    hf.save_hf(old_model(), target, max_shard_bytes=40_000)
    hf.save_hf(new_model(), target)
    names = sorted(p.name for p in target.iterdir())
    loaded = load_outcome(target, ("new", new_model()))
    if names != ["config.json", "model.safetensors"] or loaded != "new":
        return BAD, short(f"folder holds {names}; loads as {loaded}")
    return CLEAN, "only config.json and model.safetensors; loads as new"


@case("save", "save_hf over a save_quantized folder: hf_quant_config.json removed")
def _(tmp):
    from nemojax.interop import hf

    target = tmp / "ckpt"
    quant = quant_models()[0]
    _save_quantized(quant)(target)
    plain = nemojax.Model.init(quant.config.replace(runtime={"quant": None}), 0)
    hf.save_hf(plain, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded = hf.load_hf(target)
        except Exception as error:  # noqa: BLE001
            return BAD, "unloadable: " + describe(error)
    if (target / "hf_quant_config.json").exists() or loaded.config.runtime.quant is not None:
        return BAD, "hf_quant_config.json left behind: the plain checkpoint loads as quantized"
    return CLEAN, "loads as the plain model"


# =========================================================================================== nan


@case("nan", "train with a huge learning rate (lr=1e30): stops, no non-finite checkpoint")
def _(tmp):
    config = tiny("optimizer.lr=1e30", "optimizer.warmup_steps=0", "train.steps=3")
    workdir = tmp / "run"
    try:
        summary = train(config, workdir)["summary"]
        error = None
    except Exception as e:  # noqa: BLE001
        error, summary = e, None
    kept = {s: restorable_finite(config, workdir, s) for s in steps_on_disk(workdir)}
    if any(v != "finite" for v in kept.values()):
        return BAD, short(f"checkpoints {kept}; {describe(error) if error else summary}")
    if error is None:
        return BAD, short(f"exit 0, loss {summary['train_loss']}")
    outcome = named(error, ("finite",))
    return outcome[0], short(f"{outcome[1]}; kept {kept}")


@case("nan", "resume with lr=1e30 from good checkpoints: the newest finite one is kept")
def _(tmp):
    workdir = copy_run(tmp)
    config = tiny("optimizer.lr=1e30", "optimizer.warmup_steps=0", "train.steps=6")
    try:
        train(config, workdir)
        error = None
    except Exception as e:  # noqa: BLE001
        error = e
    kept = {s: restorable_finite(config, workdir, s) for s in steps_on_disk(workdir)}
    newest_finite = 2 in kept and kept[2] == "finite"
    if error is None or not newest_finite or any(v != "finite" for v in kept.values()):
        return BAD, short(f"{describe(error) if error else 'exit 0'}; checkpoints {kept}")
    return named(error, ("finite",))[0], short(f"{describe(error)}; checkpoints {kept}")


def flip_bits(workdir: Path, step: int) -> int:
    """Flips one bit in the middle of every state data file of `step` above 100 kB (orbax's zstd-compressed
    chunks: the flip changes the decompressed values, which orbax does not check)."""
    files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d" and p.stat().st_size > 100_000]
    for file in files:
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x04
        file.write_bytes(bytes(data))
    return len(files)


@case("nan", "resume from a bit-flipped orbax checkpoint")
def _(tmp):
    from nemojax.train import loop
    from nemojax.train.checkpoint import Checkpoints

    workdir = copy_run(tmp)
    flipped = flip_bits(workdir, 2)
    try:
        train(tiny("train.steps=3"), workdir)
    except Exception as error:  # noqa: BLE001
        return named(error, ("step 2",))
    # resumed: how far is the state it restored from the one that was saved?
    config = tiny()
    run = loop.build(config)
    with jax.set_mesh(run.mesh):
        checkpoints = Checkpoints(workdir, loop._fingerprint(run.model_config, config))
        try:
            restored = _host_leaves(checkpoints.restore(run.abstract_state, step=2))
        finally:
            checkpoints.close()
    _, reference = trained_workdir()
    changed = sum(int((a != b).sum()) for a, b in zip(reference, restored, strict=True))
    return BAD, f"resumed silently from step 2 ({flipped} files flipped; {changed} elements differ from the save)"


_LINEAR = """
import jax, jax.numpy as jnp, numpy as np, optax
from nemojax.train.step import LossAux

def batches(count=6, poison=None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        x = rng.normal(size=(4, 3)).astype(np.float32)
        y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)
        if i == poison:
            y[0, 0] = np.nan
        out.append({"x": x, "y": y})
    return out

def loss(params, batch, rng, scale):
    pred = batch["x"] @ params["w"] + params["b"]
    return scale * jnp.mean((pred - batch["y"]) ** 2), LossAux({"mse": jnp.mean((pred - batch["y"]) ** 2)}, {})

PARAMS = {"w": np.zeros((3, 1), np.float32), "b": np.zeros((1,), np.float32)}
"""


@case("nan", "fit with on_nonfinite='skip' over a batch with a NaN target")
def _(tmp):
    from nemojax.train.fit import fit

    scope: dict[str, Any] = {}
    exec(_LINEAR, scope)  # noqa: S102 - the same linear problem the subprocess cases use
    import optax

    try:
        result = fit(scope["PARAMS"], scope["loss"], optax.adam(0.1), iter(scope["batches"](poison=2)), 6,
                     rng=jax.random.key(3), frozen=(jnp.float32(2.0),), on_nonfinite="skip")
    except Exception as error:  # noqa: BLE001
        return BAD, short(f"{describe(error)} (no way to skip the bad step)")
    finite = all(np.isfinite(x).all() for x in _host_leaves(result.state.params))
    skipped = [m.get("skipped_steps") for m in result.history]
    if not (result.finished and finite and skipped[-1] == 1):
        return BAD, short(f"finished={result.finished}, finite params={finite}, skipped_steps={skipped}")
    return CLEAN, f"6 steps, params finite, skipped_steps {skipped}"


# =========================================================================================== hang

_HANG_FIT = _LINEAR + """
import shutil, sys
from pathlib import Path
from nemojax.train.fit import fit
workdir, mode = Path(sys.argv[1]), sys.argv[2]

def replace_folder(step, metrics, steps_per_s):
    if mode == "midrun" and step == 3:  # after the checkpoint of step 2 (given time to end): the folder -> a file
        import os, time
        time.sleep(2.0)
        os.rename(workdir / "checkpoints", workdir / "checkpoints.moved")
        (workdir / "checkpoints").write_text("not a folder")
    return metrics

result = fit(PARAMS, loss, optax.adam(0.1), iter(batches()), 6, rng=jax.random.key(3), frozen=(jnp.float32(2.0),),
             workdir=workdir, checkpoint_every=2, on_log=replace_folder)
print("finished", flush=True)
"""


def hang_case(tmp: Path, mode: str) -> Outcome:
    workdir = tmp / "run"
    workdir.mkdir()
    if mode == "start":
        (workdir / "checkpoints").write_text("not a folder")
    child = subprocess.Popen([sys.executable, "-c", _HANG_FIT, str(workdir), mode], cwd=tmp, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    start = time.time()
    try:
        out, err = child.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return BAD, f"hang: still running after {HANG_TIMEOUT_S:.0f} s (killed)"
    seconds = time.time() - start
    lines = [line for line in err.splitlines() if line.strip()]
    if child.returncode == 0:
        return BAD, short(f"exit 0 in {seconds:.0f} s ({out.strip()}); checkpoints: "
                          f"{'a file' if (workdir / 'checkpoints').is_file() else 'a folder'}")
    last = lines[-1] if lines else ""
    ok = "checkpoints" in last
    return (CLEAN if ok else BAD), short(f"error after {seconds:.0f} s: {last}")


@case("hang", "fit with workdir/checkpoints a regular file (limit 60 s)", background=True)
def _(tmp):
    return hang_case(tmp, "start")


@case("hang", "fit whose checkpoints folder becomes a file after step 2 (limit 60 s)", background=True)
def _(tmp):
    return hang_case(tmp, "midrun")


# =========================================================================================== empty


def refused_before_training(tmp: Path, config, field: str, workdir: Path | None = None) -> Outcome:
    """CLEAN: an error naming `field` before any step ran (no metrics written)."""
    workdir = workdir or tmp / "run"
    try:
        summary = train(config, workdir)["summary"]
    except Exception as error:  # noqa: BLE001
        trained = (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().strip()
        outcome = named(error, (field,))
        if trained:
            return BAD, short(f"after training began (steps on disk {steps_on_disk(workdir)}): {outcome[1]}")
        return outcome
    return BAD, short(f"exit 0: {summary['steps']} steps, checkpoints {steps_on_disk(workdir)}, validation loss "
                      f"{summary['validation_loss']}")


@case("empty", "text data whose validation split is empty (val_fraction=0)")
def _(tmp):
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 400)
    config = tiny()
    config.data = {"kind": "text", "tokenizer": "byte", "paths": (str(corpus),), "val_fraction": 0.0}
    return refused_before_training(tmp, config, "validation")


@case("empty", "train.keep_checkpoints=0")
def _(tmp):
    workdir = tmp / "run"
    try:
        train(tiny("train.keep_checkpoints=0"), workdir)
    except Exception as error:  # noqa: BLE001
        return named(error, ("keep_checkpoints",))
    steps = steps_on_disk(workdir)
    return (CLEAN, f"exit 0 with checkpoints {steps}") if steps else (BAD, "exit 0 with no checkpoint at all")


@case("empty", "workdir '' (empty string)")
def _(tmp):
    cwd = tmp / "cwd"
    cwd.mkdir()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        try:
            train(tiny(), "")
        except Exception as error:  # noqa: BLE001
            made = sorted(p.name for p in cwd.iterdir())
            return (BAD, short(f"{describe(error)}; wrote {made} into the current directory")) if made else named(
                error, ("workdir",))
    finally:
        os.chdir(here)
    return BAD, short(f"exit 0: trained into the current directory ({sorted(p.name for p in cwd.iterdir())})")


for _field in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "steps", "batch_size"):
    def _zero(tmp, field=_field):
        return refused_before_training(tmp, tiny(f"train.{field}=0"), field)
    case("empty", f"train.{_field}=0")(_zero)


@case("empty", "train.on_nonfinite='ignore' (an unknown policy)")
def _(tmp):
    config = tiny()
    config.train.on_nonfinite = "ignore"
    return refused_before_training(tmp, config, "on_nonfinite")


# =========================================================================================== lock

_LONG_TRAIN = """
import sys, warnings
warnings.simplefilter("ignore")
from nemojax import config_files
from nemojax.train import loop
config = config_files.load(sys.argv[1], sys.argv[3:])
loop.train(config, sys.argv[2], progress=False)
"""


@case("lock", "a second train job on the workdir of a live one")
def _(tmp):
    workdir = tmp / "run"
    owner = subprocess.Popen([sys.executable, "-c", _LONG_TRAIN, str(ROOT / "configs" / "tiny.py"), str(workdir),
                              *TINY, "train.steps=100000", "train.eval_every=100000"], cwd=tmp,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not steps_on_disk(workdir) and owner.poll() is None:
            time.sleep(0.2)
        if owner.poll() is not None or not steps_on_disk(workdir):
            return BAD, short("harness: the first job did not start: " + owner.stderr.read()[-300:])
        try:
            train(tiny(), workdir)
        except Exception as error:  # noqa: BLE001
            return named(error, (str(owner.pid),))
        return BAD, "not refused: the second job ran beside the first (exit 0)"
    finally:
        owner.kill()
        owner.wait()


@case("lock", "a stale lock.json of a dead process is taken over")
def _(tmp):
    workdir = tmp / "run"
    workdir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / "lock.json").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0.0,
                                                   "token": "x"}))
    try:
        summary = train(tiny(), workdir)["summary"]
    except Exception as error:  # noqa: BLE001
        return BAD, describe(error)
    left = (workdir / "lock.json").exists()
    return (BAD, "trained, but the lock is left") if left and summary["steps"] != 2 else (
        CLEAN, f"trained {summary['steps']} steps")


# =========================================================================================== garbage


def gen(model, prompts, **kwargs):
    from nemojax.infer.generate import generate

    return generate(model, prompts, **kwargs)


def shown(result) -> str:
    text = f"tokens {result.tokens}" if result.text is None else f"text {result.text!r}"
    return f"{text}, finish {result.finish_reason}"


@case("garbage", "ModelConfig pad_token_id=999 (vocab 260), then generate a ragged batch")
def _(tmp):
    def build():
        config = nemojax.presets.get(PRESET, vocab_size=VOCAB, pad_token_id=999)
        return gen(nemojax.Model(config, old_model().params), [[1, 2, 3, 4], [5]], max_new_tokens=3, eos_ids=[])
    return expect_error(build, "pad_token_id", accepted=shown)


@case("garbage", "generate with a tokenizer whose pad_id=300 is outside the vocabulary")
def _(tmp):
    from nemojax.data.tokenizers import ByteTokenizer

    class PadOutside(ByteTokenizer):
        pad_id = 300

    return expect_error(lambda: gen(old_model(), ["a", "abcd"], tokenizer=PadOutside(), max_new_tokens=3),
                        "pad_id", accepted=shown)


@case("garbage", "generate with stop=['x', ''] (an empty stop string)")
def _(tmp):
    from nemojax.data.tokenizers import ByteTokenizer

    return expect_error(lambda: gen(old_model(), ["ab"], tokenizer=ByteTokenizer(), max_new_tokens=3,
                                    stop=["x", ""]), "stop", accepted=shown)


@case("garbage", "generate with stop='ab' (a bare string, iterated per character)")
def _(tmp):
    from nemojax.data.tokenizers import ByteTokenizer

    return expect_error(lambda: gen(old_model(), ["ab"], tokenizer=ByteTokenizer(), max_new_tokens=3, stop="ab"),
                        "stop", accepted=shown)


def with_leaf(model, index: int, value: float):
    leaves, treedef = jax.tree.flatten(model.params)
    leaves[index] = leaves[index].at[(0,) * leaves[index].ndim].set(value)
    return nemojax.Model(model.config, jax.tree.unflatten(treedef, leaves))


def nonfinite_checkpoint(tmp: Path) -> Path:
    from nemojax.interop import hf

    leaves = jax.tree.leaves_with_path(old_model().params)
    index = next(i for i, (path, _) in enumerate(leaves) if "in_proj" in jax.tree_util.keystr(path))
    hf.save_hf(with_leaf(with_leaf(old_model(), index, np.nan), index + 1, np.inf), tmp / "bad")
    return tmp / "bad"


@case("garbage", "load_hf of a checkpoint holding NaN and inf weights")
def _(tmp):
    from nemojax.interop import hf

    folder = nonfinite_checkpoint(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hf.load_hf(folder)
        except Exception as error:  # noqa: BLE001
            return named(error, ("in_proj",))
    said = [str(w.message) for w in caught if "in_proj" in str(w.message)]
    return (CLEAN, "warning: " + short(said[0], 140)) if said else (BAD, "loaded with no warning")


@case("garbage", "load_hf(strict=True) of a checkpoint holding NaN and inf weights")
def _(tmp):
    from nemojax.interop import hf

    folder = nonfinite_checkpoint(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return expect_error(lambda: hf.load_hf(folder, strict=True), "in_proj",
                            accepted=lambda m: "loaded with NaN/inf weights")


def int_tensor_checkpoint(tmp: Path, dtype) -> Path:
    from nemojax.interop import hf, safetensors_file

    state = hf.to_hf_state_dict(old_model())
    state["backbone.norm_f.weight"] = np.ones(state["backbone.norm_f.weight"].shape, dtype)
    hf.save_hf(old_model(), tmp / "ckpt")
    safetensors_file.write_tensors(tmp / "ckpt", state, 1 << 40)
    return tmp / "ckpt"


for _dtype in (np.int32, np.bool_):
    def _int_tensor(tmp, dtype=_dtype):
        from nemojax.interop import hf

        folder = int_tensor_checkpoint(tmp, dtype)
        return expect_error(lambda: hf.load_hf(folder), "norm_f",
                            accepted=lambda m: f"cast to {m.params['norm_f']['scale'].dtype} silently"
                            if "norm_f" in m.params else "cast silently")
    case("garbage", f"load_hf of a checkpoint with a {np.dtype(_dtype).name} tensor for a float param")(_int_tensor)


def pad_share(cfg, split: str = "train") -> str:
    from nemojax.data import make_dataset

    batch = next(iter(make_dataset(cfg, split, seq_len=16, batch_size=2, process_index=0, process_count=1)))
    tokens = np.asarray(batch["tokens"] if isinstance(batch, dict) else batch)
    text = int(((tokens >= 0) & (tokens < 256)).sum())
    return f"a batch of {tokens.size} tokens with {text} text bytes"


@case("garbage", "a text corpus of empty files")
def _(tmp):
    from nemojax.data import DataConfig

    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text("")
    cfg = DataConfig(kind="text", paths=(str(tmp),), val_fraction=0.0)
    return expect_error(lambda: pad_share(cfg), "paths", accepted=lambda s: s)


@case("garbage", "a jsonl corpus whose texts are all ''")
def _(tmp):
    from nemojax.data import DataConfig

    (tmp / "d.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    cfg = DataConfig(kind="jsonl", paths=(str(tmp / "d.jsonl"),), val_fraction=0.0)
    return expect_error(lambda: pad_share(cfg), "text_field", accepted=lambda s: s)


@case("garbage", "a validation folder of empty files (val_paths)")
def _(tmp):
    from nemojax.data import DataConfig

    (tmp / "train.txt").write_text("some text " * 50)
    (tmp / "val").mkdir()
    (tmp / "val" / "v.txt").write_text("")
    cfg = DataConfig(kind="text", paths=(str(tmp / "train.txt"),), val_paths=(str(tmp / "val"),))
    return expect_error(lambda: pad_share(cfg, "validation"), "val_paths", accepted=lambda s: s)


PROMPT_CASES = [
    ("float prompt ids [[1.7, 2.0]]", [[1.7, 2.0]]),
    ("a float numpy prompt array [[1.7, 2.0]]", np.array([[1.7, 2.0]])),
    ("prompt id 260 = vocab_size", [[1, VOCAB]]),
    ("negative prompt id [[1, -1]]", [[1, -1]]),
    ("bool prompt ids [[True, 2]]", [[True, 2]]),
    ("an empty prompt list []", []),
    ("an empty prompt in a batch [[1, 2], []]", [[1, 2], []]),
    ("a flat list of ids [1, 2, 3] (not a batch)", [1, 2, 3]),
]
for _label, _prompts in PROMPT_CASES:
    def _prompt(tmp, prompts=_prompts):
        return expect_error(lambda: gen(old_model(), prompts, max_new_tokens=2, eos_ids=[]), "prompts",
                            accepted=shown)
    case("garbage", f"generate with {_label}")(_prompt)


# =========================================================================================== config


def _configs():
    from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig

    return ModelConfig, MambaConfig, AttentionConfig, MoEConfig, MTPConfig


MAMBA = dict(num_heads=4, head_dim=8, state_size=8, n_groups=2, chunk_size=16)
ATTN = dict(num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4)
MOE = dict(num_experts=8, top_k=2, intermediate_size=16, shared_intermediate_size=32)


def build_config(cls_name: str, field: str, value: Any):
    ModelConfig, MambaConfig, AttentionConfig, MoEConfig, MTPConfig = _configs()
    if cls_name == "ModelConfig":
        base = dict(vocab_size=64, hidden_size=32, pattern="M*-E", mamba=MambaConfig(**MAMBA),
                    attention=AttentionConfig(**ATTN), intermediate_size=48, moe=MoEConfig(**MOE))
        return ModelConfig(**{**base, field: value})
    cls, base = {"MambaConfig": (MambaConfig, MAMBA), "AttentionConfig": (AttentionConfig, ATTN),
                 "MoEConfig": (MoEConfig, MOE), "MTPConfig": (MTPConfig, {})}[cls_name]
    return cls(**{**base, field: value})


CONFIG_CASES = [
    ("ModelConfig", "max_position_embeddings", 0),
    ("ModelConfig", "max_position_embeddings", "4096"),
    ("ModelConfig", "initializer_range", 0.0),
    ("ModelConfig", "initializer_range", math.nan),
    ("ModelConfig", "bos_token_id", 64),
    ("ModelConfig", "bos_token_id", -1),
    ("ModelConfig", "eos_token_id", 2.0),
    ("ModelConfig", "eos_token_id", [2, 64]),
    ("ModelConfig", "pad_token_id", 100),
    ("ModelConfig", "pad_token_id", "0"),
    ("ModelConfig", "mlp_bias", "true"),
    ("ModelConfig", "tie_word_embeddings", "false"),
    ("ModelConfig", "norm_eps", math.inf),
    ("ModelConfig", "norm_eps", "1e-5"),
    ("ModelConfig", "vocab_size", 64.0),
    ("MambaConfig", "use_conv_bias", "true"),
    ("MambaConfig", "time_step_floor", -1e-4),
    ("MambaConfig", "time_step_floor", math.nan),
    ("MambaConfig", "time_step_limit", (math.inf, math.inf)),
    ("MambaConfig", "conv_kernel", "4"),
    ("AttentionConfig", "rope_theta", math.inf),
    ("AttentionConfig", "partial_rotary_factor", "0.5"),
    ("MoEConfig", "routed_scaling_factor", math.nan),
    ("MoEConfig", "routed_scaling_factor", "2.5"),
    ("MoEConfig", "n_shared_experts", "1"),
    ("MTPConfig", "num_layers", "1"),
    ("MTPConfig", "pattern", ["*", "E"]),
]
for _cls, _field, _value in CONFIG_CASES:
    def _config(tmp, cls=_cls, field=_field, value=_value):
        return expect_error(lambda: build_config(cls, field, value), field,
                            accepted=lambda c: f"{field}={getattr(c, field)!r} kept")
    case("config", f"{_cls}({_field}={_value!r})")(_config)


def hf_config(**changes: Any) -> dict[str, Any]:
    """A minimal hybrid config.json (pattern "M*-E"); a change to None drops that key."""
    d: dict[str, Any] = dict(
        model_type="nemotron_h", vocab_size=64, hidden_size=32, num_hidden_layers=4, hybrid_override_pattern="M*-E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=16, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
    )
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def from_hf(d: dict[str, Any]):
    return _configs()[0].from_hf(d)


HF_CASES = [
    ("time_step_limit=0.1", {"time_step_limit": 0.1}, "time_step_limit"),
    ("mamba_num_heads=[4]", {"mamba_num_heads": [4]}, ("mamba_num_heads", "mamba.num_heads")),
    ("hybrid_override_pattern=4", {"hybrid_override_pattern": 4}, "hybrid_override_pattern"),
    ("use_conv_bias='true'", {"use_conv_bias": "true"}, ("use_conv_bias", "mamba.use_conv_bias")),
    ("eos_token_id=[99, 2] (vocab 64)", {"eos_token_id": [99, 2]}, "eos_token_id"),
    ("pad_token_id=1.5", {"pad_token_id": 1.5}, "pad_token_id"),
    ("num_nextn_predict_layers='1'", {"num_nextn_predict_layers": "1"},
     ("num_nextn_predict_layers", "mtp.num_layers")),
]
for _label, _changes, _key in HF_CASES:
    def _hf(tmp, changes=_changes, key=_key):
        return expect_error(lambda: from_hf(hf_config(**changes)), key,
                            accepted=lambda c: "built a config")
    case("config", f"config.json {_label}")(_hf)


@case("config", "config.json layer_norm_epsilon=Infinity (then a forward pass)")
def _(tmp):
    def build():
        config = from_hf(hf_config(layer_norm_epsilon=math.inf))
        model = nemojax.Model.init(config, 0)
        logits = np.asarray(model(jnp.asarray([[1, 2, 3, 4], [9, 8, 7, 6]])))
        return float(np.ptp(logits))
    return expect_error(build, "layer_norm_epsilon", accepted=lambda spread: f"logits spread {spread:g} "
                        f"({'constant' if spread == 0 else 'not constant'})")


@case("config", "config.json hybrid_override_pattern and layers_block_type that disagree")
def _(tmp):
    d = hf_config(layers_block_type=["mamba", "mlp", "attention", "moe"])
    return expect_error(lambda: from_hf(d), "layers_block_type", accepted=lambda c: f"built pattern {c.pattern!r}")


@case("config", "config.json mtp_hybrid_override_pattern and mtp_layers_block_type that disagree")
def _(tmp):
    d = hf_config(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
                  mtp_layers_block_type=["attention", "mlp"])
    return expect_error(lambda: from_hf(d), ("mtp_hybrid_override_pattern", "mtp_layers_block_type"),
                        accepted=lambda c: f"built MTP pattern {c.mtp.pattern!r}")


@case("config", "ModelConfig.from_hf given a list, not a dict")
def _(tmp):
    # the fault is the input's type: a message that names it (dict / list / object / mapping)
    return expect_error(lambda: from_hf([("vocab_size", 64)]), ("dict", "list", "object", "mapping"),
                        accepted=lambda c: "built a config")


@case("config", "model.replace(mamba={'heads': 4}) (an unknown sub-config field)")
def _(tmp):
    return expect_error(lambda: build_config("ModelConfig", "mlp_bias", False).replace(mamba={"heads": 4}),
                        "heads", accepted=lambda c: "replaced")


# =========================================================================================== names


@memo
def sharded_bytes() -> dict[str, bytes]:
    """The files of a sharded save of old_model, to copy into each case's folder."""
    folder = FIXTURES / "sharded"
    _save_hf(old_model(), 40_000)(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def sharded(tmp: Path) -> Path:
    folder = tmp / "ckpt"
    folder.mkdir()
    for name, data in sharded_bytes().items():
        (folder / name).write_bytes(data)
    return folder


def load_named(folder: Path, *fragments: Fragment) -> Outcome:
    from nemojax.interop import hf

    return expect_error(lambda: hf.load_hf(folder), *fragments, accepted=lambda m: "loaded")


for _keep in ("all but 100 bytes", "5 bytes", "0 bytes"):
    def _truncated(tmp, keep=_keep):
        folder = sharded(tmp)
        shard = sorted(folder.glob("model-*.safetensors"))[1]
        data = shard.read_bytes()
        shard.write_bytes(data[: {"all but 100 bytes": len(data) - 100, "5 bytes": 5, "0 bytes": 0}[keep]])
        return load_named(folder, shard.name)
    case("names", f"a shard truncated to {_keep}")(_truncated)


@case("names", "a shard whose safetensors header is not JSON")
def _(tmp):
    folder = sharded(tmp)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\x01{["
    shard.write_bytes(bytes(data))
    return load_named(folder, shard.name)


@case("names", "config.json that is not valid JSON")
def _(tmp):
    folder = sharded(tmp)
    (folder / "config.json").write_text('{"model_type": "nemotron_h",')
    return load_named(folder, "config.json")


@case("names", "config.json holding a JSON list")
def _(tmp):
    folder = sharded(tmp)
    (folder / "config.json").write_text("[]")
    return load_named(folder, "config.json")


@case("names", "an index that is not valid JSON")
def _(tmp):
    folder = sharded(tmp)
    (folder / "model.safetensors.index.json").write_text("{not json")
    return load_named(folder, "model.safetensors.index.json")


@case("names", "an index without weight_map")
def _(tmp):
    folder = sharded(tmp)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": json.loads(index.read_text())["metadata"]}))
    return load_named(folder, "model.safetensors.index.json")


@case("names", "an index naming a shard that is missing")
def _(tmp):
    folder = sharded(tmp)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return load_named(folder, shard.name)


@case("names", "hf_quant_config.json that is not valid JSON")
def _(tmp):
    folder = sharded(tmp)
    (folder / "hf_quant_config.json").write_text('{"quantization": ')
    return load_named(folder, "hf_quant_config.json")


@case("names", "a folder without config.json")
def _(tmp):
    (tmp / "empty").mkdir()
    return load_named(tmp / "empty", "config.json")


CLI_TRAIN = ["--no-progress"] + [f"--config.{o}" for o in TINY]


def cli_train(tmp: Path, *extra: str, workdir: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(tmp, "train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                   str(tmp / "run") if workdir is None else workdir, *CLI_TRAIN, *extra)


@case("names", "CLI: nemojax train --config.train.steps=-1")
def _(tmp):
    return cli_outcome(cli_train(tmp, "--config.train.steps=-1"), "steps")


@case("names", "CLI: nemojax train --config.train.nope=1 (an unknown field)")
def _(tmp):
    return cli_outcome(cli_train(tmp, "--config.train.nope=1"), "nope")


@case("names", "CLI: nemojax train --config missing.py")
def _(tmp):
    return cli_outcome(run_cli(tmp, "train", "--config", str(tmp / "missing.py"), "--workdir", "w"), "missing.py")


@case("names", "CLI: nemojax train --config.train.steps (no value)")
def _(tmp):
    return cli_outcome(cli_train(tmp, "--config.train.steps"), "steps")


@case("names", "CLI: nemojax train into a workdir of another configuration (seq_len 16 vs 32)")
def _(tmp):
    workdir = copy_run(tmp)
    before = steps_on_disk(workdir)
    outcome = cli_outcome(cli_train(tmp, "--config.train.seq_len=16", workdir=str(workdir)), "seq_len")
    if steps_on_disk(workdir) != before:
        return BAD, f"{outcome[1]}; checkpoints changed {before} -> {steps_on_disk(workdir)}"
    return outcome


@case("names", "CLI: nemojax train with a diverging loss (lr=1e30)")
def _(tmp):
    return cli_outcome(cli_train(tmp, "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
                                 "--config.train.steps=3"), "finite")


@case("names", "CLI: nemojax train --workdir ''")
def _(tmp):
    (tmp / "cwd").mkdir()
    done = subprocess.run([sys.executable, "-m", "nemojax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--workdir", "", *CLI_TRAIN], cwd=tmp / "cwd", env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    made = sorted(p.name for p in (tmp / "cwd").iterdir())
    outcome = cli_outcome(done, "workdir")
    return (BAD, short(f"{outcome[1]}; wrote {made} into the current directory")) if made else outcome


@case("names", "CLI: nemojax train --config.train.keep_checkpoints=0")
def _(tmp):
    return cli_outcome(cli_train(tmp, "--config.train.keep_checkpoints=0"), "keep_checkpoints")


@case("names", "CLI: nemojax generate --checkpoint on a truncated shard")
def _(tmp):
    folder = sharded(tmp)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return cli_outcome(run_cli(tmp, "generate", "--checkpoint", str(folder), "--prompt", "ab",
                               "--max-new-tokens", "2"), shard.name)


@case("names", "CLI: nemojax generate --stop '' (an empty stop string)")
def _(tmp):
    folder = tmp / "ckpt"
    _save_hf(old_model())(folder)
    return cli_outcome(run_cli(tmp, "generate", "--checkpoint", str(folder), "--tokenizer", "byte", "--prompt", "ab",
                               "--max-new-tokens", "2", "--stop", ""), "stop")


@case("names", "CLI: nemojax generate --checkpoint of a missing folder")
def _(tmp):
    return cli_outcome(run_cli(tmp, "generate", "--checkpoint", str(tmp / "nonexistent"), "--prompt", "x"),
                       "nonexistent")


@case("names", "CLI: nemojax params --preset nope")
def _(tmp):
    return cli_outcome(run_cli(tmp, "params", "--preset", "nope"), "nope")


# =========================================================================================== inputs

GEN_ARG_CASES = [
    ({"eos_ids": [VOCAB]}, "eos_ids"),
    ({"eos_ids": 2}, "eos_ids"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"speculative": -1}, "speculative"),
    ({"prompt_open": [True, False]}, "prompt_open"),
]
for _kwargs, _name in GEN_ARG_CASES:
    def _gen_arg(tmp, kwargs=_kwargs, name=_name):
        return expect_error(lambda: gen(old_model(), [[1, 2, 3]], **{"max_new_tokens": 2, **kwargs}), name,
                            accepted=shown)
    case("inputs", "generate with " + ", ".join(f"{k}={v!r}" for k, v in _kwargs.items()))(_gen_arg)


def qshow(q) -> str:
    try:
        values = np.asarray(q.dequantize(), np.float64)
    except Exception as error:  # noqa: BLE001
        return f"a QArray that cannot dequantize ({describe(error)})"
    finite = bool(np.isfinite(values).all())
    return f"QArray {tuple(q.shape)} ({values.dtype}), dequantized {'finite' if finite else 'NaN/inf'}" + (
        f", e.g. {values.reshape(-1)[:2].tolist()}" if values.size else ", empty")


def _quantize(x, fmt, **kwargs):
    from nemojax.lowp.qarray import quantize

    return quantize(x, fmt, **kwargs)


for _fmt in ("fp8_e4m3", "nvfp4", "mxfp8"):
    def _empty(tmp, fmt=_fmt):
        return expect_error(lambda: _quantize(jnp.zeros((0, 32)), fmt), "(0, 32)", accepted=qshow)
    case("inputs", f"quantize an empty (0, 32) array as {_fmt}")(_empty)


@case("inputs", "quantize an empty (0, 32) array as fp8_e4m3 with amax=1.0")
def _(tmp):
    return expect_error(lambda: _quantize(jnp.zeros((0, 32)), "fp8_e4m3", amax=1.0), "(0, 32)", accepted=qshow)


@case("inputs", "fp8 current_scaling of an empty (0, 4) array")
def _(tmp):
    from nemojax.lowp.fp8 import current_scaling

    return expect_error(lambda: current_scaling(jnp.zeros((0, 4))), "(0, 4)", accepted=qshow)


for _scale in (0.0, math.inf, math.nan):
    def _scale_case(tmp, scale=_scale):
        from nemojax.lowp.fp8 import quantize_fp8

        return expect_error(lambda: quantize_fp8(jnp.ones((2, 4)), scale), "scale", accepted=qshow)
    case("inputs", f"quantize_fp8 with a host scale={_scale}")(_scale_case)


for _dtype_name in ("int32", "bool"):
    def _int_quant(tmp, dtype=_dtype_name):
        return expect_error(lambda: _quantize(jnp.ones((4, 32), dtype), "nvfp4"), "dtype", accepted=qshow)
    case("inputs", f"quantize a {_dtype_name} array as nvfp4")(_int_quant)


@case("inputs", "quantize_fp8 of an int32 array")
def _(tmp):
    from nemojax.lowp.fp8 import quantize_fp8

    return expect_error(lambda: quantize_fp8(jnp.ones((4, 32), jnp.int32), jnp.float32(1.0)), "dtype",
                        accepted=qshow)


for _fmt, _amax in (("fp8_e4m3", math.inf), ("nvfp4", math.nan), ("nvfp4", -1.0), ("fp8_e4m3", "array")):
    def _amax_case(tmp, fmt=_fmt, amax=_amax):
        value = np.array([1.0, np.inf]) if amax == "array" else amax
        return expect_error(lambda: _quantize(jnp.ones((2, 4, 32)), fmt, amax=value), "amax", accepted=qshow)
    case("inputs", f"quantize as {_fmt} with amax={'[1.0, inf]' if _amax == 'array' else _amax}")(_amax_case)


@case("inputs", "QArray with fmt='fp9' and with dtype='int8'")
def _(tmp):
    from nemojax.lowp.qarray import QArray

    data, scale = jnp.zeros((2, 16), jnp.float8_e4m3fn), jnp.ones((), jnp.float32)
    first = expect_error(lambda: QArray(data, scale, None, "fp9", 1, "float32").dequantize(), "fp9",
                         accepted=lambda q: "built")
    second = expect_error(lambda: QArray(data, scale, None, "fp8_e4m3", 1, "int8"), "dtype",
                          accepted=lambda q: f"built; dequantizes to {q.dequantize().dtype}")
    status = CLEAN if first[0] == second[0] == CLEAN else BAD
    return status, short(f"fp9: {first[1]} | int8: {second[1]}")


@case("inputs", "quantize under jit with a traced amax equals the eager result (control)")
def _(tmp):
    x = jax.random.normal(jax.random.key(0), (4, 32))
    eager = _quantize(x, "nvfp4", amax=3.0).dequantize()
    traced = jax.jit(lambda x, a: _quantize(x, "nvfp4", amax=a).dequantize())(x, jnp.float32(3.0))
    same = np.array_equal(np.asarray(traced), np.asarray(eager))
    return (CLEAN, "identical") if same else (BAD, "traced and eager results differ")


# =========================================================================================== running


def run_case(item: Case, root: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    start = time.time()
    captured = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if item.background:
                status, observation = item.run(tmp)
            else:
                with contextlib.redirect_stdout(captured):
                    status, observation = item.run(tmp)
    except Exception as error:  # noqa: BLE001 - a harness error is shown plainly, as bad
        status, observation = BAD, short("uncaught in the harness: " + describe(error) + " at "
                                         + traceback.format_exc().strip().splitlines()[-3].strip())
    seconds = time.time() - start
    observation = observation.replace(str(tmp), "<tmp>")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"group": item.group, "name": item.name, "status": status, "observation": observation,
            "seconds": round(seconds, 1)}


def run_all(only: str | None) -> dict[str, Any]:
    _configure_jax()
    commit = tree_commit(ROOT)
    header = {"cpu": cpu_model(), "nemojax": nemojax.__file__, "tree": str(ROOT), "commit": commit,
              "python": sys.version.split()[0], "jax": jax.__version__, "host": socket.gethostname()}
    for key, value in header.items():
        print(f"{key}: {value}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="fault-cases-"))
    selected = [c for c in CASES if only is None or only in f"{c.group} {c.name}"]
    results: dict[int, dict[str, Any]] = {}
    threads = []
    start = time.time()
    for index, item in enumerate(selected):  # the cases that may hang wait beside the others
        if item.background:
            thread = threading.Thread(target=lambda i=index, c=item: results.__setitem__(i, run_case(c, root)))
            thread.start()
            threads.append(thread)
    for index, item in enumerate(selected):
        if not item.background:
            results[index] = run_case(item, root)
            r = results[index]
            print(f"[{r['status']:5}] {r['seconds']:5.1f}s {item.group}: {item.name}: {r['observation']}", flush=True)
    for thread in threads:
        thread.join()
    for index, item in enumerate(selected):
        if item.background:
            r = results[index]
            print(f"[{r['status']:5}] {r['seconds']:5.1f}s {item.group}: {item.name}: {r['observation']}", flush=True)
    ordered = [results[i] for i in range(len(selected))]
    clean = sum(r["status"] == CLEAN for r in ordered)
    header["seconds"] = round(time.time() - start, 1)
    print(f"{len(ordered)} cases: {clean} clean, {len(ordered) - clean} bad, {header['seconds']} s", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    shutil.rmtree(FIXTURES, ignore_errors=True)
    return {"meta": header, "cases": ordered}


# =========================================================================================== comparing


def cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "(not run)"
    text = re.sub(r"/tmp/fault-cases-\w+/case-\w+", "<tmp>", r["observation"])  # runs before paths were cut
    text = short(text, 150).replace("|", "\\|")
    return f"{'clean' if r['status'] == CLEAN else '**bad**'}: {text}"


def compare(before_path: str, after_path: str) -> str:
    before, after = (json.loads(Path(p).read_text()) for p in (before_path, after_path))
    key = lambda r: (r["group"], r["name"])  # noqa: E731
    b = {key(r): r for r in before["cases"]}
    a = {key(r): r for r in after["cases"]}
    names = list(dict.fromkeys([*map(key, after["cases"]), *map(key, before["cases"])]))
    lines = ["# Fault cases of issue 15: before and after", "",
             f"- before: commit {before['meta']['commit']} ({before['meta']['tree']}), "
             f"{before['meta']['seconds']} s on {before['meta']['cpu']}",
             f"- after: commit {after['meta']['commit']} ({after['meta']['tree']}), "
             f"{after['meta']['seconds']} s on {after['meta']['cpu']}", "",
             "clean: the issue's wanted behaviour (a named error, the old checkpoint intact, or the correct result);",
             "bad: silent garbage, data loss, a raw error without the name, a hang, or a traceback for a user error.",
             ""]
    for group, title in GROUPS.items():
        rows = [n for n in names if n[0] == group]
        if not rows:
            continue
        lines += [f"## {title}", "", "| case | before | after |", "|---|---|---|"]
        lines += [f"| {n[1].replace('|', chr(92) + '|')} | {cell(b.get(n))} | {cell(a.get(n))} |" for n in rows]
        lines.append("")
    both = [n for n in names if n in a and n in b]
    clean_before = sum(b[n]["status"] == CLEAN for n in both)
    clean_after = sum(a[n]["status"] == CLEAN for n in both)
    fixed = [n for n in both if b[n]["status"] == BAD and a[n]["status"] == CLEAN]
    broken = [n for n in both if b[n]["status"] == CLEAN and a[n]["status"] == BAD]
    bad_after = [n for n in names if n in a and a[n]["status"] == BAD]
    lines += ["## Totals", "",
              f"- cases tried: {len(both)} (on both sides; {len(names)} in all)",
              f"- clean before: {clean_before}",
              f"- clean after: {clean_after}",
              f"- bad before and clean after: {len(fixed)}",
              f"- clean before and bad after: {len(broken)}" + "".join(f"\n  - {g}: {n}" for g, n in broken),
              f"- bad after: {len(bad_after)}" + "".join(f"\n  - {g}: {n}: {a[(g, n)]['observation']}"
                                                          for g, n in bad_after), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", help="run only the cases whose 'group name' contains this")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                        help="print the markdown table of two runs instead of running")
    parser.add_argument("--md", help="with --compare: also write the table here")
    args = parser.parse_args()
    if args.compare:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)  # made at import, used only by runs
        shutil.rmtree(FIXTURES, ignore_errors=True)
        table = compare(*args.compare)
        print(table)
        if args.md:
            Path(args.md).write_text(table)
        return
    results = run_all(args.only)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
