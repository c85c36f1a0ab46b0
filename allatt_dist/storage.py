"""The pieces RunDir (rundir.py) syncs a run directory in object storage with: where each process's local
mirror folder lives (and the sweep of dead processes' folders), which files are synced and in which
order (the files that mark a folder complete go last), and copying one file up or down, or deleting it.
Only rundir.py uses this module.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from allatt_dist.atomic import writing
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


def _mirror_base() -> Path:
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
    processes ended by a crash of the driver): each names its pid, and only dead ones are removed."""
    for p in base.iterdir():
        m = _OWNED.match(p.name)
        if m and p.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def mirror_root(tag: str = "run") -> Path:
    """A new local folder for a mirror: under ALLATT_MIRROR_DIR, else the system's temp folder (the
    leftovers of dead processes there are removed first)."""
    base = _mirror_base()
    _sweep(base)
    return Path(tempfile.mkdtemp(prefix=f"allatt-{tag}-{os.getpid()}-", dir=base))


def driver_root(remote: Remote) -> Path:
    """The driver's mirror of `remote`: one name per URI (not created here), so that what Tune pickles with a
    search (its callbacks name paths in it) still holds when the search is resumed, on this machine or another.
    Only the lock's holder uses it, and it empties it first (runlock.hold)."""
    return _mirror_base() / f"allatt-driver-{hashlib.sha256(remote.uri.encode()).hexdigest()[:16]}"


def under(rel: str, folder: str) -> bool:
    return not folder or rel == folder or rel.startswith(folder + "/")


def stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def copy_up(fs, local: Path, key: str) -> None:
    with open(local, "rb") as src, fs.open_output_stream(key) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def copy_down(fs, key: str, local: Path) -> None:
    """Download to a temporary sibling and rename: a reader here sees the old file or the new one."""
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(key) as src, writing(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def delete_file(fs, key: str) -> None:
    try:
        fs.delete_file(key)
    except FileNotFoundError:
        pass
