"""One writer at a time: operating-system file locks on a lab folder, a run folder and a
feature-cache file.

A lock is `flock` on a small file beside what it guards (the `filelock` package), held for as
long as the work lasts. The kernel releases it when the holder exits, however it exits, so a
killed process never leaves a stale lock: the next process proceeds at once. The holder writes
its pid, start time and command into the lock file, so a process that finds it taken can say
who holds it. Locks are re-entrant within a process (one lock object per path), so the lab can
hold its folder while the training it starts holds each run folder.

    lab/.lock                      the lab folder (cifar4 lab)
    runs/<run>/.lock               a run folder (train, resume, the lab's runs)
    <cache>/features/<file>.lock   one feature-cache file (frozen-backbone features)
    <sweeps>/<study>/study.lock    opening (and first creating) a sweep's study
    <sweeps>/<study>/trials.lock   a sweep worker counting the study's trials and starting one
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import LockedError, RunError

LOCK_NAME = ".lock"  # inside a lab or run folder


def _stamp(fd: int) -> None:
    """Record the holder in the lock file (called by filelock once the lock is ours)."""
    command = " ".join(["cifar4", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    info = {"pid": os.getpid(),
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command[:300]}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def holder(path: str | Path) -> dict[str, Any] | None:
    """Who holds (or last held) the lock at `path`, as its holder wrote it; None if unknown."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} since {info.get('since', '?')} ({info.get('command', '?')})"


def _lock(path: Path) -> FileLock:
    # One object per path in this process (is_singleton), shared by its threads, so nested
    # holds of the same path re-enter instead of waiting for themselves. The lock file stays on
    # release (preserve_lock_file): every waiter locks the same inode.
    return FileLock(path, is_singleton=True, thread_local=False, preserve_lock_file=True,
                    fallback_to_soft=False, on_acquired=_stamp)


@contextlib.contextmanager
def hold(path: str | Path, what: str, wait: bool = True,
         notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock at `path` (guarding `what`, e.g. "lab folder 'lab'") for the block.

    Taken by another process: with `wait`, say so once through `notify` and wait for it;
    without, raise LockedError naming the holder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            who = describe(holder(path))
            if not wait:
                raise LockedError(f"{what} is in use by {who}; wait for it to finish or run "
                                  f"without --no-wait to wait") from None
            if notify is not None:
                notify(f"waiting for {what}: in use by {who}")
            lock.acquire()
    except OSError as e:  # a read-only or full file system, a missing folder, ...
        raise RunError(f"cannot lock {what} ('{path}'): {e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


def run_lock(folder: str | Path, wait: bool = False,
             notify: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[None]:
    """The lock of a run folder: one process trains (or resumes) a run at a time."""
    folder = Path(folder)
    return hold(folder / LOCK_NAME, f"run '{folder}'", wait, notify)


def is_held(path: str | Path) -> bool:
    """Whether another process holds the lock at `path` right now (a probe, not a hold)."""
    path = Path(path)
    if not path.exists():
        return False
    lock = _lock(path)
    if lock.is_locked:  # this process holds it
        return False
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False
