"""The capacity check on a cluster that autoscales.

Fast tests: the arithmetic (`fits`, `scaled_out`), the node types read from the shipped launcher YAMLs, and
the private Ray reads `cluster/autoscaler.py` depends on (they fail here, loudly, when Ray moves them).

Marked `autoscale`: Ray's local fake autoscaler (`RAY_FAKE_CLUSTER=1`, a `fake_multinode` provider: a head
with 1 CPU, a worker type of 1 CPU, min_workers 0, max_workers 2), started with `ray start --head` on
private ports and a temp dir, HOME pointed at a temp dir, and stopped by killing exactly the processes it
started (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from clirun import run_cli
from ray_procs import kill_ours

from allatt_dist.cluster import autoscaler as autoscale
from allatt_dist.cluster.capacity import Demand, fits, scaled_out, slots

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Without a cluster


def test_slots_and_fits_count_whole_bundles_per_node():
    nodes = [{"CPU": 1.0}, {"CPU": 2.5, "GPU": 1.0}]
    assert slots(nodes, {"CPU": 1.0}) == 3
    assert slots(nodes, {"CPU": 1.0, "GPU": 1.0}) == 1
    assert fits(nodes, Demand({"CPU": 1.0}, 3))
    assert not fits(nodes, Demand({"CPU": 1.0}, 3, driver_cpus=0.6))  # 3.5 CPUs in all
    assert fits(nodes, Demand({"CPU": 1.0}, 3, driver_cpus=0.5))


def test_scaled_out_honours_per_type_and_cluster_caps():
    auto = autoscale.Autoscaler(
        "test",
        [autoscale.NodeType("small", {"CPU": 1.0}, 5), autoscale.NodeType("big", {"CPU": 8.0, "GPU": 1.0}, 2)],
        max_workers=3,
    )
    nodes = scaled_out(auto)
    assert sorted(n["CPU"] for n in nodes) == [1.0, 8.0, 8.0]  # the largest type first, three in all


def test_node_types_of_the_shipped_launcher_yamls():
    aws = autoscale.parse_autoscaling_yaml((REPO / "cluster/aws-gpu.yaml").read_text(), "aws-gpu.yaml")
    assert aws is not None and aws.types, "aws-gpu.yaml: no worker node types found"
    head = yaml.safe_load((REPO / "cluster/aws-gpu.yaml").read_text())["head_node_type"]
    assert head not in {t.name for t in aws.types}


def test_private_ray_reads_still_exist():
    """The reads `autoscaler.py` makes outside Ray's public API, as this Ray spells them."""
    import ray._private.state as state
    from ray.core.generated import autoscaler_pb2

    assert callable(state.state.get_cluster_config)
    group = autoscaler_pb2.ClusterConfig().node_group_configs.add()
    for name in ("name", "resources", "max_count"):
        assert hasattr(group, name), f"NodeGroupConfig lost {name}"
    from ray.autoscaler.v2.utils import is_autoscaler_v2  # noqa: F401
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized  # noqa: F401


def _fake_cluster_state(monkeypatch, nodes_over_time, auto):
    """capacity.py against scripted live nodes and a scripted autoscaler (no Ray)."""
    from allatt_dist.cluster import capacity

    seen = iter(nodes_over_time)
    last = {"nodes": nodes_over_time[0]}
    asked = []

    def alive():
        last["nodes"] = next(seen, last["nodes"])
        return last["nodes"]

    monkeypatch.setattr(capacity, "_alive", alive)
    monkeypatch.setattr(capacity, "POLL_S", 0.01)
    monkeypatch.setattr(capacity.autoscale, "discover", lambda: auto)
    monkeypatch.setattr(capacity.autoscale, "request", asked.append)
    monkeypatch.setattr(capacity.autoscale, "clear_request", lambda: asked.append([]))
    return capacity, asked


def test_without_an_autoscaler_the_live_nodes_decide(monkeypatch):
    from allatt_dist.config import ScalingConfig
    from allatt_dist.errors import UserError

    capacity, asked = _fake_cluster_state(monkeypatch, [[{"CPU": 1.0}]], None)
    with pytest.raises(UserError, match=r"room for 1 \(no autoscaler\)"):
        capacity.check_fits(ScalingConfig(num_workers=2))
    assert asked == []


def test_an_autoscaler_is_asked_and_the_check_returns_once_nodes_arrive(monkeypatch):
    from allatt_dist.config import ScalingConfig

    auto = autoscale.Autoscaler("test", [autoscale.NodeType("w", {"CPU": 1.0}, 2)], max_workers=2)
    head = {"CPU": 1.0, autoscale.HEAD_RESOURCE: 1.0}
    capacity, asked = _fake_cluster_state(monkeypatch, [[head], [head], [head, {"CPU": 1.0}]], auto)
    capacity.check_fits(ScalingConfig(num_workers=2, wait_for_nodes_s=30))
    assert asked == [[{"CPU": 1.0}, {"CPU": 1.0}]]


