"""Replacing files and folders so that a reader, at any instant, sees the old one or the new one.

A file is written under a temporary name in its own folder and renamed over the old one. A folder
is built under a temporary name beside its destination and then exchanged with the old one in one
step (Linux `renameat2(RENAME_EXCHANGE)`, on the local file systems that support it); where that is
not available (macOS, NFS) the old folder is renamed aside and the new one renamed in, so the name
is missing for the instant between the two renames, never half-written. Deleted folders are renamed
away first, so that none is ever seen half-deleted under its name.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not here
        return False
    raise OSError(err, os.strerror(err), str(b))


def temp_sibling(path: Path, tag: str = "new") -> Path:
    """A name beside `path`, hidden and unique: where its replacement is built."""
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def replace_dir(new: Path, dest: Path) -> None:
    """Put the folder `new` at `dest` (same file system), replacing a folder there in one step."""
    if not dest.exists() and not dest.is_symlink():
        os.rename(new, dest)
        return
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
        return
    old = temp_sibling(dest, "old")
    os.rename(dest, old)
    os.rename(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def discard_dir(path: Path) -> None:
    """Delete a folder without it ever being seen half-deleted under its name."""
    if not path.exists():
        return
    gone = temp_sibling(path, "trash")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


@contextmanager
def writing(path: Path, mode: str = "w", *, fsync: bool = False, perms: int | None = None, **open_kw) -> Iterator[IO]:
    """A file object whose content replaces the file at `path` in one step when the block ends without an
    error (written under a hidden temporary name beside it, removed on error). `fsync`: on disk before the
    rename; `perms`: the file's mode bits."""
    tmp = temp_sibling(path, "tmp")
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if perms is not None:
            os.chmod(tmp, perms)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Replace the file at `path` with `text` in one step."""
    with writing(path) as f:
        f.write(text)


def write_json(path: Path, data: dict) -> None:
    """Replace the file at `path` with `data` as JSON (indented, one trailing newline) in one step."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def remove_leftovers(folder: Path) -> None:
    """Temporary siblings left by a process killed while replacing something in `folder`."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and any(f".{tag}-" in p.name for tag in ("new", "old", "trash", "tmp")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
