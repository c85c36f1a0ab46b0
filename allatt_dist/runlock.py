"""One writer per run directory: a lock taken by a command before it writes there.

    RUN_DIR/.lock     {"pid", "host", "command", "started"} of the holder; locked with flock(2)

The lock is `flock` on that file, so the kernel releases it when its holder dies however it dies
(SIGKILL included): a lock file left by a dead process is not held, and the next command takes it
over. A second command on a directory in use (or on a folder inside one) is refused in one line that
names the other process. flock works across processes of one machine and over NFS on Linux (where it
is mapped to a POSIX lock); a directory shared between machines any other way is not protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from allatt_dist.errors import UserError

LOCK_NAME = ".lock"


class RunDirInUse(UserError):
    """Another live process holds the lock of this directory (or of a folder around it)."""


def _holder(path: Path) -> str:
    """The holder recorded in a lock file, as words: 'pid 123 on host (allatt-dist train ...)'."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (starting up)"
    return f"pid {info['pid']} on {info.get('host', '?')} ({info.get('command', '?')})"


def _is_held(path: Path) -> bool:
    """Whether a live process holds the lock file at `path` (a probe: nothing is kept)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _check_ancestors(run_dir: Path) -> None:
    for parent in run_dir.parents:
        lock = parent / LOCK_NAME
        if lock.is_file() and _is_held(lock):
            raise RunDirInUse(f"{run_dir}: inside {parent}, which is in use by {_holder(lock)}")


def check_not_in_use(path: str | Path) -> None:
    """For a command that writes one thing (a model directory) rather than a run: refused when `path`
    lies inside a directory that a live process holds."""
    _check_ancestors(Path(path).resolve())


def _acquire(lock: Path, run_dir: Path) -> int:
    """flock `lock` (created when absent); refused when held. Retries when the file was replaced
    between open and flock (its holder unlinked it on release), so two takers never both win."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(
                f"{run_dir}: in use by {_holder(lock)}; wait for it to end or use another directory"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def this_command() -> str:
    """This process's command line as the lock records it (the CLI's as `allatt-dist ...`)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    prog = "allatt-dist" if "allatt_dist" in argv0 or argv0.endswith("allatt-dist") else Path(argv0).name
    return " ".join([prog, *sys.argv[1:]])[:300]


@contextmanager
def hold(run_dir: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold `run_dir`'s lock for the block (the folder is created if needed; a folder this call
    created and that is still empty at the end is removed again, so refused input leaves nothing).

    Raises `RunDirInUse` (one line, exit 2) when a live process holds it, or holds a folder around it."""
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    _check_ancestors(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    fd = _acquire(lock, run_dir)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or this_command(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield lock
    finally:
        try:
            lock.unlink()  # before the unlock: a taker that opened this inode sees it replaced and retries
        except FileNotFoundError:
            pass
        os.close(fd)
        if created:
            try:
                run_dir.rmdir()  # only when empty: what the command wrote stays
            except OSError:
                pass
