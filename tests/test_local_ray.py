"""The Ray instance the project starts for itself is closed: loopback only, a token nobody else has,
nothing written to the user's home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from allatt_dist.cluster.session import is_loopback

REPO = Path(__file__).resolve().parents[1]

# A fresh process (Ray reads its switches when imported) that starts the local instance as the CLI
# does, runs an actor and a task, and lists every listening socket of itself and its descendants
# (GCS, raylet, dashboard and its agents, workers).
PROBE = """
import json, os, psutil
from allatt_dist.cluster.session import connect
connect(num_cpus=1)  # as the CLI does: before anything imports ray
import ray
@ray.remote
class Echo:
    def ping(self):
        return os.getpid()
@ray.remote
def square(x):
    return x * x
actor = Echo.remote()
assert ray.get(actor.ping.remote()) > 0 and ray.get(square.remote(3)) == 9
me = psutil.Process()
seen = []
for p in [me, *me.children(recursive=True)]:
    try:
        conns = p.net_connections(kind="inet")
        name = p.name()
    except psutil.Error:
        continue
    seen += [[name, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
print(json.dumps({"listening": seen, "token_set": bool(os.environ.get("RAY_AUTH_TOKEN"))}))
ray.shutdown()
"""


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1", "example.org"]))


def test_local_ray_listens_on_loopback_only_and_writes_nothing_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # what connect() itself must set
    env.update(HOME=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    names = {n for n, _, _ in out["listening"]}
    assert {"gcs_server", "raylet"} <= names, out  # the probe saw Ray's own servers, not just the driver
    assert len(out["listening"]) >= 6, out
    open_ = [(n, ip, port) for n, ip, port in out["listening"] if not is_loopback(ip)]
    assert not open_, f"listening beyond loopback: {open_}"
    assert out["token_set"], "the local instance runs without a token of its own"
    assert list(home.iterdir()) == [], f"written into HOME: {list(home.rglob('*'))}"
