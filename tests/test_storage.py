"""Run directories in object storage (allatt_dist/rundir.py, storage.py), against a real S3-protocol server on loopback.

Without Ray: the RunDir's push/pull/delete (what publish/fetch do), bad URIs and buckets as one line,
the lease lock, and the checkpoint protocol in a bucket (train/checkpoints.py). Whole runs into a bucket
are in test_train.py (a crash and a resume, one node) and test_cluster.py (two nodes that share no
directory).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3server import S3Server

from allatt_dist import remote, storage
from allatt_dist.errors import UserError
from allatt_dist.remote import is_uri, parse_remote
from allatt_dist.rundir import RunDir, open_out
from allatt_dist.runlock import LOCK_NAME, RunDirInUse, hold
from allatt_dist.train import ckpt_folder as ck
from allatt_dist.train.checkpoints import RemoteCheckpoints

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "tune_configs/quickstart.yaml")


@pytest.fixture
def env(s3, monkeypatch, tmp_path):
    for k, v in s3.env(ALLATT_MIRROR_DIR=str(tmp_path / "mirrors")).items():
        monkeypatch.setenv(k, v)
    remote._FS_CACHE.clear()
    yield s3
    remote._FS_CACHE.clear()


def _prefix(request) -> str:
    return f"t/{request.node.name[:60]}"


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_uris_are_told_from_paths():
    assert is_uri("s3://b/p") and is_uri("gs://b/p") and not is_uri("/tmp/x") and not is_uri("runs/s3:/b")


@pytest.mark.parametrize(
    "uri, needle",
    [
        ("ftp://b/p", "no filesystem for ftp://"),
        ("file:///tmp/x", "plain path"),
        ("s3:///p", "no bucket named"),
    ],
)
def test_a_uri_no_filesystem_handles_is_one_line(uri, needle):
    with pytest.raises(UserError, match=needle):
        parse_remote(uri)


def test_endpoint_and_region_come_from_the_standard_variables(env):
    r = parse_remote("s3://runs/a/b/")
    assert r.path == "runs/a/b" and r.bucket == "runs"
    assert dict(r.options) == {"endpoint_override": env.endpoint, "scheme": "http", "region": "us-east-1"}


def test_endpoint_given_in_the_uri_wins(env, monkeypatch, request):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    m = open_out(f"s3://runs/{_prefix(request)}?endpoint_override={env.endpoint}")
    (m.root / "x.txt").parent.mkdir(parents=True, exist_ok=True)
    (m.root / "x.txt").write_text("1")
    m.push()
    assert env.keys("runs", _prefix(request)) == [f"{_prefix(request)}/x.txt"]


def test_push_pull_delete_between_two_processes_mirrors(env, request):
    """What one process pushes another pulls; deletions travel; temporary names never do."""
    a = open_out(f"s3://runs/{_prefix(request)}")
    a.reset()
    (a.root / "m").mkdir()
    (a.root / "m" / "model.safetensors").write_text("w")
    (a.root / "m" / "config.json").write_text("{}")
    (a.root / "m" / ".config.json.tmp-1").write_text("partial")  # atomic.py's temporary sibling
    (a.root / LOCK_NAME).write_text("lock")
    a.push()
    assert env.keys("runs", _prefix(request)) == [
        f"{_prefix(request)}/m/config.json",
        f"{_prefix(request)}/m/model.safetensors",
    ]

    b = a.here("other")
    assert b.root != a.root and b.remote == a.remote
    b.pull(weights=False)
    assert _files(b.root) == {"m/config.json": "{}"}  # weights left for later
    b.pull(b.root / "m")
    assert _files(b.root) == {"m/config.json": "{}", "m/model.safetensors": "w"}

    (a.root / "m" / "model.safetensors").write_text("w2")
    (a.root / "m" / "config.json").unlink()
    a.push()
    b.pull()
    assert _files(b.root) == {"m/model.safetensors": "w2"}

    b.delete(b.root / "m")
    assert env.keys("runs", _prefix(request) + "/m/") == []
    a.discard()
    b.discard()
    assert not a.root.exists() and not b.root.exists()


def test_what_code_publishes_reaches_the_bucket_and_records_leave_weights_and_checkpoints(env, request):
    """RunDir's own words: write_json/write_text publish at once; fetch_records brings configs and results,
    not weights or checkpoints; held() takes the lease and removes the driver's mirror at the end."""
    uri = f"s3://runs/{_prefix(request)}"
    with open_out(uri).held("writer") as run:
        assert env.keys("runs", f"{_prefix(request)}/.lock") == [f"{_prefix(request)}/.lock"]
        run.write_json(run.root / "dense" / "result.json", {"step": 3})
        run.write_text(run.root / "run.yaml", "model: {}\n")
        (run.root / "dense" / "model").mkdir(parents=True)
        (run.root / "dense" / "model" / "model.safetensors").write_text("w")
        (run.root / "dense" / "checkpoints" / "checkpoint_00000003").mkdir(parents=True)
        (run.root / "dense" / "checkpoints" / "checkpoint_00000003" / "metrics.json").write_text("{}")
        run.publish(run.root / "dense")
        assert not any(k.endswith(".tmp") or "/." in k for k in env.keys("runs", _prefix(request) + "/dense"))
        reader = run.here("reader")
        reader.fetch_records()
        assert _files(reader.root) == {"dense/result.json": '{\n  "step": 3\n}\n', "run.yaml": "model: {}\n"}
        reader.fetch(reader.root / "dense" / "model")
        assert (reader.root / "dense" / "model" / "model.safetensors").read_text() == "w"
        reader.discard()
        mirror = run.root
    assert not mirror.exists() and env.keys("runs", f"{_prefix(request)}/.lock") == []


