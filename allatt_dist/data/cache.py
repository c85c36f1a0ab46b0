"""Tokenise once: the token ids of a local corpus, cached on disk as memory-mapped uint32 arrays.

Layout, under the cache folder (`data.cache_dir`, else $ALLATT_CACHE_DIR, else ~/.cache/allatt-dist):

    <rules>-<train file digest>/vocab.txt              the vocabulary (train split), one token a line
    <rules>-<train file digest>/<split>-<digest>.npy   that split's ids, uint32, loaded with mmap_mode="r"

A digest is the sha256 of a file's bytes and its size, and `<rules>` names the vocabulary rules
(`RULES`), so a cache built from other files, or by other rules, has another name and is never read:
changing a corpus file makes the next load build anew. Every file is written under a temporary name and
renamed into place, so a reader sees a whole file or none; builders on one node (Ray workers, trials,
`rank`) take an advisory lock, so one builds and the others wait and then read what it wrote. Where locks
do not work (some network filesystems) two builders both build and the last rename wins, with equal bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from allatt_dist.atomic import writing
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

ENV_VAR = "ALLATT_CACHE_DIR"
RULES = "words1"  # whitespace tokens + <eos> per line, frequency order, ties by first appearance; uint32 ids
DTYPE = np.uint32


def cache_root(configured: str | None) -> tuple[Path | None, bool]:
    """(folder, chosen by the user): `data.cache_dir`, else $ALLATT_CACHE_DIR, else ~/.cache/allatt-dist."""
    if configured:
        return Path(configured).expanduser(), True
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), True
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "allatt-dist", False


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, with its size: what names the cache entries built from it."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256")
    return f"{h.hexdigest()[:32]}-{path.stat().st_size}"


def files_digest(files: Path | tuple[Path, ...], salt: str = "") -> str:
    """One file without salt: its `file_digest` (the names of existing entries); several files, or how
    their text is read (`salt`, e.g. a JSONL text field): a digest of their digests and the salt."""
    files = (files,) if isinstance(files, Path) else tuple(files)
    if len(files) == 1 and not salt:
        return file_digest(files[0])
    parts = [file_digest(f) for f in files] + [salt]
    return f"{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:32]}-{len(files)}"


class TokenCache:
    """The cache entry of one train source (its vocabulary) and the splits encoded with it; a source is a
    file or several files, with `salt` naming how their text is read (sources.py)."""

    def __init__(self, root: Path, train_file: Path | tuple[Path, ...], salt: str = "") -> None:
        self.dir = root / f"{RULES}-{files_digest(train_file, salt)}"
        self.salt = salt

    def vocab(self, build: Callable[[], Vocab]) -> Vocab:
        path = self.dir / "vocab.txt"
        if not path.is_file():
            with self._lock():
                if not path.is_file():
                    build().save(path)  # atomic: temp name + rename
                    path.chmod(0o644)  # readable by every user of a shared cache folder
        return Vocab.load(path)

    def ids(self, split: str, split_file: Path | tuple[Path, ...], encode: Callable[[], np.ndarray]) -> np.ndarray:
        """The split's ids, memory-mapped read-only; `encode` (uint32 ids) runs only when they are missing."""
        path = self.dir / f"{split}-{files_digest(split_file, self.salt)}.npy"
        loaded = _load(path)
        if loaded is not None:
            return loaded
        with self._lock():
            loaded = _load(path)  # another builder may have written it while we waited
            if loaded is None:
                _save_atomic(path, encode())
                loaded = _load(path)
        if loaded is None:
            raise DataError(f"{path}: token cache written but unreadable; delete {self.dir} and run again")
        return loaded

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:
                pass  # no locks here: builders race, the renames keep every file whole
            yield


def _load(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None  # damaged (not whole): built anew
    return ids if ids.dtype == DTYPE and ids.ndim == 1 else None


def _save_atomic(path: Path, ids: np.ndarray) -> None:
    with writing(path, "wb", perms=0o644) as f:  # the cache is meant to be shared
        np.save(f, np.ascontiguousarray(ids, dtype=DTYPE), allow_pickle=False)
