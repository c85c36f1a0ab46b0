"""Issue 25 item 2: the bucket lease cannot give two writers. A holder frozen (SIGSTOP) past the lease's expiry
loses it to a second command; resumed, it writes nothing more to the bucket and ends with one line saying it
lost the lease. The lease periods are shortened through ALLATT_LEASE_S / ALLATT_LEASE_BEAT_S (3 s / 0.5 s), so
the test takes seconds. Against the session's S3 server; no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from allatt_dist import remote
from allatt_dist.rundir import open_out
from allatt_dist.runlock import RunDirInUse, lease_periods

REPO = Path(__file__).resolve().parents[1]
URI = "s3://runs/hostile-lease/run"
HOLDER = textwrap.dedent(f"""
    import sys, time
    from allatt_dist.rundir import open_out
    run = open_out({URI!r})
    with run.held():
        for n in range(1, 10_000):
            run.write_text(run.root / f"a-{{n}}.txt", "x")  # published: one upload per round
            print("sleeping", n, flush=True)
            time.sleep(1.0)
    """)


@pytest.fixture
def env(s3, monkeypatch, tmp_path):
    for k, v in s3.env(ALLATT_MIRROR_DIR=str(tmp_path / "m"), ALLATT_LEASE_S="3", ALLATT_LEASE_BEAT_S="0.5").items():
        monkeypatch.setenv(k, v)
    remote._FS_CACHE.clear()
    yield s3
    remote._FS_CACHE.clear()


def _written(s3) -> list[str]:
    return [k for k in s3.keys("runs", "hostile-lease/run/") if k.rsplit("/", 1)[-1].startswith("a-")]


def test_frozen_holder_is_fenced_off_after_a_takeover(env) -> None:
    assert lease_periods() == (3.0, 0.5, 0.5)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3):  # a few rounds published
            assert holder.stdout.readline().startswith("sleeping"), holder.stderr.read() if holder.poll() else ""
        holder.send_signal(signal.SIGSTOP)  # frozen in its sleep, between two publishes
        frozen_at, taken = time.monotonic(), None
        while taken is None and time.monotonic() - frozen_at < 30:
            try:
                with open_out(URI).held():  # refused until the lease expires (3 s), then taken over
                    taken = time.monotonic() - frozen_at
                    before = _written(env)
                    holder.send_signal(signal.SIGCONT)
                    out, err = holder.communicate(timeout=60)  # it must end: fenced off the bucket
                    assert _written(env) == before, "the old holder wrote after the takeover"
            except RunDirInUse:
                time.sleep(0.2)
        assert taken is not None and taken >= 2.0, taken
        assert holder.returncode != 0
        assert "no longer holds the run's lease" in err, err[-2000:]
        assert len(before) >= 3
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
