"""The checkpoint folder protocol: whole or absent, written under a temporary name, published by one rename.
(The interface the worker and the driver use, local or in a bucket, is train/checkpoints.py.)

    RUN/<phase>/checkpoints/
      checkpoint_00000300/          published: every rank's files, then MANIFEST.json (written last:
                                    each file's size and SHA-256), then renamed to this name
      .staging-00000400-<nonce>/    being written, or left by a process killed while writing: never
                                    read, removed by the next run of the phase and at its end
      .trash-<name>/                a checkpoint being deleted (renamed first, so a half-deleted
                                    checkpoint never looks published)
      (Ray Train's own run state, which lists no checkpoints: reports carry metrics only)

Every rank writes its DeepSpeed shards and memory into the staging folder (a run directory on disk
is one folder every node sees, docs/cluster.md; one in a bucket: train/checkpoints.py); after a
barrier rank 0 writes the manifest and renames
the folder, then deletes the oldest published checkpoints beyond `train.keep_checkpoints`. A kill at
any moment leaves either no new checkpoint or a complete one.

Resuming, the driver checks every published checkpoint against its manifest (sizes and checksums),
newest first, warns about (and removes) each one that fails, naming the file, and removes what was
never published; the workers then load the newest remaining one and fall back to an older one if
any rank cannot load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from allatt_dist.atomic import writing

PREFIX = "checkpoint_"
STAGING = ".staging-"
TRASH = ".trash-"
MANIFEST = "MANIFEST.json"


def step_name(step: int) -> str:
    return f"{step:08d}"


def staging_dir(root: Path, step: int, nonce: str | None = None) -> Path:
    """Where the ranks write the checkpoint of `step` (one name for all ranks: rank 0 picks `nonce`)."""
    return root / f"{STAGING}{step_name(step)}-{nonce or secrets.token_hex(4)}"


def new_nonce() -> str:
    return secrets.token_hex(4)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        os.fsync(f.fileno())  # on disk before the manifest says it is
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(folder: Path) -> dict[str, dict]:
    """Every file under `folder` (relative name) -> its size and SHA-256, as a manifest lists them."""
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, step: int, files: dict[str, dict]) -> None:
    """MANIFEST.json in `folder`, through a temporary name and on disk before it is renamed in."""
    with writing(folder / MANIFEST, fsync=True) as f:
        json.dump({"step": step, "files": files}, f, indent=1)


def publish(staging: Path, root: Path, step: int, keep: int) -> Path:
    """Rank 0, once every rank's files are in `staging`: manifest last, then one rename into place;
    then only the newest `keep` published checkpoints are kept. Returns the published folder."""
    write_manifest(staging, step, describe(staging))
    final = root / f"{PREFIX}{step_name(step)}"
    for later in published(root):
        if step_of(later) >= step:  # past the resume point (it failed to load): superseded
            _discard(later)
    os.rename(staging, final)
    _fsync_dir(root)
    for old in published(root)[keep:]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Delete a folder so that no reader sees it half-deleted under its name."""
    trash = path.with_name(f"{TRASH}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def step_of(path: Path) -> int:
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def _ours(root: Path) -> list[Path]:
    """Folders named as this module publishes them (checkpoint_<step>), newest step first. Ray Train's
    own files there (checkpoint_manager_snapshot.json) and an earlier version's checkpoint_<date>
    folders, which Ray Train's record may name, are not ours: left alone."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and step_of(p) >= 0]
    return sorted(found, key=step_of, reverse=True)


def published(root: Path) -> list[Path]:
    """Published checkpoints (a manifest inside), newest step first."""
    return [p for p in _ours(root) if (p / MANIFEST).is_file()]


def problem(ckpt: Path, checksums: bool = True) -> str | None:
    """Why `ckpt` cannot be resumed from, naming the file (None: it is whole)."""
    if not (ckpt / MANIFEST).is_file():
        return f"{ckpt / MANIFEST}: missing (the checkpoint was never completed)"
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        items = [(ckpt / rel, int(v["size"]), str(v["sha256"])) for rel, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{ckpt / MANIFEST}: unreadable ({type(e).__name__})"
    for path, size, _ in items:
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes where {size} were written (truncated or damaged)"
    if checksums:
        for path, _, digest in items:
            if _sha256(path) != digest:
                return f"{path}: its content changed since it was written (checksum differs)"
    return None


def warn(message: str) -> None:
    print(f"allatt-dist: warning: {message}", file=sys.stderr, flush=True)


def remove_unfinished(root: Path) -> None:
    """Staging and trash folders: what a process killed while writing or deleting a checkpoint left."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith((STAGING, TRASH)):
            shutil.rmtree(p, ignore_errors=True)


def resume_point(root: Path, report: Callable[[str], None] = warn) -> Path | None:
    """The driver, before a phase (re)starts: the newest whole checkpoint, after removing what is not
    whole (each damaged one reported in one line that names its file). None: start from step 0."""
    remove_unfinished(root)
    for ckpt in _ours(root):
        why = problem(ckpt)
        if why is None:
            return ckpt
        report(f"{ckpt.name} skipped: {why}")
        _discard(ckpt)
    return None


def candidates(root: Path) -> list[Path]:
    """A worker, starting: published checkpoints whose files have their sizes, newest first (the driver
    checked the checksums before the run; a restart within the run finds only checkpoints it wrote)."""
    return [c for c in published(root) if problem(c, checksums=False) is None]
