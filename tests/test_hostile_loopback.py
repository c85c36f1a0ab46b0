"""Issue 25 item 1: every command that starts a local Ray (`train`, `tune`, `run`, `rank`, `serve`) keeps it on
loopback, whatever the command imports first, without the test suite's own help (conftest.py sets
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for everything it starts; the CLI here gets a clean environment).

Each command runs as a user runs it (`allatt_dist.cli.main` in a fresh process), up to the moment its local Ray
is up: `connect` is wrapped to list the listening sockets of that process and every process it started (GCS,
raylet, dashboard and its agents, workers), shut Ray down and exit. Why these start Ray instances of their
own: a local instance is what is checked. They start two at a time (one module fixture)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from allatt_dist.cluster.session import is_loopback
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from tests.ray_procs import kill_ours

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "tune", "run", "rank", "serve")

WRAP = """
import json, os, sys
import psutil
import allatt_dist.cluster.session as session
real = session.connect
def listening(*args, **kw):
    real(*args, **kw)
    import ray
    me = psutil.Process()
    seen = []
    for p in [me, *me.children(recursive=True)]:
        try:
            seen += [[p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            pass
    print("LISTENING " + json.dumps(seen), flush=True)
    ray.shutdown()
    os._exit(0)
session.connect = listening
from allatt_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(root: Path, wt2: Path) -> dict[str, list[str]]:
    recipe = root / "r.yaml"
    recipe.write_text(
        f"data:\n  path: {wt2}\nmodel:\n  num_layers: 2\n  hidden_dim: 16\n  num_heads: 4\n  seq_len: 8\n"
        "  mem_len: 8\n  num_persistent: 4\ntrain:\n  batch_size: 2\n  eval_every: 10\n  checkpoint_every: 10\n"
        "scaling:\n  num_workers: 1\ntune:\n  space: {gates.temperature: {grid: [0.5]}}\n"
    )
    exp = root / "exp"  # an experiment with one finished trial: rank starts Ray to score it
    trial = exp / "trials" / "t0"
    (trial / "prune" / "model").mkdir(parents=True)
    (trial / "status.json").write_text('{"status": "finished"}')
    (trial / "prune" / "model" / "config.json").write_text("{}")
    (exp / "run.yaml").write_text(f"data:\n  path: {wt2}\n")
    served = root / "served"  # a leaderboard naming one tiny model: serve starts Ray to serve it
    cfg = ModelConfig(num_layers=1, hidden_dim=16, num_heads=4, num_persistent=4, seq_len=8, mem_len=8)
    vocab = Vocab(["<eos>", "<unk>", "a", "b"])
    meta = save_model_dir(build_model(cfg, len(vocab), None, None).eval(), vocab, served / "models" / "dense")
    row = {"name": "dense", "params": meta["params"], "test_ppl": 1.0, "model_dir": "models/dense", "pareto": True}
    (served / "leaderboard.json").write_text(json.dumps({"models": [row]}))
    return {
        "train": ["train", str(recipe), "--out", str(root / "t")],
        "tune": ["tune", str(recipe), "--out", str(root / "tu")],
        "run": ["run", str(recipe), "--out", str(root / "ru")],
        "rank": ["rank", str(exp)],
        "serve": ["serve", str(served), "--port", str(_free_port())],
    }


def _start(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", WRAP, *args]
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.fixture(scope="module")
def listening(tmp_path_factory, wt2_path) -> dict[str, tuple[int, str, list]]:
    root = tmp_path_factory.mktemp("loopback")
    torch.manual_seed(0)
    args = _inputs(root, wt2_path)
    mark = f"allatt-loopback-test-{uuid.uuid4().hex}"
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "ALLATT_CACHE_DIR", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}  # no RAY_* of the suite's
    env.update(PYTHONPATH=str(REPO), HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0", ALLATT_TEST_MARK=mark)
    out: dict[str, tuple[int, str, list | None]] = {}
    procs: list[subprocess.Popen] = []
    todo = list(args.items())
    try:
        while todo:  # two at a time: five Ray instances starting at once on 2 cores time out
            batch, todo = todo[:2], todo[2:]
            started = {c: _start(a, env, root) for c, a in batch}
            procs += started.values()
            for c, p in started.items():
                stdout, stderr = p.communicate(timeout=400)
                lines = [ln for ln in stdout.splitlines() if ln.startswith("LISTENING ")]
                out[c] = (p.returncode, stderr[-3000:], json.loads(lines[-1].split(" ", 1)[1]) if lines else None)
    finally:
        kill_ours(procs, [mark])
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_keeps_local_ray_on_loopback(listening, command: str) -> None:
    code, err, seen = listening[command]
    assert seen is not None, f"{command} did not start Ray (exit {code}): {err}"
    names = {n for n, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # Ray's own servers were seen, not just the driver
    open_ = [(n, ip, port) for n, ip, port in seen if not is_loopback(ip)]
    assert not open_, f"{command}: listening beyond loopback: {open_}"
    assert "listens beyond loopback" not in err, err