def test_markers_are_uploaded_after_the_rest_of_their_folder(env, request, monkeypatch):
    m = open_out(f"s3://runs/{_prefix(request)}")
    m.reset()
    for name in ("config.json", "model.safetensors", "vocab.txt", "MANIFEST.json", "a.pt"):
        (m.root / name).write_text(name)
    order = []
    real = storage.copy_up
    monkeypatch.setattr(
        storage, "copy_up", lambda fs, local, key, *uri: (order.append(local.name), real(fs, local, key, *uri))
    )
    m.push()
    assert set(order[-2:]) == {"config.json", "MANIFEST.json"} and len(order) == 5


def test_a_missing_bucket_is_one_line_and_nothing_is_written(env):
    with pytest.raises(UserError, match=r"--out s3://nobucket/x: cannot write there: no such bucket"):
        open_out("s3://nobucket/x")


def test_an_unreachable_endpoint_fails_fast(env, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot connect"):
        open_out("s3://runs/x")
    assert time.monotonic() - t0 < 30


def test_unknown_keys_are_refused_by_a_server_that_checks(monkeypatch, tmp_path):
    with S3Server(auth=True) as server:
        server.make_user()
        server.make_bucket("locked")
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        remote._FS_CACHE.clear()
        open_out("s3://locked/ok")  # the user's own keys: writable
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        remote._FS_CACHE.clear()
        with pytest.raises(UserError, match=r"s3://locked/x: cannot write there: access denied"):
            open_out("s3://locked/x")
        assert server.keys("locked") == []  # the probe of the allowed check was removed again
    remote._FS_CACHE.clear()


# ----- the lease lock ------------------------------------------------------------------------------------


def _holder(uri: str, env: dict) -> subprocess.Popen:
    code = (
        "import sys,time\nfrom allatt_dist.runlock import hold\nfrom allatt_dist.rundir import open_out\n"
        "with hold(open_out(sys.argv[1]), 'holder'):\n    print('held', flush=True); time.sleep(600)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=REPO
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_bucket_prefix_has_one_writer(env, request):
    uri = f"s3://runs/{_prefix(request)}"
    other = _holder(uri, env.env())
    try:
        with pytest.raises(RunDirInUse, match=rf"{uri}: in use by pid {other.pid} on .*\(holder\)"):
            with hold(open_out(uri)):
                pass
        with pytest.raises(RunDirInUse, match=rf"{uri}/inner: inside {uri}, which is in use by pid {other.pid}"):
            with hold(open_out(uri + "/inner")):
                pass
    finally:
        other.kill()
        other.wait()
    with hold(open_out(uri)) as key:  # its holder is dead (on this machine): taken over at once
        lease = json.loads(env.client().get_object(Bucket="runs", Key=key.split("/", 1)[1])["Body"].read())
        assert lease["pid"] == os.getpid()
    assert env.keys("runs", _prefix(request)) == [], "the lease is removed when its holder ends"


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(env, request):
    uri = f"s3://runs/{_prefix(request)}"
    key = f"{_prefix(request)}/{LOCK_NAME}"
    lease = {"pid": 1, "host": "elsewhere", "command": "allatt-dist run", "token": "x"}
    env.client().put_object(Bucket="runs", Key=key, Body=json.dumps(lease | {"beat": time.time()}).encode())
    with pytest.raises(RunDirInUse, match=r"in use by pid 1 on elsewhere \(allatt-dist run\)"):
        with hold(open_out(uri)):
            pass
    env.client().put_object(Bucket="runs", Key=key, Body=json.dumps(lease | {"beat": time.time() - 600}).encode())
    with hold(open_out(uri)):
        pass


def test_the_cli_refuses_a_bad_bucket_before_anything_starts(env, wt2_path):
    cmd = [sys.executable, "-m", "allatt_dist.cli", "train", RECIPE, "--set", f"data.path={wt2_path}"]
    for out, needle in (("s3://nobucket/run", "no such bucket"), ("ftp://h/run", "no filesystem for ftp://")):
        t0 = time.monotonic()
        r = subprocess.run([*cmd, "--out", out], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr and out in r.stderr, r.stderr
        assert time.monotonic() - t0 < 60
    assert not list(REPO.glob("s3:*")) and not list(REPO.glob("ftp:*")), "a URI became a local folder"
    r = subprocess.run(
        [sys.executable, "-m", "allatt_dist.cli", "evaluate", "s3://runs/no/model"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "s3://runs/no/model: no model directory there" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "allatt_dist.cli", "rank", "s3://runs/no/exp"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "experiment s3://runs/no/exp: no experiment there" in r.stderr, r.stderr


# ----- checkpoints in a bucket ---------------------------------------------------------------------------


def _rank_files(staging: Path, rank: int, step: int) -> None:
    (staging / "ds").mkdir(parents=True, exist_ok=True)
    (staging / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank, step % 256]) * 300)
    (staging / f"mems_rank{rank}.safetensors").write_bytes(b"m" * (50 + rank))
    if rank == 0:
        (staging / "metrics.json").write_text(json.dumps({"step": step}))


def _publish(m: RunDir, step: int, keep: int = 2) -> RemoteCheckpoints:
    store = RemoteCheckpoints(m, m.root / "dense" / "checkpoints")
    staging = store.staging(step, "n")
    _rank_files(staging, 0, step)
    store.publish(staging, step, keep, rank=0)
    return store


def test_checkpoints_in_a_bucket_are_published_whole_and_pruned(env, request):
    m = open_out(f"s3://runs/{_prefix(request)}")
    m.reset()
    for step in (10, 20, 30):
        store = _publish(m, step)
    assert store.candidates() == ["checkpoint_00000030", "checkpoint_00000020"]  # keep=2
    assert not (m.root / "dense" / "checkpoints" / "checkpoint_00000030").exists(), "the local copy stays behind"
    assert store.newest_metrics()[0] == {"step": 30}

    other = m.here("worker")  # another process loads it, checked against the manifest
    theirs = RemoteCheckpoints(other, other.root / "dense" / "checkpoints")
    got = theirs.fetch("checkpoint_00000030")
    assert (got / "metrics.json").is_file() and ck.problem(got) is None
    theirs.release(got)
    assert not got.exists()


def test_the_driver_removes_unpublished_and_damaged_checkpoints_in_a_bucket(env, request):
    m = open_out(f"s3://runs/{_prefix(request)}")
    m.reset()
    store = _publish(m, 10)
    store = _publish(m, 20)
    pre = f"{_prefix(request)}/dense/checkpoints"
    s3 = env.client()
    s3.put_object(Bucket="runs", Key=f"{pre}/checkpoint_00000030/ds/partial.pt", Body=b"x")  # upload cut short
    s3.put_object(Bucket="runs", Key=f"{pre}/checkpoint_00000020/metrics.json", Body=b"{}")  # truncated
    # what a kill leaves when it stops rank 0 deleting an old checkpoint (the manifest goes first)
    s3.put_object(Bucket="runs", Key=f"{pre}/checkpoint_00000005/zero_to_torch.py", Body=b"#")
    said = []
    store.resume_point(said.append)
    assert len(said) == 1 and said[0].startswith("checkpoint_00000020 skipped: s3://runs/") and "bytes where" in said[0]
    assert store.candidates() == ["checkpoint_00000010"]
    left = {k[len(pre) + 1 :].split("/")[0] for k in env.keys("runs", pre + "/")}
    assert left == {"checkpoint_00000010"}, left  # 30 never published, 20 damaged, 5 half deleted: all gone


def test_a_worker_refuses_a_checkpoint_whose_content_changed(env, request):
    m = open_out(f"s3://runs/{_prefix(request)}")
    m.reset()
    store = _publish(m, 10)
    key = f"{_prefix(request)}/dense/checkpoints/checkpoint_00000010/mems_rank0.safetensors"
    env.client().put_object(Bucket="runs", Key=key, Body=b"M" * 50)  # same size, other bytes
    store.resume_point(lambda _: None)  # sizes agree: the driver cannot tell
    with pytest.raises(OSError, match="checksum differs"):
        store.fetch("checkpoint_00000010")


def test_the_copies_of_dead_processes_are_swept(env, tmp_path):
    base = tmp_path / "mirrors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = base / f"allatt-worker-{int(dead.stdout)}-abcd"  # a worker SIGKILLed with its copy on disk
    mine = base / f"allatt-trial-{os.getpid()}-efgh"  # a live process's
    other = base / "allatt-ckpt-123"  # not a mirror
    for d in (left, mine, other):
        (d / "x").mkdir(parents=True)
    new = storage.mirror_root("score")
    assert not left.exists() and mine.is_dir() and other.is_dir()
    assert new.parent == base and new.name.startswith(f"allatt-score-{os.getpid()}-")


def test_a_file_rewritten_remotely_at_the_same_size_is_pulled_again(env, request):
    a = open_out(f"s3://runs/{_prefix(request)}")
    a.reset()
    (a.root / "status.json").write_text('{"s": "running"}')
    a.push()
    b = a.here("reader")
    b.pull()
    time.sleep(1.1)  # S3 keeps modification times to the second
    (a.root / "status.json").write_text('{"s": "stopped"}')  # same length, other content
    a.push()
    b.pull()
    assert (b.root / "status.json").read_text() == '{"s": "stopped"}'
    a.pull()  # what a process uploaded itself is not fetched back
    assert (a.root / "status.json").read_text() == '{"s": "stopped"}'
    b.discard()
