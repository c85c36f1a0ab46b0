"""One writer per run directory: a lock taken by a command before it writes there.

    RUN_DIR/.lock     {"pid", "host", "command", "started"} of the holder; locked with flock(2)

The lock is `flock` on that file, so the kernel releases it when its holder dies however it dies
(SIGKILL included): a lock file left by a dead process is not held, and the next command takes it
over. A second command on a directory in use (or on a folder inside one) is refused in one line that
names the other process. flock works across processes of one machine and over NFS on Linux (where it
is mapped to a POSIX lock); a directory shared between machines any other way is not protected.

A run directory in object storage (rundir.py) has no flock: its lock is a lease, the object
PREFIX/.lock, holding the holder, a token of its own and a heartbeat (the holder's wall-clock time) that the
holder rewrites every BEAT s (20). A lock whose heartbeat is LEASE s old (90), or whose holder is a dead
process on this machine, is taken over. Two takers racing both write it; each reads it back after a second
and only the one whose write stands proceeds (S3 reads after writes are consistent), so of two commands
started together one is refused.

Fencing: a holder that misses its renewals (frozen, cut off from the bucket) must stop writing before anyone
may take over. Every publish of a process of the run (`RunDir.push`/`delete`: the driver, its trials and
workers; the lease's key and token travel with the pickled RunDir) first reads the lease and refuses
(`LeaseLost`, the command ends) unless it still holds this run's token and its heartbeat is under
LEASE - GRACE s old (75 s): a taker waits LEASE s, so the GRACE (15 s) covers the clock difference between
the holder's and the taker's machines plus the time from that check to the upload's end. What is
guaranteed and under which clock assumptions: docs/architecture.md ("One writer per run directory").
ALLATT_LEASE_S and ALLATT_LEASE_BEAT_S change the periods (the grace is LEASE / 6).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from allatt_dist.errors import EnvironmentFailure, UserError
from allatt_dist.storage import claim_driver, pid_alive, release_driver, retrying, try_claim

if TYPE_CHECKING:
    from allatt_dist.rundir import RunDir

LOCK_NAME = ".lock"
SETTLE_S = 1.0  # object-storage lease: read-back delay of a taker


def lease_periods() -> tuple[float, float, float]:
    """(expiry, heartbeat, grace) of the object-storage lease in seconds: 90, 20 and 15 unless
    ALLATT_LEASE_S / ALLATT_LEASE_BEAT_S say otherwise (the grace is a sixth of the expiry)."""
    try:
        lease = float(os.environ.get("ALLATT_LEASE_S") or 90.0)
        beat = float(os.environ.get("ALLATT_LEASE_BEAT_S") or 20.0)
    except ValueError:
        raise UserError("ALLATT_LEASE_S / ALLATT_LEASE_BEAT_S: give seconds (numbers)") from None
    if not 0 < beat < lease * 5 / 6:
        raise UserError(f"ALLATT_LEASE_BEAT_S ({beat}) must be above 0 and below 5/6 of ALLATT_LEASE_S ({lease})")
    return lease, beat, lease / 6


HELD: dict[str, tuple[str, str]] = {}  # URI -> (key, token) of the leases this process holds now


class LeaseLost(EnvironmentFailure):
    """This run's lease in the bucket is no longer this run's (or not renewed in time): stop writing."""


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
    """flock `lock` (created when absent; storage.try_claim); refused when held."""
    fd = try_claim(lock)
    if fd is None:
        raise RunDirInUse(f"{run_dir}: in use by {_holder(lock)}; wait for it to end or use another directory")
    return fd


def this_command() -> str:
    """This process's command line as the lock records it (the CLI's as `allatt-dist ...`)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    prog = "allatt-dist" if "allatt_dist" in argv0 or argv0.endswith("allatt-dist") else Path(argv0).name
    return " ".join([prog, *sys.argv[1:]])[:300]


