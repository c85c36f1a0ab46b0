"""Issue 25 item 8: a killed driver's local copy of a bucket's run directory (allatt-driver-<hash>: one name
per URI, no pid in it) is swept once its process is gone, and never while it lives. No Ray, no bucket: the
claim is a flock, held here by a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from allatt_dist import storage


def test_dead_drivers_copy_swept_live_ones_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ALLATT_MIRROR_DIR", str(tmp_path))
    dead = tmp_path / "allatt-driver-0123456789abcdef"  # a driver killed mid-run (no claim file survives)
    (dead / "dense").mkdir(parents=True)
    (dead / "dense" / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / "allatt-driver-fedcba9876543210"
    live.mkdir()
    (live / "run.yaml").write_text("x: 1\n")
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from allatt_dist import storage
        fd = storage.claim_driver(Path({str(live)!r}))
        print("held", flush=True)
        sys.stdin.readline()
        """)
    for p in (dead, live):
        os.utime(p, (1, 1))  # long unchanged: only a claim keeps it
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        mine = storage.mirror_root("run")  # sweeps first
        assert not dead.exists()
        assert (live / "run.yaml").is_file()
        mine.rmdir()
    finally:
        child.kill()  # its driver dies without releasing: the kernel drops the flock
        child.wait()
    storage.mirror_root("run").rmdir()
    assert not live.exists() and not Path(str(live) + ".claim").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_own_claim_released(tmp_path: Path) -> None:
    root = tmp_path / "allatt-driver-00"
    fd = storage.claim_driver(root)
    assert storage.try_claim(storage._claim_file(root)) is None  # held: a sweep would skip it
    storage.release_driver(root, fd)
    assert not storage._claim_file(root).exists()
