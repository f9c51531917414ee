"""Exclusive claims on a folder by one process: a JSON lock file ({"pid", "host", "started", "token"}) created
atomically, so exactly one of two racing processes gets it. Training holds one on its workdir
(`nemojax.train.checkpoint.WorkdirLock`), a checkpoint save on its target folder (`nemojax.interop`)."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from nemojax.errors import CheckpointError


class FolderLockedError(CheckpointError):
    """Another live process holds the folder's lock."""


# tokens of the locks this process holds now: a lock file naming this pid with a token not in here was left by an
# exit that could not remove it (an exception inside release), and is as stale as one of a dead process
_HELD_TOKENS: set[str] = set()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The owner record in lock file `path`, or None (no file, or one cut short by a crash)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def held_by_live_owner(path: Path) -> dict[str, Any] | None:
    """The owner record of lock file `path` while its owner may still run (alive on this host, or on another host,
    which cannot be checked); None when there is no lock or its owner is a dead process of this host."""
    held = read_lock(path)
    if held is None or held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return held
    if held["pid"] == os.getpid():
        return held if held.get("token") in _HELD_TOKENS else None
    return held if process_alive(held["pid"]) else None


def describe_owner(held: dict[str, Any] | None) -> str:
    return f"process {held.get('pid')} on host {held.get('host')}" if held else "another process"


class FolderLock:
    """`folder/<file_name>` held by this process. A second claimant is refused with `error` naming the owner's
    pid and host ("{folder} is in use by process P on host H ... {purpose}"); a lock left by a dead process on this
    host is taken over with a warning (one on another host cannot be checked, so it is refused; delete the file once
    that process is gone). Use as a context manager or call `release()`; release removes the file only while it is
    still this holder's. The folder is created if missing."""

    def __init__(self, folder: str | os.PathLike, file_name: str, *, purpose: str = "",
                 error: type[CheckpointError] = FolderLockedError):
        self.path = Path(folder).absolute() / file_name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "token": uuid.uuid4().hex}
        if self._create():
            return
        held = read_lock(self.path)
        if held is not None and held_by_live_owner(self.path) is None:
            if held.get("pid") != os.getpid():
                warnings.warn(f"{self.path}: taking over the lock of process {held['pid']} on {held['host']}, "
                              "which is no longer running", stacklevel=3)
            self._remove_if(held)
            if self._create():
                return
            held = read_lock(self.path)
        raise error(f"{self.path.parent} is in use by {describe_owner(held)}{' (' + purpose + ')' if purpose else ''}"
                    f"; lock file {self.path}: wait for that process to end, or delete the lock file if it is gone")

    def _create(self) -> bool:
        # written whole under a private name, then hard-linked to the lock's name: the link fails if it exists
        temporary = self.path.with_name(f".{self.path.name}.{self.owner['token']}.tmp")
        temporary.write_text(json.dumps(self.owner))
        try:
            os.link(temporary, self.path)
        except (FileExistsError, FileNotFoundError):  # lost the race (the winner may have removed our temporary)
            return False
        finally:
            temporary.unlink(missing_ok=True)
        _HELD_TOKENS.add(self.owner["token"])
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # of claimants killed mid-claim
            leftover.unlink(missing_ok=True)
        return True

    def _remove_if(self, expected: dict[str, Any]) -> None:
        if read_lock(self.path) == expected:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        _HELD_TOKENS.discard(self.owner["token"])
        self._remove_if(self.owner)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