def _info(command: str | None) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or this_command(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _lease_live(info: dict | None) -> bool:
    """Whether a lease read from object storage still holds its directory."""
    if not info or "beat" not in info:
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return False  # its holder on this machine is gone (killed): no need to wait out the lease
    return time.time() - float(info["beat"]) < lease_periods()[0]


def check_lease(remote, lease: tuple[str, str]) -> None:
    """Before a publish: the lease `(key, token)` is still this run's and was renewed within LEASE - GRACE
    (a taker waits LEASE); `LeaseLost` otherwise. One read of the lease object. In the process holding the
    lease its own record wins (a RunDir that Tune pickled with an earlier command's search names that one's)."""
    key, token = HELD.get(remote.uri, lease)
    fs = remote.filesystem()
    info = retrying("lease check", remote.child(LOCK_NAME).uri, lambda: _read_lease(fs, key)) or {}
    expiry, _, grace = lease_periods()
    if info.get("token") != token:
        raise LeaseLost(
            f"{remote.uri}: this command no longer holds the run's lease (now {_words(info) if info else 'nobody'}); "
            "it stopped writing there"
        )
    age = time.time() - float(info.get("beat", 0.0))
    if age >= expiry - grace:
        raise LeaseLost(
            f"{remote.uri}: the run's lease was not renewed for {age:.0f} s (another command may take it over "
            f"after {expiry:.0f} s); this command stopped writing there"
        )


def _read_lease(fs, key: str) -> dict | None:
    try:
        with fs.open_input_stream(key) as f:
            info = json.loads(f.read() or b"{}")
    except (FileNotFoundError, ValueError):
        return None
    except OSError as e:
        if "NoSuchKey" in str(e) or "not found" in str(e).lower() or "404" in str(e):
            return None
        raise
    return info if isinstance(info, dict) else None


def _write_lease(fs, key: str, info: dict) -> None:
    with fs.open_output_stream(key) as f:
        f.write((json.dumps(info) + "\n").encode())


def _words(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')})"


@contextmanager
def _hold_remote(mirror: RunDir, command: str | None) -> Iterator[str]:
    remote = mirror.remote
    fs, key = remote.filesystem(), remote.key(LOCK_NAME)
    parts = remote.path.split("/")
    for i in range(len(parts) - 1, 0, -1):  # a prefix around this one, held by a live process
        outer = _read_lease(fs, "/".join(parts[:i] + [LOCK_NAME]))
        if _lease_live(outer):
            around = f"{remote.scheme}://{'/'.join(parts[:i])}"
            raise RunDirInUse(f"{remote.uri}: inside {around}, which is in use by {_words(outer)}")
    held = _read_lease(fs, key)
    if _lease_live(held):
        raise RunDirInUse(f"{remote.uri}: in use by {_words(held)}; wait for it to end or use another directory")
    info = _info(command) | {"token": secrets.token_hex(8), "beat": time.time()}
    _write_lease(fs, key, info)
    time.sleep(SETTLE_S)
    now = _read_lease(fs, key)
    if not now or now.get("token") != info["token"]:
        raise RunDirInUse(f"{remote.uri}: in use by {_words(now or {})}; wait for it to end or use another directory")
    stop = threading.Event()
    every = lease_periods()[1]

    def beat() -> None:
        while not stop.wait(every):
            try:
                if (_read_lease(fs, key) or {}).get("token") == info["token"]:
                    _write_lease(fs, key, info | {"beat": time.time()})
            except OSError:
                pass  # a missed beat: a publish refuses once the lease is LEASE - GRACE old

    t = threading.Thread(target=beat, name="allatt-lease", daemon=True)
    t.start()
    claim = None
    try:
        claim = claim_driver(mirror.root)  # other processes' sweeps leave the mirror alone while this one lives
        mirror.reset()  # the local mirror is this holder's alone from here on
        mirror.lease = HELD[remote.uri] = (key, info["token"])  # every publish of the run checks it (fencing)
        yield key
    finally:
        mirror.lease = None
        HELD.pop(remote.uri, None)
        if claim is not None:
            release_driver(mirror.root, claim)
        stop.set()
        t.join(timeout=5)
        try:
            if (_read_lease(fs, key) or {}).get("token") == info["token"]:
                fs.delete_file(key)
        except OSError:
            pass


@contextmanager
def hold(run_dir: str | Path | RunDir, command: str | None = None) -> Iterator[Path | str]:
    """Hold `run_dir`'s lock for the block (the folder is created if needed; a folder this call
    created and that is still empty at the end is removed again, so refused input leaves nothing).
    A `RunDir` in object storage is locked by a lease in the bucket (above).

    Raises `RunDirInUse` (one line, exit 2) when a live process holds it, or holds a folder around it."""
    if not isinstance(run_dir, (str, os.PathLike)):  # a RunDir (rundir.py, which imports this module)
        if run_dir.is_remote:
            with _hold_remote(run_dir, command) as key:
                yield key
            return
        run_dir = run_dir.root
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    _check_ancestors(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    fd = _acquire(lock, run_dir)
    try:
        info = _info(command)
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
