"""The pieces RunDir (rundir.py) syncs a run directory in object storage with: where each process's local
mirror folder lives (and the sweep of dead processes' folders), which files are synced and in which
order (the files that mark a folder complete go last), and copying one file up or down, or deleting it.
Only rundir.py uses this module.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from allatt_dist.atomic import writing
from allatt_dist.errors import EnvironmentFailure
from allatt_dist.remote import Remote

LAST = ("MANIFEST.json", "config.json", "result.json")  # published after the rest of their folder
WEIGHTS = (".safetensors", ".pt")  # what a pull may leave for later (large)


def skipped(rel: str) -> bool:
    """Temporary names (atomic.py's siblings, staging/trash folders, locks) are never synced."""
    return any(part.startswith(".") for part in rel.split("/"))


def ordered(rels: Iterable[str]) -> list[list[str]]:
    """Files to upload in two waves: everything else, then the files that mark their folder complete."""
    rels = sorted(rels)
    return [[r for r in rels if r.rsplit("/", 1)[-1] not in LAST], [r for r in rels if r.rsplit("/", 1)[-1] in LAST]]


def mirror_base() -> Path:
    base = Path(os.environ.get("ALLATT_MIRROR_DIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return base


_OWNED = re.compile(r"^allatt-[a-z]+-(\d+)-")  # allatt-<tag>-<pid>-<random>: a process's own mirror


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(base: Path) -> None:
    """Remove the mirrors of processes that died without removing theirs (a worker killed, a node's
    processes ended by a crash of the driver): each names its pid, and only dead ones are removed. A driver's
    mirror (one name per URI, no pid) is removed when no live process holds its claim (`claim_driver`: every
    command holding a run directory claims it) and it has not changed for DRIVER_GRACE_S (a mirror opened by
    code that holds no lock, in this process, is left alone while in use)."""
    for p in base.iterdir():
        m = _OWNED.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(_DRIVER) and p.is_dir() and _idle(p):
            fd = try_claim(_claim_file(p))
            if fd is not None:  # nobody holds it: its driver is gone
                shutil.rmtree(p, ignore_errors=True)
                _release(_claim_file(p), fd)


_DRIVER = "allatt-driver-"
DRIVER_GRACE_S = 300.0


def _idle(p: Path) -> bool:
    try:
        return time.time() - p.stat().st_mtime > DRIVER_GRACE_S
    except OSError:
        return False


def _claim_file(root: Path) -> Path:
    return root.with_name(root.name + ".claim")


def try_claim(path: Path) -> int | None:
    """flock `path` (created when absent) without waiting: the fd, or None while another process holds it.
    Retries when the file was replaced between open and flock (its holder removed it on release), so two
    takers never both win. Also the run directory's lock (runlock.py)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    try:
        path.unlink()  # before the unlock: a taker that opened this inode sees it replaced and retries
    except FileNotFoundError:
        pass
    os.close(fd)


def claim_driver(root: Path, wait_s: float = 2.0) -> int | None:
    """Mark the driver's mirror `root` as in use by this process for as long as the returned fd is open
    (a flock on the sibling ROOT.claim, released by the kernel however the process ends): the sweep of other
    processes leaves it alone, and removes it once this process is gone. Waits `wait_s` for a sweep in
    progress; None when another live process here still claims it (a holder whose lease this process has
    taken over: frozen, it is fenced off the bucket; its claim keeps the folder from the sweep meanwhile)."""
    deadline = time.monotonic() + wait_s
    while (fd := try_claim(_claim_file(root))) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return fd


def release_driver(root: Path, fd: int) -> None:
    """End the claim of `claim_driver` (after the mirror was removed)."""
    _release(_claim_file(root), fd)


def mirror_root(tag: str = "run") -> Path:
    """A new local folder for a mirror: under ALLATT_MIRROR_DIR, else the system's temp folder (the
    leftovers of dead processes there are removed first)."""
    base = mirror_base()
    _sweep(base)
    return Path(tempfile.mkdtemp(prefix=f"allatt-{tag}-{os.getpid()}-", dir=base))


def driver_root(remote: Remote) -> Path:
    """The driver's mirror of `remote`: one name per URI (not created here), so that what Tune pickles with a
    search (its callbacks name paths in it) still holds when the search is resumed, on this machine or another.
    Only the lock's holder uses it, and it empties it first (runlock.hold)."""
    return mirror_base() / f"{_DRIVER}{hashlib.sha256(remote.uri.encode()).hexdigest()[:16]}"


# What a storage call may fail with for a moment (the server restarting, a network blip, throttling): retried.
_TRANSIENT = re.compile(
    r"connection refused|connection reset|could not connect|couldn't connect|connection was closed|"
    r"broken pipe|timed out|timeout|network_connection|curl error|curlcode|http response code: 5\d\d|\b50[0234]\b|"
    r"internalerror|serviceunavailable|slowdown|throttl|too many requests|\b429\b|requesttimeout",
    re.IGNORECASE,
)


def retry_deadline() -> float:
    """How long a storage call is retried through transient failures: ALLATT_STORAGE_RETRY_S, default 120 s."""
    try:
        return max(0.0, float(os.environ.get("ALLATT_STORAGE_RETRY_S") or 120.0))
    except ValueError:
        return 120.0


def retrying(what: str, uri: str, call):
    """`call()`, retried with exponential backoff (0.2 s doubling to 5 s) while it fails transiently
    (connection refused/reset, timeouts, 5xx, throttling), for at most `retry_deadline()` seconds; then one line
    (`EnvironmentFailure`, exit status 1) naming `uri` and what failed. Other errors pass through at once."""
    deadline, pause = time.monotonic() + retry_deadline(), 0.2
    while True:
        try:
            return call()
        except OSError as e:
            if not _TRANSIENT.search(str(e)):
                raise
            if time.monotonic() + pause > deadline:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise EnvironmentFailure(
                    f"{uri}: {what} failed for {retry_deadline():.0f} s (ALLATT_STORAGE_RETRY_S): {why}"
                ) from None
        time.sleep(pause)
        pause = min(pause * 2, 5.0)


def under(rel: str, folder: str) -> bool:
    return not folder or rel == folder or rel.startswith(folder + "/")


def stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def copy_up(fs, local: Path, key: str, uri: str) -> None:
    """Upload `local` to `key` (`uri`: the same, as the user names it), retried whole through outages."""

    def once() -> None:
        with open(local, "rb") as src, fs.open_output_stream(key) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    retrying("upload", uri, once)


def copy_down(fs, key: str, local: Path, uri: str) -> None:
    """Download to a temporary sibling and rename: a reader here sees the old file or the new one."""
    local.parent.mkdir(parents=True, exist_ok=True)

    def once() -> None:
        with fs.open_input_stream(key) as src, writing(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    retrying("download", uri, once)


def delete_file(fs, key: str, uri: str = "") -> None:
    def once() -> None:
        try:
            fs.delete_file(key)
        except FileNotFoundError:
            pass

    retrying("delete", uri or key, once)
