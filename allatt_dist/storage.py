"""Run directories in object storage (`--out s3://bucket/prefix`, `gs://...`): a local mirror per process.

    --out s3://bucket/exp   ->  Remote (scheme, bucket/prefix, filesystem options)  ->  Mirror per process
                                                                                        (a local temp folder)

Every process that takes part in a run (the driver, each Tune trial, each Ray Train worker, each scoring
task) works on its own local folder standing for the run directory, and syncs it with the bucket at the
points where the local code publishes something: it *pushes* what it wrote (changed files uploaded,
files it deleted deleted; within a folder `MANIFEST.json`, `config.json` and `result.json` go last, so
a reader that sees them sees the rest), and *pulls* what another process wrote before reading it. No
two processes write the same file, so no node needs to see another's disk: a run needs only the
bucket. A local `--out` is its own mirror, and push/pull do nothing.

Why not a FUSE mount or Ray Train's storage for everything: the code reads and writes run directories
with plain paths (safetensors, DeepSpeed, TensorBoard's writers), and Ray Train's storage could neither
skip nor delete a damaged checkpoint (docs/architecture.md); pyarrow's filesystems, which Ray Train uses
itself, move the files (the URI, its filesystem and the up-front checks: remote.py).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from allatt_dist.remote import Remote, check_readable, check_writable, is_uri, parse_remote

LAST = ("MANIFEST.json", "config.json", "result.json")  # published after the rest of their folder
WEIGHTS = (".safetensors", ".pt")  # what a pull may leave for later (large)


def _skipped(rel: str) -> bool:
    """Temporary names (atomic.py's siblings, staging/trash folders, locks) are never synced."""
    return any(part.startswith(".") for part in rel.split("/"))


def _ordered(rels: Iterable[str]) -> list[list[str]]:
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
    import hashlib

    return _mirror_base() / f"allatt-driver-{hashlib.sha256(remote.uri.encode()).hexdigest()[:16]}"


class Mirror:
    """A run directory as one process sees it: `root` (local), kept in step with `remote` when there is one."""

    def __init__(self, root: str | Path, remote: Remote | None = None):
        self.root = Path(root).resolve()
        self.remote = remote
        self._synced: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of the local file when last synced
        self._fetched: dict[str, tuple[int, int | None]] = {}  # rel -> the remote (size, mtime) it was pulled at

    def __getstate__(self) -> dict:  # another process starts with nothing synced
        return {"root": self.root, "remote": self.remote, "_synced": {}, "_fetched": {}}

    def __repr__(self) -> str:
        return f"Mirror({self.root}{', ' + self.remote.uri if self.remote else ''})"

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    @property
    def where(self) -> str:
        """The run directory as the user named it (the URI, or the local path)."""
        return self.remote.uri if self.remote else str(self.root)

    def here(self, tag: str = "run") -> Mirror:
        """This run directory for the calling process: a fresh local mirror when remote, else itself."""
        return Mirror(mirror_root(tag), self.remote) if self.remote else self

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        return "" if p == self.root else p.relative_to(self.root).as_posix()

    def moved(self, path: str | Path, into: Mirror) -> Path:
        """`path` under this mirror's root, at the same place under `into`'s root."""
        rel = self.rel(path)
        return into.root / rel if rel else into.root

    def uri(self, path: str | Path | None = None) -> str:
        """Where `path` (under root) lives for good: a URI when remote, else the path."""
        rel = self.rel(path) if path is not None else ""
        if self.remote is None:
            return str(self.root / rel) if rel else str(self.root)
        return self.remote.child(rel).uri if rel else self.remote.uri

    # ----- listing -------------------------------------------------------------------------------------

    def _remote_info(self, rel: str) -> dict[str, tuple[int, int | None]]:
        """rel -> (size, mtime_ns) of every remote file at/under `rel` (a file or a folder)."""
        import pyarrow.fs as pafs

        fs, key = self.remote.filesystem(), self.remote.key(rel)
        info = fs.get_file_info(key)
        if info.type == pafs.FileType.File:
            return {rel: (info.size, info.mtime_ns)}
        if info.type == pafs.FileType.NotFound:
            return {}
        base = self.remote.key()
        out = {}
        for i in fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True)):
            if i.type == pafs.FileType.File:
                out[i.path[len(base) + 1 :]] = (i.size, i.mtime_ns)
        return out

    def _remote_files(self, rel: str) -> dict[str, int]:
        """rel -> size of every remote file at/under `rel`."""
        return {r: size for r, (size, _) in self._remote_info(rel).items()}

    def list_remote(self, path: str | Path) -> dict[str, int]:
        """Remote files under `path` (relative to `path`) -> size; the local folder's files when local."""
        rel = self.rel(path)
        if self.remote is None:
            p = Path(path)
            return {f.relative_to(p).as_posix(): f.stat().st_size for f in p.rglob("*") if f.is_file()}
        cut = len(rel) + 1 if rel else 0
        return {k[cut:]: v for k, v in self._remote_files(rel).items()}

    # ----- sync ----------------------------------------------------------------------------------------

    def pull(self, path: str | Path | None = None, *, weights: bool = True, skip_dirs: tuple[str, ...] = ()) -> None:
        """Bring the remote files at/under `path` (default: all) here; local files the remote no longer has
        (and that were synced before) are removed. `weights=False` leaves *.safetensors/*.pt for later;
        folders named in `skip_dirs` (e.g. checkpoints) are left out."""
        if self.remote is None:
            return
        rel = self.rel(path) if path is not None else ""
        remote = self._remote_info(rel)
        todo = []
        for r, state in remote.items():
            parts = r.split("/")
            if _skipped(r) or any(p in skip_dirs for p in parts[:-1]) or (not weights and r.endswith(WEIGHTS)):
                continue
            local = self.root / r
            seen = self._synced.get(r)
            if local.is_file() and seen is not None and _stat(local) == seen and self._unchanged(r, state):
                continue  # unchanged on both sides since the last sync
            todo.append(r)
        self._transfer(todo, upload=False, remote=remote)
        for r in [r for r in self._synced if _under(r, rel) and r not in remote]:
            (self.root / r).unlink(missing_ok=True)
            self._drop(r)

    def push(self, path: str | Path | None = None, *, delete: bool = True) -> None:
        """Publish what this process wrote at/under `path` (default: all): new and changed files uploaded
        (the marker files last), then (unless `delete=False`) files it synced before and has since deleted
        deleted remotely."""
        if self.remote is None:
            return
        base = Path(path) if path is not None else self.root
        rel = self.rel(base)
        if base.is_file():
            local = {rel: base}
        else:
            local = {self.rel(f): f for f in base.rglob("*") if f.is_file()} if base.is_dir() else {}
        changed = [r for r, f in local.items() if not _skipped(r) and self._synced.get(r) != _stat(f)]
        for wave in _ordered(changed):
            self._transfer(wave, upload=True)
        gone = [r for r in self._synced if _under(r, rel) and r not in local] if delete else []
        if gone:
            fs = self.remote.filesystem()
            for r in gone:
                _delete_file(fs, self.remote.key(r))
                self._drop(r)

    def delete(self, path: str | Path) -> None:
        """Remove `path` (file or folder) remotely and here; a folder's marker files go first, so no reader
        sees it complete while it is half deleted."""
        rel = self.rel(path)
        local = self.root / rel
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        if self.remote is None:
            return
        files = self._remote_files(rel)
        fs = self.remote.filesystem()
        for wave in reversed(_ordered(files)):
            for r in wave:
                _delete_file(fs, self.remote.key(r))
        for r in [r for r in self._synced if _under(r, rel)]:
            self._drop(r)

    def _drop(self, rel: str) -> None:
        del self._synced[rel]
        self._fetched.pop(rel, None)

    def _unchanged(self, rel: str, state: tuple[int, int | None]) -> bool:
        """Whether the remote file is the one this process last pulled, or uploaded itself (no one else
        writes a file this process writes)."""
        if rel in self._fetched:
            return self._fetched[rel] == state
        return self._synced[rel][0] == state[0]

    def _transfer(self, rels: list[str], upload: bool, remote: dict | None = None) -> None:
        if not rels:
            return
        fs = self.remote.filesystem()

        def one(r: str) -> tuple[str, tuple[int, int]]:
            local = self.root / r
            if upload:
                _copy_up(fs, local, self.remote.key(r))
            else:
                _copy_down(fs, self.remote.key(r), local)
            return r, _stat(local)

        with ThreadPoolExecutor(max_workers=min(8, len(rels))) as pool:
            for r, st in pool.map(one, rels):
                self._synced[r] = st
                if upload:
                    self._fetched.pop(r, None)
                else:
                    self._fetched[r] = remote[r]

    def forget(self, path: str | Path) -> None:
        """This process removed its local copy of `path` on purpose (the bucket keeps it): a later push of
        a folder around it must not delete it remotely."""
        rel = self.rel(path)
        for r in [r for r in self._synced if _under(r, rel)]:
            self._drop(r)

    def reset(self) -> None:
        """Empty the local mirror (its holder, before pulling: nothing stale from an earlier process stays)."""
        if self.remote is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            self._synced.clear()
            self._fetched.clear()

    def discard(self) -> None:
        """Remove the local mirror (remote runs only: a local run directory is the run itself)."""
        if self.remote is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _under(rel: str, folder: str) -> bool:
    return not folder or rel == folder or rel.startswith(folder + "/")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _copy_up(fs, local: Path, key: str) -> None:
    with open(local, "rb") as src, fs.open_output_stream(key) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def _copy_down(fs, key: str, local: Path) -> None:
    """Download to a temporary sibling and rename: a reader here sees the old file or the new one."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{secrets.token_hex(4)}")
    try:
        with fs.open_input_stream(key) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _delete_file(fs, key: str) -> None:
    try:
        fs.delete_file(key)
    except FileNotFoundError:
        pass


def resolve_out(text: str, flag: str = "--out") -> Mirror:
    """`--out` as given: a local path (its own mirror) or a URI (checked writable; mirrored in `driver_root`)."""
    if not is_uri(text):
        return Mirror(Path(text).resolve())
    remote = parse_remote(text, flag)
    check_writable(remote, flag)
    return Mirror(driver_root(remote), remote)


def fetch_model_dir(text: str, flag: str) -> tuple[Path, Mirror | None]:
    """A model directory to read, local or in storage (downloaded to a temp folder: discard it after)."""
    if not is_uri(text):
        return Path(text), None
    remote = parse_remote(text, flag)
    check_readable(remote, "model directory", flag)
    m = Mirror(mirror_root("model"), remote)
    m.pull()
    return m.root, m