def test_unknown_node_types_wait_and_a_timeout_says_what_was_asked_and_what_arrived(monkeypatch):
    from allatt_dist.config import ScalingConfig
    from allatt_dist.errors import UserError

    auto = autoscale.Autoscaler("test", [autoscale.NodeType("gpu", {}, 4)])  # resources left to the cloud
    capacity, asked = _fake_cluster_state(monkeypatch, [[{"CPU": 4.0}]], auto)
    with pytest.raises(UserError) as err:
        capacity.check_fits(ScalingConfig(num_workers=2, use_gpu=True, wait_for_nodes_s=0.2))
    line = str(err.value)
    assert "asked for scaling.num_workers=2 workers of {'CPU': 1.0, 'GPU': 1.0}" in line and "\n" not in line
    assert "went from 1 node(s) with {'CPU': 4.0, 'GPU': 0.0} to 1 node(s)" in line
    assert asked[0] == [{"CPU": 1.0, "GPU": 1.0}] * 2 and asked[-1] == []  # asked, then withdrawn


# --------------------------------------------------------------------------------------------------
# Ray's fake autoscaler


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_config(gcs_port: int) -> dict:
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
             "rsync_filter")  # fmt: skip
    cfg = {
        "cluster_name": "allatt-fake",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs_port}",  # the fake nodes join our head, not a default port
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "auth": {"ssh_user": "nobody"},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    cfg.update({k: [] for k in empty})
    return cfg


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("as")  # short: Ray's unix sockets live under the temp dir
    home, raytmp = base / "home", base / "rt"
    home.mkdir()
    gcs_port = _free_port()
    (base / "autoscale.yaml").write_text(yaml.safe_dump(_fake_config(gcs_port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        HOME=str(home),
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        ALLATT_CACHE_DIR=str(base / "cache"),
    )
    cmd = [
        "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
        "--disable-usage-stats", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={raytmp}",
        f"--autoscaling-config={base / 'autoscale.yaml'}",
    ]  # fmt: skip
    log = open(base / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(raytmp.glob("session_*/logs/monitor.log")):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{(base / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{gcs_port}", "env": env, "base": base}
    finally:
        kill_ours([head], [str(raytmp)])
        log.close()


TINY = [
    "model.num_layers=1", "model.hidden_dim=16", "model.num_heads=2", "model.num_persistent=8",
    "model.seq_len=8", "model.mem_len=8", "model.adaptive_cutoffs=[]",
    "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=4",
    "train.checkpoint_every=4", "train.log_every=2", "data.eval_batch_size=32", "data.eval_max_segments=1",
    "scaling.cpus_per_worker=0.99", "scaling.use_gpu=false", "deepspeed.zero_stage=0",
]  # fmt: skip


def _train(fake_cluster, out: Path, data: Path, *sets: str) -> subprocess.CompletedProcess:
    items = [*TINY, f"data.path={data}", *sets]
    args = ["train", "tune_configs/quickstart.yaml", "--address", fake_cluster["address"], "--out", str(out),
            "--phase", "dense", "--no-progress", *[a for i in items for a in ("--set", i)]]  # fmt: skip
    return run_cli(*args, env=fake_cluster["env"], cwd=REPO)


@pytest.mark.autoscale
def test_a_request_above_max_workers_is_refused_fast(fake_cluster, wt2_slice, tmp_path):
    t0 = time.monotonic()
    r = _train(fake_cluster, tmp_path / "run", wt2_slice, "scaling.num_workers=4")
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "not even with the autoscaler at its limits" in line and "cpu_worker" in line, line
    assert took < 60, f"refusal took {took:.0f} s"
    assert not (tmp_path / "run").exists()


@pytest.mark.autoscale
def test_two_workers_on_a_head_with_room_for_one_train_after_a_node_is_added(fake_cluster, wt2_slice, tmp_path):
    r = _train(fake_cluster, tmp_path / "run", wt2_slice, "scaling.num_workers=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "autoscaler: waiting for scaling.num_workers=2" in r.stderr
    assert "autoscaler: ready after" in r.stderr
    result = json.loads((tmp_path / "run" / "dense" / "result.json").read_text())
    assert result["step"] == 4
    assert len(set(result["node_ids"])) == 2, result["node_ids"]


@pytest.mark.autoscale
def test_a_wait_that_times_out_says_what_was_asked_and_what_arrived(fake_cluster, wt2_slice, tmp_path):
    # Three 1-CPU workers fit only with both workers added; one second is not enough to add a node.
    r = _train(fake_cluster, tmp_path / "run", wt2_slice, "scaling.num_workers=3", "train.batch_size=3",
               "scaling.wait_for_nodes_s=1")  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "waited" in line and "asked for scaling.num_workers=3" in line and "the cluster went from" in line, line
    assert not (tmp_path / "run").exists()
