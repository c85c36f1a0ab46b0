"""Checkpoints whole or ignored, without Ray: the folder protocol (allatt_dist/train/ckpt_folder.py) and the
interface over it (allatt_dist/train/checkpoints.py: save whole, restore with fall-back), in one process.

The same protocol under real Ray Train workers (a worker killed while writing, a truncated newest
checkpoint) is tested in tests/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allatt_dist.errors import CheckpointError
from allatt_dist.train import ckpt_folder as ck
from allatt_dist.train.checkpoints import LocalCheckpoints


def _write(root: Path, step: int, ranks: int = 2, nonce: str = "n") -> Path:
    """What the ranks of one checkpoint write into their staging folder (as worker.py does)."""
    d = ck.staging_dir(root, step, nonce)
    (d / "ds").mkdir(parents=True)
    (d / "latest").write_text("ds")
    for r in range(ranks):
        (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r, step % 256]) * 500)
        (d / f"mems_rank{r}.safetensors").write_bytes(b"m" * (100 + r))
    return d


def _no_warning(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


def test_a_checkpoint_is_visible_only_once_published(tmp_path):
    root = tmp_path / "checkpoints"
    staging = _write(root, 10)
    assert ck.published(root) == [] and ck.candidates(root) == []  # every rank wrote, not yet published
    final = ck.publish(staging, root, 10, keep=2)
    assert final == root / "checkpoint_00000010" and not staging.exists()
    assert ck.published(root) == [final] and ck.problem(final) is None
    manifest = json.loads((final / ck.MANIFEST).read_text())
    assert manifest["step"] == 10 and set(manifest["files"]) == {
        "latest",
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mems_rank0.safetensors",
        "mems_rank1.safetensors",
    }


def test_keep_counts_whole_checkpoints_and_partial_ones_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        ck.publish(_write(root, step, nonce=f"s{step}"), root, step, keep=2)
    _write(root, 40, nonce="killed")  # a kill while writing step 40
    (root / ".trash-checkpoint_00000005-ab").mkdir()  # a kill while deleting
    ray_own = ["checkpoint_2026-11-29_22-00-00.000000", "checkpoint_manager_snapshot.json"]
    (root / ray_own[0]).mkdir()  # Ray Train's (an earlier version's) record: not ours, left alone
    (root / ray_own[1]).write_text("{}")
    assert [p.name for p in ck.published(root)] == ["checkpoint_00000030", "checkpoint_00000020"]
    assert ck.resume_point(root, report=_no_warning) == ck.published(root)[0]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000020", "checkpoint_00000030", *ray_own]


def test_a_checkpoint_folder_without_its_manifest_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    ck.publish(_write(root, 10), root, 10, keep=2)
    (root / "checkpoint_00000020").mkdir()  # a copy cut short, or a manifest deleted
    said: list[str] = []
    assert ck.resume_point(root, report=said.append) == root / "checkpoint_00000010"
    assert len(said) == 1 and "checkpoint_00000020/MANIFEST.json: missing" in said[0]
    assert not (root / "checkpoint_00000020").exists()


def test_a_truncated_newest_checkpoint_is_skipped_naming_the_file(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        ck.publish(_write(root, step, nonce=f"s{step}"), root, step, keep=2)
    victim = root / "checkpoint_00000020/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:300])
    assert ck.candidates(root) == [root / "checkpoint_00000010"]  # a worker's size check alone skips it
    said: list[str] = []
    assert ck.resume_point(root, report=said.append) == root / "checkpoint_00000010"
    assert len(said) == 1 and str(victim) in said[0] and "300 bytes where 1000 were written" in said[0], said
    assert not (root / "checkpoint_00000020").exists()


def test_changed_content_and_a_damaged_manifest_are_found(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        ck.publish(_write(root, step, nonce=f"s{step}"), root, step, keep=3)
    flipped = root / "checkpoint_00000030/mems_rank0.safetensors"
    flipped.write_bytes(b"x" * 100)  # same size, other bytes
    (root / "checkpoint_00000020" / ck.MANIFEST).write_text('{"files": ')
    said: list[str] = []
    assert ck.resume_point(root, report=said.append) == root / "checkpoint_00000010"
    assert str(flipped) in said[0] and "checksum differs" in said[0]
    assert str(root / "checkpoint_00000020" / ck.MANIFEST) in said[1] and "unreadable" in said[1]


def test_publishing_behind_a_checkpoint_that_failed_to_load_supersedes_it(tmp_path):
    """Resumed from step 10 because step 20 could not be loaded: the next step-20 checkpoint replaces it,
    and no published checkpoint is ever newer than the run that wrote the last one."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        ck.publish(_write(root, step, nonce=f"s{step}"), root, step, keep=3)
    ck.publish(_write(root, 20, nonce="again"), root, 20, keep=3)
    assert [p.name for p in ck.published(root)] == ["checkpoint_00000020", "checkpoint_00000010"]
    assert not any(p.name.startswith(ck.TRASH) for p in root.iterdir())


def test_save_publishes_whole_with_metrics_and_restore_falls_back_to_an_older_one(tmp_path, capsys):
    ckpts = LocalCheckpoints(tmp_path / "checkpoints")
    assert ckpts.restore(lambda folder: 1 / 0, rank=0, world=1) is None  # nothing yet: start afresh

    def writer(step: int):
        def write(staging: Path) -> None:  # as DeepSpeed's save_checkpoint does: it makes the folder
            staging.mkdir(parents=True)
            (staging / "state.txt").write_text(str(step))

        return write

    for step in (10, 20, 30):
        ckpts.save(step, writer(step), {"step": step}, 2, 0, 1)
    assert ckpts.candidates() == ["checkpoint_00000030", "checkpoint_00000020"]  # keep=2, newest first
    assert json.loads((ckpts.root / "checkpoint_00000030" / "metrics.json").read_text()) == {"step": 30}

    def load(folder: Path) -> int:
        step = int((folder / "state.txt").read_text())
        if step == 30:
            raise OSError("cannot read the shards")
        return step

    assert ckpts.restore(load, rank=0, world=1) == 20
    said = capsys.readouterr().err
    assert "checkpoint_00000030 could not be loaded (rank 0: OSError: cannot read the shards)" in said
    with pytest.raises(CheckpointError, match=r"no checkpoint could be loaded \(tried checkpoint_00000030, "):
        ckpts.restore(lambda folder: 1 / 0, rank=0, world=1)
