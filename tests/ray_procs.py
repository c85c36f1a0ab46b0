"""Stopping exactly the Ray processes a test started (never `ray stop`, which ends every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _ours(pid: int, marks: list[str]) -> bool:
    """Whether process `pid` names one of `marks` (our temp dir, our token file) in its command or environment."""
    try:
        blob = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return any(m.encode() in blob for m in marks)


def kill_ours(procs: list[subprocess.Popen], marks: list[str]) -> None:
    """SIGKILL the process groups of our `ray start` commands (raylet, GCS, dashboard, agents), then any
    process that still names one of `marks` (Ray workers, job drivers and fake autoscaled nodes run in
    their own sessions). Nothing else on this machine is touched."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    me = os.getpid()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me and _ours(int(d), marks)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.5)
