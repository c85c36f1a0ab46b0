"""The run directory: one object for a run's (or an experiment's, or a model's) folder, local or in a bucket.

    --out runs/x           ->  open_out  ->  RunDir(root=/abs/runs/x)                  (its own mirror)
    --out s3://bucket/exp  ->  open_out  ->  RunDir(root=<local mirror>, remote=Remote)  (remote.py: parsed once)

Every process that takes part in a run (the driver, each Tune trial, each Ray Train worker, each scoring
task) works on a local folder standing for the run directory (`here`: a fresh mirror per process when the
directory is in a bucket) and says, where its code publishes something, what it publishes; RunDir syncs it
with the bucket then: it *pushes* what the process wrote (changed files uploaded, files it deleted
deleted; within a folder `MANIFEST.json`, `config.json` and `result.json` go last, so a reader that sees
them sees the rest), and *pulls* what another process wrote before it is read. No two processes write the
same file, so no node needs to see another's disk. A local directory is its own mirror: nothing moves.

Why not a FUSE mount or Ray Train's storage for everything: the code reads and writes run directories
with plain paths (safetensors, DeepSpeed, TensorBoard's writers), and Ray Train's storage could neither
skip nor delete a damaged checkpoint (docs/architecture.md); pyarrow's filesystems, which Ray Train uses
itself, move the files (storage.py; the URI, its filesystem and the up-front checks: remote.py).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from allatt_dist import atomic, storage
from allatt_dist.errors import UserError
from allatt_dist.outputs import check_output_dir
from allatt_dist.remote import Remote, check_readable, check_writable, parse_location
from allatt_dist.runlock import check_lease, hold


class RunDir:
    """A run directory (or model directory) as one process sees it: `root`, a local folder, kept in step with
    `remote` when the directory lives in object storage. Code outside this module says what it publishes
    (`publish`, `write_text`, `write_json`) and what it is about to read (`fetch`, `fetch_records`); how that
    reaches the bucket (`push`, `pull`: changed files only, markers last) is decided here, and is nothing
    for a local directory. It also holds the directory's lock (`held`)."""

    def __init__(self, root: str | Path, remote: Remote | None = None):
        self.root = Path(root).resolve()
        self.remote = remote
        self._synced: dict[str, tuple[int, int]] = {}  # rel -> (size, mtime_ns) of the local file when last synced
        self._fetched: dict[str, tuple[int, int | None]] = {}  # rel -> the remote (size, mtime) it was pulled at
        self.lease: tuple[str, str] | None = None  # (key, token) of the run's lease: checked before each publish

    def __getstate__(self) -> dict:  # another process starts with nothing synced
        return {"root": self.root, "remote": self.remote, "_synced": {}, "_fetched": {}, "lease": self.lease}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"lease": None} | state)  # pickled before the lease travelled with it

    def __repr__(self) -> str:
        return f"RunDir({self.root}{', ' + self.remote.uri if self.remote else ''})"

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    @property
    def where(self) -> str:
        """The run directory as the user named it (the URI, or the local path)."""
        return self.remote.uri if self.remote else str(self.root)

    def here(self, tag: str = "run") -> RunDir:
        """This run directory for the calling process: a fresh local mirror when remote, else itself."""
        if not self.remote:
            return self
        mine = RunDir(storage.mirror_root(tag), self.remote)
        mine.lease = self.lease
        return mine

    def _fenced(self) -> None:
        """Before writing to the bucket: the run's lease is still ours (runlock.check_lease)."""
        if self.lease is not None:
            check_lease(self.remote, self.lease)

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        return "" if p == self.root else p.relative_to(self.root).as_posix()

    def moved(self, path: str | Path, into: RunDir) -> Path:
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
        where = self.remote.child(rel).uri if rel else self.remote.uri
        info = storage.retrying("listing", where, lambda: fs.get_file_info(key))
        if info.type == pafs.FileType.File:
            return {rel: (info.size, info.mtime_ns)}
        if info.type == pafs.FileType.NotFound:
            return {}
        base = self.remote.key()
        out = {}
        selector = pafs.FileSelector(key, recursive=True, allow_not_found=True)
        for i in storage.retrying("listing", where, lambda: fs.get_file_info(selector)):
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
            if (
                storage.skipped(r)
                or any(p in skip_dirs for p in parts[:-1])
                or (not weights and r.endswith(storage.WEIGHTS))
            ):
                continue
            local = self.root / r
            seen = self._synced.get(r)
            if local.is_file() and seen is not None and storage.stat(local) == seen and self._unchanged(r, state):
                continue  # unchanged on both sides since the last sync
            todo.append(r)
        self._transfer(todo, upload=False, remote=remote)
        for r in [r for r in self._synced if storage.under(r, rel) and r not in remote]:
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
        changed = [r for r, f in local.items() if not storage.skipped(r) and self._synced.get(r) != storage.stat(f)]
        gone = [r for r in self._synced if storage.under(r, rel) and r not in local] if delete else []
        if changed or gone:
            self._fenced()
        for wave in storage.ordered(changed):
            self._transfer(wave, upload=True)
        if gone:
            fs = self.remote.filesystem()
            for r in gone:
                storage.delete_file(fs, self.remote.key(r), self.remote.child(r).uri)
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
        if files:
            self._fenced()
        fs = self.remote.filesystem()
        for wave in reversed(storage.ordered(files)):
            for r in wave:
                storage.delete_file(fs, self.remote.key(r), self.remote.child(r).uri)
        for r in [r for r in self._synced if storage.under(r, rel)]:
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
                storage.copy_up(fs, local, self.remote.key(r), self.uri(local))
            else:
                storage.copy_down(fs, self.remote.key(r), local, self.uri(local))
            return r, storage.stat(local)

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
        for r in [r for r in self._synced if storage.under(r, rel)]:
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

    # ----- what the rest of the code calls --------------------------------------------------------------

    def publish(self, path: str | Path | None = None, *, keep_others: bool = False) -> None:
        """What this process wrote at/under `path` (default: everything) is final: it reaches the bucket.
        `keep_others=True`: files this process deleted there stay in the bucket for now."""
        self.push(path, delete=not keep_others)

    def fetch(self, path: str | Path | None = None, *, weights: bool = True) -> None:
        """Another process wrote `path` (a file or folder): bring it here before reading it. `weights=False`
        leaves *.safetensors/*.pt in the bucket."""
        self.pull(path, weights=weights)

    def fetch_records(self, path: str | Path | None = None) -> None:
        """The records under `path` (configs, results, statuses, TensorBoard runs): no weights, no checkpoints."""
        self.pull(path, weights=False, skip_dirs=("checkpoints",))

    def write_text(self, path: Path, text: str) -> None:
        """Replace the file at `path` (atomic.py) and publish it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
        self.push(path)

    def write_json(self, path: Path, data: dict) -> None:
        """Replace the JSON file at `path` (atomic.py) and publish it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, data)
        self.push(path)

    @contextmanager
    def held(self, command: str | None = None) -> Iterator[RunDir]:
        """The directory's lock for the block (runlock.py: flock, or a lease in the bucket); the local mirror
        of a bucket is removed when the block ends. An error from the block names the directory as the user
        gave it (`name_as_given`)."""
        with hold(self, command):
            try:
                yield self
            except BaseException as e:
                self.name_as_given(e)
                raise
            finally:
                self.discard()  # before the lock goes: the next holder's mirror may have the same name

    def name_as_given(self, e: BaseException) -> None:
        """Rewrite the message of `e` in place so that every path in a local copy of this bucket's directory
        (this process's mirror, or another process's under the same mirror folder) is named by its URI: the
        user typed `s3://...`, never a temporary folder. Nothing for a local directory."""
        if self.remote is None:
            return
        roots = {str(storage.mirror_base()), str(storage.mirror_base().resolve())}
        pattern = "|".join(re.escape(r) + r"/allatt-(?:driver-[0-9a-f]+|[a-z]+-\d+-[A-Za-z0-9_]+)" for r in roots)
        mirror = re.compile(f"{re.escape(str(self.root))}|{pattern}")

        def fix(text: object) -> object:
            return mirror.sub(self.remote.uri, text) if isinstance(text, str) else text

        if isinstance(e, OSError) and e.filename is not None:
            e.filename, e.filename2 = fix(e.filename), fix(e.filename2)
        elif isinstance(e, Exception):
            e.args = tuple(fix(a) for a in e.args)


# Searches started before RunDir existed hold pickled `storage.Mirror`s (Tune pickles the scheduler and the
# callbacks with the experiment): the same object's state, so they come back as RunDirs on resume.
storage.Mirror = RunDir


def open_out(text: str, flag: str = "--out") -> RunDir:
    """`--out` as given, parsed once: a local folder (checked: never clobbers a file) or a URI (checked
    writable now, before Ray or any worker starts; mirrored in the driver's one folder per URI)."""
    where = parse_location(text, flag)
    if isinstance(where, Path):
        check_output_dir(where)
        return RunDir(where.resolve())
    check_writable(where, flag)
    return RunDir(storage.driver_root(where), where)


def open_experiment(text: str, flag: str = "experiment") -> RunDir:
    """`rank EXPERIMENT`: a folder, or a URI that holds an experiment and takes writes."""
    where = parse_location(text, flag)
    if isinstance(where, Path):
        return RunDir(where.resolve())
    check_readable(where, "experiment", flag)
    check_writable(where, flag)
    return RunDir(storage.driver_root(where), where)


def open_model_out(text: str, force: bool, flag: str = "--out") -> RunDir:
    """`prune --out`: a new model directory (a folder, or a URI: writable, and not an existing model
    directory unless --force, then replaced file by file). Local folders are checked by the caller."""
    where = parse_location(text, flag)
    if isinstance(where, Path):
        return RunDir(where.resolve())
    check_writable(where, flag)
    out = RunDir(storage.mirror_root("model"), where)
    if out.list_remote(out.root).get("config.json") is not None and not force:
        out.discard()
        raise UserError(f"{flag} {where.uri}: a model directory already exists there; give a new path or --force")
    return out


def fetch_model_dir(text: str, flag: str) -> tuple[Path, RunDir | None]:
    """A model directory to read, local (as given) or in storage (downloaded to a folder of its own: the
    RunDir returned; `discard` it after)."""
    where = parse_location(text, flag)
    if isinstance(where, Path):
        return where, None
    check_readable(where, "model directory", flag)
    model = RunDir(storage.mirror_root("model"), where)
    model.pull()
    return model.root, model
