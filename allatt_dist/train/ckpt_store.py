"""Where a phase's checkpoints are published and found: one interface, a local folder or object storage.

    LocalCheckpoints   RUN/<phase>/checkpoints on a folder every node sees (train/checkpoints.py: a
                       shared staging folder, MANIFEST.json, one rename)
    RemoteCheckpoints  the same names in a bucket (storage.py): each rank writes its files into its own
                       local staging folder and uploads them under checkpoint_<step>/; rank 0 then uploads
                       the manifest of every rank's files, last. No manifest: not published.

Both give the driver `resume_point` (damaged checkpoints reported and removed, unfinished ones removed) and
`newest_metrics`, and the workers `candidates`, `fetch` (a local folder to load from, checked against the
manifest) and `publish` (collective: every rank calls it once its files are in its staging folder).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from allatt_dist.storage import Mirror
from allatt_dist.train import checkpoints as ck


def _dist() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class LocalCheckpoints:
    def __init__(self, root: Path):
        self.root = root

    def resume_point(self, report: Callable[[str], None] = ck.warn) -> None:
        ck.resume_point(self.root, report)

    def newest_metrics(self) -> tuple[dict, str | None]:
        ck.remove_unfinished(self.root)  # what a worker killed while writing left
        newest = ck.published(self.root)
        if not newest:
            return {}, None
        return json.loads((newest[0] / "metrics.json").read_text()), str(newest[0])

    def candidates(self) -> list[str]:
        return [p.name for p in ck.candidates(self.root)]

    def fetch(self, name: str) -> Path:
        return self.root / name

    def release(self, path: Path) -> None:
        """Done loading from `path` (a local checkpoint stays)."""

    def staging(self, step: int, nonce: str) -> Path:
        return ck.staging_dir(self.root, step, nonce)

    def publish(self, staging: Path, step: int, keep: int, rank: int) -> None:
        _barrier()  # every rank's files are in the shared staging folder
        if rank == 0:
            ck.publish(staging, self.root, step, keep)
        _barrier()


class RemoteCheckpoints:
    def __init__(self, store: Mirror, root: Path):
        self.store, self.root = store, root

    def _names(self) -> dict[str, dict[str, int]]:
        """Remote checkpoint folders (ours by name) -> their files and sizes, newest step first."""
        files = self.store.list_remote(self.root)
        by: dict[str, dict[str, int]] = {}
        for rel, size in files.items():
            name, _, inner = rel.partition("/")
            if name.startswith(ck.PREFIX) and inner and ck._step_of(Path(name)) >= 0:
                by.setdefault(name, {})[inner] = size
        return dict(sorted(by.items(), key=lambda kv: ck._step_of(Path(kv[0])), reverse=True))

    def _manifest(self, name: str) -> dict | None:
        path = self.root / name / ck.MANIFEST
        self.store.pull(path)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def resume_point(self, report: Callable[[str], None] = ck.warn) -> None:
        """The driver: checkpoints without a manifest removed (an upload or a deletion cut short), then the
        newest published one's sizes checked against its manifest (the checksums are checked by each worker as
        it downloads), a damaged one reported and removed, and so on to an older one."""
        names = self._names()
        for name, files in names.items():
            if ck.MANIFEST not in files:
                self.store.delete(self.root / name)
        for name, files in names.items():
            if ck.MANIFEST not in files:
                continue
            man = self._manifest(name)
            why = None
            if man is None or not isinstance(man.get("files"), dict):
                why = f"{self.store.uri(self.root / name / ck.MANIFEST)}: unreadable"
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
            if ck.MANIFEST in files:
                path = self.root / name / "metrics.json"
                self.store.pull(path)
                return json.loads(path.read_text()), self.store.uri(self.root / name)
        return {}, None

    def candidates(self) -> list[str]:
        return [n for n, files in self._names().items() if ck.MANIFEST in files]

    def fetch(self, name: str) -> Path:
        """Download checkpoint `name` here and check every file against its manifest (sizes and checksums)."""
        local = self.root / name
        self.store.pull(local)
        why = ck.problem(local)
        if why is not None:
            raise OSError(why)
        return local

    def release(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)  # loaded: the bucket keeps it
        self.store.forget(path)

    def staging(self, step: int, nonce: str) -> Path:
        return ck.staging_dir(self.root, step, nonce)  # this rank's own folder (a mirror of its own)

    def publish(self, staging: Path, step: int, keep: int, rank: int) -> None:
        name = f"{ck.PREFIX}{ck._step_name(step)}"
        final = self.root / name
        if rank == 0:  # past the resume point (it failed to load), or an interrupted upload: superseded
            for old in self._names():
                if ck._step_of(Path(old)) >= step:
                    self.store.delete(self.root / old)
        _barrier()
        mine = ck.describe(staging)  # this rank's files: size, SHA-256
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self.store.push(final)  # everything but a manifest (none is there yet)
        every = [mine]
        if _dist():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        _barrier()  # every rank's files are in the bucket
        if rank == 0:
            files = {k: v for part in every for k, v in part.items()}
            ck.write_manifest(final, step, files)
            self.store.push(final / ck.MANIFEST)
            kept = self.candidates()[:keep]
            for old in [n for n in self._names() if n not in kept]:  # older ones, and leftovers without a manifest
                self.store.delete(self.root / old)
        _barrier()
        self.release(final)  # the bucket holds it


def checkpoint_store(store: Mirror, root: Path) -> LocalCheckpoints | RemoteCheckpoints:
    return RemoteCheckpoints(store, root) if store.is_remote else LocalCheckpoints(root)
