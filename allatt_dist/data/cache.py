"""Tokenise once: the token ids of a local corpus, cached on disk as memory-mapped uint32 arrays.

Layout, under the cache folder (`data.cache_dir`, else $ALLATT_CACHE_DIR, else ~/.cache/allatt-dist):

    <rules>-<train file digest>/vocab.txt              the vocabulary (train split), one token a line
    <rules>-<train file digest>/<split>-<digest>.npy   that split's ids, uint32, loaded with mmap_mode="r"
    <rules>-<train file digest>/MANIFEST.json          {file name: digest} of the two kinds above, as written

A digest is the sha256 of a file's bytes and its size, and `<rules>` names the vocabulary rules
(`RULES`), so a cache built from other files, or by other rules, has another name and is never read:
changing a corpus file makes the next load build anew. Every file is written under a temporary name and
renamed into place, so a reader sees a whole file or none (ids are written streamed, shard by shard:
build.py); builders on one node (Ray workers, trials,
`rank`) take an advisory lock, so one builds and the others wait and then read what it wrote. Where locks
do not work (some network filesystems) two builders both build and the last rename wins, with equal bytes.

Damage after the write (flipped bytes, a truncated or edited file) is found on load: every entry is read
back against the digest its builder recorded in MANIFEST.json; an entry that differs (or that no digest
covers: a cache from before the manifest) is rebuilt, with one warning line naming it. The check reads the
whole file once per process and load (sha256: 2.5 ms for WikiText-2 mini's cache, 0.55-0.69 s for
WikiText-103's 412 MB of train ids on the 2-core CI VM; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from allatt_dist.atomic import writing
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

ENV_VAR = "ALLATT_CACHE_DIR"
RULES = "words1"  # whitespace tokens + <eos> per line, frequency order, ties by first appearance; uint32 ids
DTYPE = np.uint32
MANIFEST = "MANIFEST.json"


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
        if not self._intact(path):
            with self._lock():
                if not self._intact(path):
                    self._warn_if_damaged(path)
                    build().save(path)  # atomic: temp name + rename
                    path.chmod(0o644)  # readable by every user of a shared cache folder
                    self._record(path)
        return Vocab.load(path)

    def ids(self, split: str, split_file: Path | tuple[Path, ...], encode: Callable[[IO[bytes]], None]) -> np.ndarray:
        """The split's ids, memory-mapped read-only; `encode` (writes a uint32 .npy to the file it is given,
        streamed: build.py) runs only when they are missing or damaged, and the file is published whole."""
        path = self.dir / f"{split}-{files_digest(split_file, self.salt)}.npy"
        loaded = _load(path) if self._intact(path) else None
        if loaded is not None:
            return loaded
        with self._lock():
            loaded = _load(path) if self._intact(path) else None  # another builder may have written it meanwhile
            if loaded is None:
                self._warn_if_damaged(path)
                with writing(path, "wb", perms=0o644) as f:  # the cache is meant to be shared
                    encode(f)
                self._record(path)
                loaded = _load(path)
        if loaded is None:
            raise DataError(f"{path}: token cache written but unreadable; delete {self.dir} and run again")
        return loaded

    def _manifest(self) -> dict[str, str]:
        try:
            data = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _intact(self, path: Path) -> bool:
        """Whether `path` exists and holds the bytes its builder recorded (sha256 of the whole file)."""
        if not path.is_file():
            return False
        recorded = self._manifest().get(path.name)
        try:
            return recorded is not None and recorded == file_digest(path)
        except OSError:
            return False

    def _record(self, path: Path) -> None:
        """Add `path`'s digest to the manifest (under the lock: builders update it one at a time)."""
        with writing(self.dir / MANIFEST, perms=0o644) as f:
            json.dump(self._manifest() | {path.name: file_digest(path)}, f, indent=2)

    def _warn_if_damaged(self, path: Path) -> None:
        if path.is_file():
            why = "damaged (differs from" if path.name in self._manifest() else "not verifiable (no checksum in"
            print(
                f"allatt-dist: warning: token cache {path}: {why} {self.dir / MANIFEST}); rebuilding it",
                file=sys.stderr,
                flush=True,
            )

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
