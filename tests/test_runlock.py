"""One writer per run directory (allatt_dist/runlock.py): concurrent commands, a dead holder, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clirun import run_cli

from allatt_dist.runlock import LOCK_NAME, RunDirInUse, check_not_in_use, hold, this_command

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "tune_configs/quickstart.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process that holds `run_dir` until killed."""
    code = "import sys,time\nfrom allatt_dist.runlock import hold\nwith hold(sys.argv[1], 'holder'):\n"
    code += "    print('held', flush=True); time.sleep(600)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_every_writing_command_is_refused_on_a_directory_in_use(tmp_path, wt2_path):
    exp = tmp_path / "exp"
    data = f"data.path={wt2_path}"
    with hold(exp):
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        for args in (
            ("train", RECIPE, "--out", str(exp), "--set", data),
            ("tune", RECIPE, "--out", str(exp), "--set", data),
            ("run", RECIPE, "--out", str(exp), "--set", data),
            ("rank", str(exp)),
            ("train", RECIPE, "--out", str(exp / "dense-txl"), "--set", data),  # a folder inside it
        ):
            r = _cli(*args)
            assert r.returncode == 2, (args, r.stderr)
            line = r.stderr.strip()
            assert len(line.splitlines()) == 1 and me in line and "in use by" in line, (args, line)
            assert f"({this_command()})" in line, line  # the holder's command line
        assert sorted(p.name for p in exp.iterdir()) == [LOCK_NAME], "a refused command wrote something"
    assert not exp.exists(), "the lock's folder, empty after the command, is left behind"


def test_a_file_is_no_run_directory(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _cli("rank", str(tmp_path / "afile"))
    assert r.returncode == 2 and r.stderr.strip().endswith("afile: exists and is not a folder"), r.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_prune_into_a_run_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    with hold(run):
        with pytest.raises(RunDirInUse, match=f"inside {run}, which is in use by pid {os.getpid()}"):
            check_not_in_use(run / "prune" / "pruned")
    check_not_in_use(run / "prune" / "pruned")  # released: allowed


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    with pytest.raises(RunDirInUse, match=f"pid {p.pid} on .*holder"):
        with hold(run):
            pass
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (run / LOCK_NAME).is_file()  # the dead holder's file is still there...
    with hold(run) as lock:  # ...but not held: taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()


def _race(run_dir: str, start: float, q) -> None:
    while time.time() < start:
        pass
    try:
        with hold(run_dir):
            q.put("won")
            time.sleep(1.0)
    except RunDirInUse:
        q.put("refused")


def test_of_concurrent_takers_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start = time.time() + 0.5
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "run"), start, q)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(q.get(timeout=5) for _ in procs)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes
