"""A phase's checkpoints, one interface for the worker and the driver, in a local folder or a bucket.

    ckpts = open_checkpoints(run, RUN/<phase>/checkpoints)
    worker:  ckpts.restore(load, rank, world)        choose the newest every rank can load; fall back
             ckpts.save(step, write, metrics, ...)   write whole (every rank's files, manifest last),
                                                     then prune to `train.keep_checkpoints`
    driver:  ckpts.resume_point()                    before a run: damaged/unfinished ones reported, removed
             ckpts.newest_metrics()                  after it: the last report's metrics
             ckpts.candidates()                      list: published checkpoint names, newest first

    LocalCheckpoints   a folder every node sees (train/ckpt_folder.py: a shared staging folder, MANIFEST.json,
                       one rename)
    RemoteCheckpoints  the same names in a bucket (rundir.py): each rank writes its files into its own
                       local staging folder and uploads them under checkpoint_<step>/; rank 0 then uploads
                       the manifest of every rank's files, last. No manifest: not published.

`save` and `restore` are collective (every rank calls them); what a checkpoint holds is the caller's
(`write(folder)` / `load(folder)`: train/worker.py writes the DeepSpeed state, memory and stream position).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from allatt_dist.errors import CheckpointError
from allatt_dist.rundir import RunDir
from allatt_dist.train import ckpt_folder as folder
from allatt_dist.train.ckpt_folder import MANIFEST, PREFIX, step_name, step_of, warn


def _dist() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gathered(value: Any, world: int) -> list[Any]:
    """`value` of every rank, by rank (collective)."""
    every = [value] * world
    if dist.is_initialized() and world > 1:
        every = [None] * world
        dist.all_gather_object(every, value)
    return every


class Checkpoints:
    """What both kinds share: the collective save and restore over their own fetch/staging/publish."""

    root: Path

    def candidates(self) -> list[str]:
        raise NotImplementedError

    def fetch(self, name: str) -> Path:
        raise NotImplementedError

    def release(self, path: Path) -> None:
        """Done loading from `path`."""

    def staging(self, step: int, nonce: str) -> Path:
        return folder.staging_dir(self.root, step, nonce)

    def publish(self, staging: Path, step: int, keep: int, rank: int) -> None:
        raise NotImplementedError

    def save(self, step: int, write: Callable[[Path], None], metrics: dict, keep: int, rank: int, world: int) -> None:
        """Every rank writes its files (`write(folder)`) into one staging folder; rank 0 adds metrics.json and
        publishes it (manifest, rename) once all have, then keeps the newest `keep`: whole or absent."""
        nonce = [folder.new_nonce() if rank == 0 else None]
        if dist.is_initialized() and world > 1:
            dist.broadcast_object_list(nonce, src=0)
        staging = self.staging(step, nonce[0])
        write(staging)
        if rank == 0:
            (staging / "metrics.json").write_text(json.dumps(metrics))
        self.publish(staging, step, keep, rank)  # collective

    def restore(self, load: Callable[[Path], Any], rank: int, world: int) -> Any | None:
        """`load(folder)` of the newest checkpoint every rank can load (None: there is none, start afresh).

        All ranks try the same candidates in the same order and agree on each: one rank failing to load
        moves all of them to the next older one, so no rank resumes from another step than the others."""
        tried = []
        for name in self.candidates():
            ckpt = self.root / name
            try:
                ckpt = self.fetch(name)  # object storage: downloaded and checked against its manifest
                loaded, error = load(ckpt), None
            except Exception as e:  # noqa: BLE001 - any failure moves every rank to an older checkpoint
                loaded, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            bad = [f"rank {r}: {e}" for r, e in enumerate(_gathered(error, world)) if e is not None]
            self.release(ckpt)
            if not bad:
                return loaded
            tried.append(ckpt.name)
            if rank == 0:
                warn(f"checkpoint {ckpt} could not be loaded ({bad[0]}); trying an older one")
        if tried:  # a failed load may have changed the caller's state: never train on from it
            raise CheckpointError(f"{self.root}: no checkpoint could be loaded (tried {', '.join(tried)})")
        return None


class LocalCheckpoints(Checkpoints):
    def __init__(self, root: Path):
        self.root = root

    def resume_point(self, report: Callable[[str], None] = warn) -> None:
        folder.resume_point(self.root, report)

    def newest_metrics(self) -> tuple[dict, str | None]:
        folder.remove_unfinished(self.root)  # what a worker killed while writing left
        newest = folder.published(self.root)
        if not newest:
            return {}, None
        return json.loads((newest[0] / "metrics.json").read_text()), str(newest[0])

    def candidates(self) -> list[str]:
        return [p.name for p in folder.candidates(self.root)]

    def fetch(self, name: str) -> Path:
        return self.root / name

    def publish(self, staging: Path, step: int, keep: int, rank: int) -> None:
        _barrier()  # every rank's files are in the shared staging folder
        if rank == 0:
            folder.publish(staging, self.root, step, keep)  # looked up here: tests/test_resume.py wraps it
        _barrier()


class RemoteCheckpoints(Checkpoints):
    def __init__(self, store: RunDir, root: Path):
        self.store, self.root = store, root

    def _names(self) -> dict[str, dict[str, int]]:
        """Remote checkpoint folders (ours by name) -> their files and sizes, newest step first."""
        files = self.store.list_remote(self.root)
        by: dict[str, dict[str, int]] = {}
        for rel, size in files.items():
            name, _, inner = rel.partition("/")
            if name.startswith(PREFIX) and inner and step_of(Path(name)) >= 0:
                by.setdefault(name, {})[inner] = size
        return dict(sorted(by.items(), key=lambda kv: step_of(Path(kv[0])), reverse=True))

    def _manifest(self, name: str) -> dict | None:
        path = self.root / name / MANIFEST
        self.store.fetch(path)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def resume_point(self, report: Callable[[str], None] = warn) -> None:
        """The driver: checkpoints without a manifest removed (an upload or a deletion cut short), then the
        newest published one's sizes checked against its manifest (the checksums are checked by each worker as
        it downloads), a damaged one reported and removed, and so on to an older one."""
        names = self._names()
        for name, files in names.items():
            if MANIFEST not in files:
                self.store.delete(self.root / name)
        for name, files in names.items():
            if MANIFEST not in files:
                continue
            man = self._manifest(name)
            why = None
            if man is None or not isinstance(man.get("files"), dict):
                why = f"{self.store.uri(self.root / name / MANIFEST)}: unreadable"
            else:
                for rel, v in man["files"].items():
                    if files.get(rel) != v.get("size"):
                        got = f"{files[rel]} bytes where {v.get('size')} were written" if rel in files else "missing"
                        why = f"{self.store.uri(self.root / name / rel)}: {got}"
                        break
            if why is None:
                return
            report(f"{name} skipped: {why}")
            self.store.delete(self.root / name)

    def newest_metrics(self) -> tuple[dict, str | None]:
        for name, files in self._names().items():
            if MANIFEST in files:
                path = self.root / name / "metrics.json"
                self.store.fetch(path)
                return json.loads(path.read_text()), self.store.uri(self.root / name)
        return {}, None

    def candidates(self) -> list[str]:
        return [n for n, files in self._names().items() if MANIFEST in files]

    def fetch(self, name: str) -> Path:
        """Download checkpoint `name` here and check every file against its manifest (sizes and checksums)."""
        local = self.root / name
        self.store.fetch(local)
        why = folder.problem(local)
        if why is not None:
            raise OSError(why)
        return local

    def release(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)  # loaded: the bucket keeps it
        self.store.forget(path)

    def publish(self, staging: Path, step: int, keep: int, rank: int) -> None:
        name = f"{PREFIX}{step_name(step)}"
        final = self.root / name
        if rank == 0:  # past the resume point (it failed to load), or an interrupted upload: superseded
            for old in self._names():
                if step_of(Path(old)) >= step:
                    self.store.delete(self.root / old)
        _barrier()
        mine = folder.describe(staging)  # this rank's files: size, SHA-256
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self.store.publish(final)  # everything but a manifest (none is there yet)
        every = _gathered(mine, dist.get_world_size() if _dist() else 1)
        _barrier()  # every rank's files are in the bucket
        if rank == 0:
            files = {k: v for part in every for k, v in part.items()}
            folder.write_manifest(final, step, files)
            self.store.publish(final / MANIFEST)
            kept = self.candidates()[:keep]
            for old in [n for n in self._names() if n not in kept]:  # older ones, and leftovers without a manifest
                self.store.delete(self.root / old)
        _barrier()
        self.release(final)  # the bucket holds it


def open_checkpoints(run: RunDir, root: Path) -> Checkpoints:
    """The checkpoints under `root` (RUN/<phase>/checkpoints) of run directory `run`."""
    return RemoteCheckpoints(run, root) if run.is_remote else LocalCheckpoints(root)
