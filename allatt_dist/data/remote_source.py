"""A corpus in object storage: `data.path` an `s3://` (or `gs://`) prefix, read through the pyarrow
filesystems the run directories use (remote.py: endpoint and credentials the standard way).

The prefix is a folder: the corpus files under it (the names and kinds of sources.py, e.g.
`train.parquet`, `valid.jsonl.gz`, or a `datasets` save_to_disk folder) are downloaded into the token
cache's folder, `<cache>/remote/<sha256 of the URI>/`, each under a temporary name and renamed into place;
a file is downloaded again only when its size or modification time in the bucket changed. The local copy
is then read like a local folder, and the token ids are cached by the files' content as for any corpus.
Processes of one node starting at once download once (a lock); each node downloads its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from allatt_dist import remote as remote_mod
from allatt_dist import storage
from allatt_dist.atomic import write_json
from allatt_dist.data import sources
from allatt_dist.data.cache import cache_root
from allatt_dist.errors import DataError, UserError

STAMPS = ".stamps.json"


def is_remote(path: str | None) -> bool:
    return bool(path) and remote_mod.is_uri(path)


def local_copy(uri: str, cache_dir: str | None) -> Path:
    """The local folder mirroring the corpus files under `uri`, brought up to date."""
    try:
        rem = remote_mod.parse_remote(uri, "data.path")
    except UserError as e:
        raise DataError(str(e)) from None
    if sources.is_glob(rem.path):
        raise DataError(f"data.path {uri}: globs are for local files; give the prefix holding the split files")
    root, _ = cache_root(cache_dir)
    dest = root / "remote" / hashlib.sha256(rem.uri.encode()).hexdigest()[:24]
    files = _listing(rem, uri)
    with _locked(dest):
        stamps = _read_stamps(dest)
        for rel, (size, mtime) in files.items():
            if stamps.get(rel) != [size, mtime] or not (dest / rel).is_file():
                storage.copy_down(rem.filesystem(), rem.key(rel), dest / rel, f"{rem.uri}/{rel}")
                stamps[rel] = [size, mtime]
                write_json(dest / STAMPS, stamps)
    return dest


def _listing(rem: remote_mod.Remote, uri: str) -> dict[str, tuple[int, int]]:
    """{path under the prefix: (size, mtime ns)} of its corpus files (and `datasets` JSON files)."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(rem.key(), recursive=True, allow_not_found=True)
    try:
        infos = storage.retrying("listing", uri, lambda: rem.filesystem().get_file_info(sel))
    except OSError as e:
        raise DataError(f"data.path {uri}: cannot list it ({(str(e).splitlines() or ['?'])[0][:200]})") from None
    out = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(rem.key()) :].lstrip("/")
        if rel.endswith(".json") or _is_corpus_file(rel):
            out[rel] = (int(info.size or 0), int(info.mtime_ns or 0))
    if not any(_is_corpus_file(rel) for rel in out):
        raise DataError(
            f"data.path {uri}: no corpus file under it (.txt, .jsonl, .parquet, .arrow; .gz, .zst for text)"
        )
    return out


def _is_corpus_file(rel: str) -> bool:
    try:
        sources.kind_of(Path(rel))
    except DataError:
        return False
    return True


def _read_stamps(dest: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((dest / STAMPS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks here: downloads race, each file still renamed into place whole
        yield
