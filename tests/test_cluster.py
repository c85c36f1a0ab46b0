"""Cluster configs, `allatt-dist submit` and `allatt-dist jobs`.

Three kinds of tests:
  * every YAML under cluster/ against what its consumer accepts (Ray's cluster-launcher schema,
    the fields KubeRay needs for a RayJob, Ray's RuntimeEnv), plus the security rules (token auth
    on, dashboard on loopback, no secrets);
  * bad input to submit: one line and a non-zero exit, before anything is sent;
  * (marked `cluster`) a real two-node Ray cluster on 127.0.0.1 with token authentication, started
    by `ray start --block` under its own temp dir and ports, and stopped by killing exactly the
    processes it started, whatever the tests do. Its nodes know an S3-protocol server (moto, on
    loopback) the standard way (AWS_* variables), and each node keeps its local copies of runs in a
    folder of its own (ALLATT_MIRROR_DIR): a run with `--out s3://...` shares nothing but the bucket.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from clirun import run_cli
from ray_procs import kill_ours
from tb_http import hparams_over_http, tensorboard_on

from allatt_dist.cli import main, parse_args
from allatt_dist.cluster import jobs_api
from allatt_dist.cluster import submit as js

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
RECIPE = "tune_configs/quickstart.yaml"
RUNTIME_ENV = "cluster/runtime_env.yaml"
ALL_YAMLS = sorted(p.name for p in CLUSTER_DIR.glob("*.y*ml"))
LAUNCHERS = ["onprem.yaml", "aws-gpu.yaml"]
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"aws_secret_access_key|aws_access_key_id", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b[0-9a-f]{64}\b"),  # a Ray token (`ray get-auth-token --generate` makes 64 hex digits)
    re.compile(r"RAY_AUTH_TOKEN=\S"),  # a token written inline
]


def _load(name: str):
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


# --------------------------------------------------------------------------------------------------
# The YAMLs under cluster/


def test_every_cluster_yaml_is_checked_here():
    known = set(LAUNCHERS) | {"kuberay-rayjob.yaml", "runtime_env.yaml"}
    assert set(ALL_YAMLS) == known, f"add a test for {sorted(set(ALL_YAMLS) ^ known)}"


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_no_credentials_in_cluster_yaml(name):
    text = (CLUSTER_DIR / name).read_text()
    for pat in SECRET_PATTERNS:
        assert not pat.search(text), f"{name}: looks like a credential ({pat.pattern})"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_ray_schema(name):
    """The checks `ray up` runs before it touches a machine: defaults merged, then the JSON schema
    of ray/autoscaler/ray-schema.json and the node-type rules of validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["cluster_name"] == raw["cluster_name"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_is_locked_down(name):
    raw = _load(name)
    head = " ; ".join(raw["head_start_ray_commands"])
    workers = " ; ".join(raw["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the Jobs API must only listen on the head's loopback"
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    # the token travels as a file (file_mounts), never as text in the config
    assert any(dst.endswith(".ray/auth_token") for dst in raw.get("file_mounts", {}))
    setup = " ; ".join(raw.get("setup_commands", []))
    assert "-c ~/allatt-dist/cluster/constraints.txt" in setup and '"ray[default,train,tune]"' in setup


def test_constraints_pin_every_dependency_and_this_ray():
    import tomllib

    import ray

    pins = {}
    for line in (CLUSTER_DIR / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    assert names <= set(pins), f"not pinned: {sorted(names - set(pins))}"
    assert pins["ray"] == ray.__version__


def test_aws_config_scales_gpu_workers_and_uses_s3_and_a_profile():
    raw = _load("aws-gpu.yaml")
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(copy.deepcopy(raw))
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert any(t["max_workers"] > t.get("min_workers", 0) for t in workers), "workers must autoscale"
    for t in cfg["available_node_types"].values():
        assert "Arn" in t["node_config"]["IamInstanceProfile"], "nodes reach S3 through an instance profile"
    assert "s3://" in yaml.safe_dump(raw)


def test_onprem_config_lists_head_and_workers():
    raw = _load("onprem.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]


def test_kuberay_rayjob_has_what_kuberay_requires():
    job = _load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert "allatt_dist.cli run" in spec["entrypoint"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)
    assert "://" in env["working_dir"], "a RayJob can only fetch its code from a URI"
    assert spec.get("shutdownAfterJobFinishes") is True
    rc = spec["rayClusterSpec"]
    import ray

    assert rc["rayVersion"] == ray.__version__
    assert rc["authOptions"]["mode"] == "token"
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    assert len(groups) >= 2
    mounts = []
    for g in groups:
        params = g["rayStartParams"]
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), "strings only"
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        assert all(ray.__version__ in c["image"] for c in containers), "image must carry the cluster's Ray"
        for c in containers:
            for e in c.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY", e["name"]):
                    assert "value" not in e, f"{e['name']}: secrets come from a Secret (valueFrom)"
        mounts.append({m["mountPath"] for c in containers for m in c.get("volumeMounts", [])})
    for w in rc["workerGroupSpecs"]:
        assert w["groupName"]
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
        limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    shared = set.intersection(*mounts)
    out = re.search(r"--out\s+(\S+)", spec["entrypoint"]).group(1)
    assert any(out.startswith(m.rstrip("/") + "/") for m in shared), "--out must be on a volume every pod mounts"


def test_runtime_env_yaml_is_a_valid_runtime_env():
    env = js.load_runtime_env(CLUSTER_DIR / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {"runs/", ".git/", "*.whl"} <= set(env["excludes"])
    assert "DS_ACCELERATOR" in env["env_vars"]
    pkgs = env["pip"]["packages"]
    assert not [p for p in pkgs if re.match(r"ray\b", p)], "never reinstall Ray inside a job"


# --------------------------------------------------------------------------------------------------
# Building a job, and bad input


def test_build_job_refers_to_the_config_inside_the_working_dir(monkeypatch):
    monkeypatch.chdir(REPO)
    entry, env, meta = js.build_job(RECIPE, RUNTIME_ENV, "train", ["model.num_heads=2"], "/srv/runs/q", ["--x"])
    assert entry == (f"python -m allatt_dist.cli train {RECIPE} --set model.num_heads=2 --out /srv/runs/q --x")
    assert env["working_dir"] == str(REPO) and "runs/" in env["excludes"]
    assert meta["allatt_config"] == RECIPE
    # with no runtime env at all: the current directory, default excludes
    _, env, _ = js.build_job(str(REPO / RECIPE), None, "run")
    assert env["working_dir"] == str(REPO) and ".git/" in env["excludes"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope.yaml"], "config file not found"),
        ([RECIPE, "--out", "runs/x"], "absolute path"),
        ([RECIPE, "--out", "ftp://bucket/x"], "no filesystem for ftp://"),
        ([RECIPE, "--command", "tune", "--phase", "dense"], "--phase is an option of train"),
        ([RECIPE, "--runtime-env", "missing.yaml"], "runtime-env file not found"),
        ([RECIPE, "--set", "model.num_heads=3"], "--set: model: model.hidden_dim (128) must be divisible"),
        (
            [RECIPE, "--command", "run", "--set", "tune.space={}"],
            "quickstart.yaml with --set: tune.space: tune.space is empty",
        ),
    ],
)
def test_submit_bad_input_is_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.chdir(REPO)
    rc = main(["submit", *argv, "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and message in err and len(err.splitlines()) == 1, err


def test_arguments_after_double_dash_pass_through_after_any_option():
    a = parse_args(["submit", RECIPE, "--command", "run", "--out", "/runs/q", "--", "--budget", "2000000"])
    assert (a.remote_command, a.out, a.extra) == ("run", "/runs/q", ["--budget", "2000000"])
    assert parse_args(["submit", RECIPE, "--", "--phase", "dense"]).extra == ["--phase", "dense"]
    assert parse_args(["submit", RECIPE]).extra == []
    entry, _, _ = js.build_job(str(REPO / RECIPE), None, "run", None, "/runs/q", a.extra)
    assert entry.endswith(f"run {RECIPE} --out /runs/q --budget 2000000")


def test_double_dash_is_refused_where_nothing_is_passed_on(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["train", RECIPE, "--", "--phase", "dense"])
    assert e.value.code == 2 and "only submit" in capsys.readouterr().err


def test_submit_malformed_runtime_env_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "env.yaml"
    bad.write_text("working_dir: .\npip: [torch\nenv_vars: {A: 1}\n")
    assert main(["submit", RECIPE, "--runtime-env", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed runtime-env YAML (line" in err and len(err.splitlines()) == 1, err
    for text, message in [
        ("working_dir: .\nenv_var: {A: b}\n", "unknown runtime env field 'env_var'"),
        ("working_dir: .\npip: 5\n", "invalid runtime env: runtime_env['pip'] must be"),
        ("- working_dir\n", "a runtime env must be a mapping"),
    ]:
        bad.write_text(text)
        assert main(["submit", RECIPE, "--runtime-env", str(bad), "--address", "http://127.0.0.1:9"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_config_outside_the_working_dir_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {num_layers: 2}\n")
    assert main(["submit", str(cfg), "--address", "http://127.0.0.1:9"]) == 2
    assert "not inside the uploaded working_dir" in capsys.readouterr().err


def test_config_left_out_by_excludes_or_gitignore_is_refused(tmp_path):
    wd = tmp_path / "wd"
    for sub in ("runs", "private", "ok"):
        (wd / sub).mkdir(parents=True)
        (wd / sub / "c.yaml").write_text("model: {num_layers: 2}\n")
    (wd / ".gitignore").write_text("private/\n")
    env = tmp_path / "env.yaml"
    env.write_text(f"working_dir: {wd}\n")
    with pytest.raises(js.UserError, match="by its excludes"):
        js.build_job(str(wd / "runs/c.yaml"), str(env), "train")
    with pytest.raises(js.UserError, match="by its .gitignore"):
        js.build_job(str(wd / "private/c.yaml"), str(env), "train")
    entry, _, _ = js.build_job(str(wd / "ok/c.yaml"), str(env), "train")
    assert entry == "python -m allatt_dist.cli train ok/c.yaml"


def test_excluded_reads_gitignore_patterns_like_ray(tmp_path):
    """Ray's upload matches excludes and the root .gitignore/.rayignore as gitignore patterns: the same
    rules here (a parent folder's match, anchoring, negation), through the public `pathspec` package."""
    (tmp_path / ".rayignore").write_text("*.secret.yaml\n!keep.secret.yaml\n")
    rules = ["/top/", "runs/"]
    assert js._excluded("a/b/runs/c.yaml", tmp_path, rules) == "excludes"  # a folder at any depth
    assert js._excluded("top/c.yaml", tmp_path, rules) == "excludes"
    assert js._excluded("a/top/c.yaml", tmp_path, rules) is None  # anchored at the root only
    assert js._excluded("conf/x.secret.yaml", tmp_path, rules) == ".rayignore"
    assert js._excluded("conf/keep.secret.yaml", tmp_path, rules) is None  # re-included by `!`
    assert js._excluded("conf/x.yaml", tmp_path, rules) is None


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_address_fails_fast():
    """A real process, a closed port: one line, exit 2, in far less than an HTTP timeout."""
    t0 = time.monotonic()
    r = run_cli("submit", RECIPE, "--address", f"127.0.0.1:{_dead_port()}", cwd=REPO, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("allatt-dist submit: error: cannot reach the Ray Jobs API at http://127.0.0.1:")
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30
    r = run_cli("jobs", "status", "raysubmit_x", "--address", "ray://h:10001", timeout=60)
    assert r.returncode == 2 and "expected the Jobs API URL" in r.stderr


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word (a wrong service, a stuck proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "command, needle",
    [
        (["submit", RECIPE, "--address", "http://127.0.0.1:{port}"], "accepts connections but gives no HTTP answer"),
        (["train", RECIPE, "--address", "127.0.0.1:{port}"], "does not answer as Ray's GCS (gRPC)"),
    ],
)
def test_a_port_that_never_answers_fails_fast(silent_port, tmp_path, command, needle):
    """ray.init and the Jobs SDK would wait on it for minutes; both fail in seconds with one line."""
    t0 = time.monotonic()
    args = [a.format(port=silent_port) for a in command] + (
        ["--out", str(tmp_path / "run")] if command[0] == "train" else []
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = run_cli(*args, env=env, cwd=REPO, timeout=90)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert time.monotonic() - t0 < 45
    assert not (tmp_path / "run").exists()


def test_error_line_prefers_the_cli_error():
    logs = "\x1b[36mINFO\x1b[0m start\nTraceback ...\nValueError: x\nallatt-dist train: error: --set: bad\nbye\n"
    assert js.error_line(logs, "Job failed") == "allatt-dist train: error: --set: bad"
    assert js.error_line("a\nRuntimeError: boom\nb\n", None) == "RuntimeError: boom"
    assert js.error_line("", "Job entrypoint command failed with exit code 1\nmore") == (
        "Job entrypoint command failed with exit code 1"
    )


def test_token_is_looked_up_like_ray_does(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs_api.read_token() == (None, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("from-home\n")
    assert jobs_api.read_token()[0] == "from-home"
    f = tmp_path / "tok"
    f.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    assert jobs_api.read_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs_api.read_token() == ("from-env", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(js.UserError, match="cannot read the token file"):
        jobs_api.read_token()


# --------------------------------------------------------------------------------------------------
# A real two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    address: str  # the Jobs API
    gcs: str
    env: dict  # a client environment that holds the token (by file)
    token: str
    logs: Path


def _get(url: str, token: str | None, timeout: float = 2.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _wait_for(what: str, check, procs: list[subprocess.Popen], logs: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                tail = "\n".join(f.read_text()[-2000:] for f in logs.glob("*.log"))
                pytest.fail(f"`ray start` exited ({p.returncode}) while waiting for {what}:\n{tail}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    base = tmp_path_factory.mktemp("cluster")
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes: a short dir in /tmp.
    raytmp = Path(tempfile.mkdtemp(prefix="aac-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = base / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    drop = ("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # conftest's: 1 node
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    env.update(s3.env())
    mirrors = {node: base / "mirrors" / node for node in ("head", "node2")}  # no folder the nodes share
    gcs_port, dash_port = _free_port(), _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    head_cmd = [
        "ray", "start", "--head", *common,
        f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={raytmp}/head",
    ]  # fmt: skip
    worker_cmd = [
        "ray", "start", *common, f"--address=127.0.0.1:{gcs_port}", '--resources={"node2": 1}',
        f"--dashboard-agent-listen-port={_free_port()}", f"--temp-dir={raytmp}/node2",
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    address = f"http://127.0.0.1:{dash_port}"
    try:
        with open(base / "head.log", "w") as log:
            head_env = {**env, "ALLATT_MIRROR_DIR": str(mirrors["head"])}
            procs.append(
                subprocess.Popen(head_cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        _wait_for("the head's Jobs API", lambda: _get(f"{address}/api/version", token), procs, base)
        with open(base / "node2.log", "w") as log:
            node2_env = {**env, "ALLATT_MIRROR_DIR": str(mirrors["node2"])}
            procs.append(
                subprocess.Popen(
                    worker_cmd, env=node2_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

        def two_nodes() -> bool:
            nodes = _get(f"{address}/nodes?view=summary", token)["data"]["summary"]
            return sum(n.get("raylet", {}).get("state") == "ALIVE" for n in nodes) == 2

        _wait_for("the second node", two_nodes, procs, base)
        yield LocalCluster(address, f"127.0.0.1:{gcs_port}", env, token, base)
    finally:
        kill_ours(procs, [str(raytmp), str(token_file)])
        shutil.rmtree(raytmp, ignore_errors=True)


def _cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, cwd=REPO, timeout=timeout)


TINY = [
    "model.num_layers=2", "model.hidden_dim=32", "model.num_heads=4", "model.num_persistent=16",
    "model.seq_len=16", "model.mem_len=16", "model.adaptive_cutoffs=[]",
    "train.batch_size=4", "train.max_steps=20", "train.warmup_steps=2", "train.eval_every=10",
    "train.checkpoint_every=10", "train.log_every=5",
    "data.eval_batch_size=32", "data.eval_max_segments=2",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.99", "scaling.placement_strategy=SPREAD",
    "scaling.use_gpu=false", "deepspeed.zero_stage=2", "deepspeed.precision=fp32",
]  # fmt: skip


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.cluster
def test_a_search_in_a_bucket_on_two_nodes_that_share_no_directory(cluster, s3, wt2_slice):
    """`submit --command run --out s3://...`: dense on both nodes, two trials, ranking as Ray tasks on both
    nodes; every process works on a local copy of its own, and `rank` finds every finished trial's model.
    Also the job's side: the documented pass-through after `--`, `jobs status` and `jobs logs`."""
    space = '{"gates.sparsity_target": {"grid": [0.25, 0.75]}}'
    sets = [*TINY, f"data.path={wt2_slice}", "prune.max_steps=10", f"tune.space={space}"]
    args = [
        "submit", RECIPE, "--address", cluster.address, "--runtime-env", RUNTIME_ENV,
        "--command", "run", "--out", "s3://runs/two", "--follow", *_sets(sets), "--", "--budget", "10000000",
    ]  # fmt: skip
    r = _cli(args, cluster.env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    assert res["status"] == "SUCCEEDED" and res["job_id"] in r.stderr
    assert res["entrypoint"].startswith(f"python -m allatt_dist.cli run {RECIPE} ")
    r = _cli(["jobs", "status", res["job_id"], "--address", cluster.address], cluster.env, 60)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "SUCCEEDED"
    r = _cli(["jobs", "logs", res["job_id"], "--address", cluster.address], cluster.env, 60)
    assert r.returncode == 0 and "trials done" in r.stdout, r.stdout[-2000:]
    bucket = s3.client()

    def read(key: str) -> dict:
        return json.loads(bucket.get_object(Bucket="runs", Key=f"two/{key}")["Body"].read())

    keys = set(s3.keys("runs", "two/"))
    assert len(set(read("dense/result.json")["node_ids"])) == 2, "the dense workers did not use both nodes"
    assert read("leaderboard.json")["budget"]["params"] == 10_000_000, "`-- --budget` did not reach the job"
    board = read("leaderboard.json")["models"]
    trials = [m for m in board if m["status"] != "reference"]
    assert len(trials) == 2 and all(m["status"] == "finished" and m["test_ppl"] for m in trials), board
    for m in trials:  # every trial's model, written by whichever node its rank 0 ran on, was found and kept
        assert m["model_dir"] and f"two/{m['model_dir']}/model.safetensors" in keys, (m, sorted(keys)[:20])
        trial = m["name"].rsplit("/", 1)[1]
        assert f"two/trials/{trial}/prune/model/config.json" in keys
    assert any(k.startswith("two/tb/prune/") and ".tfevents." in k for k in keys), "no TensorBoard events synced"
    assert "two/.lock" not in keys, "the run's lease was left behind"
    with tensorboard_on("s3://runs/two/tb", s3.env()) as url:  # TensorBoard reads the bucket itself (boto3)
        _, groups, runs = hparams_over_http(url, sessions=3)
    assert sorted(runs) == sorted(m["name"] for m in board), runs
    for g in groups:  # one entry per run: the driver's rewritten entries replaced the old ones in the bucket
        row = next(m for m in board if m["name"] == g["name"])
        metric = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
        assert metric["result/test_ppl"] == pytest.approx(row["test_ppl"], rel=1e-6), g["name"]
    assert sorted(g["name"] for g in groups) == sorted(runs)
    for node in ("head", "node2"):  # each node made its own copies, and removed them all again
        folder = cluster.logs / "mirrors" / node
        assert folder.is_dir(), f"no process on {node} kept a local copy: was the bucket used there?"
        assert not list(folder.iterdir()), f"{node} kept {sorted(p.name for p in folder.iterdir())}"


@pytest.mark.cluster
def test_submit_without_or_with_a_wrong_token_is_rejected(cluster, tmp_path):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    r = _cli(["submit", RECIPE, "--address", cluster.address, "--no-wait"], env, 60)
    assert r.returncode == 2
    assert "requires a token and none was found" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    env["RAY_AUTH_TOKEN"] = "0" * 8
    r = _cli(["jobs", "list", "--address", cluster.address], env, 60)
    assert r.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in r.stderr, r.stderr
    with pytest.raises(urllib.error.HTTPError) as e:  # the Jobs API itself, with no header at all
        _get(f"{cluster.address}/api/jobs/", None)
    assert e.value.code == 401


@pytest.mark.cluster
def test_bad_config_job_fails_with_its_error_line(cluster, wt2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    args = [
        "submit", RECIPE, "--address", cluster.address, "--runtime-env", RUNTIME_ENV,
        "--command", "train", "--phase", "dense", "--out", str(out),
        *_sets([*TINY, f"data.path={wt2_path / 'not-on-the-cluster'}"]),
    ]  # fmt: skip  # a valid recipe (checked locally) whose data folder only the job looks for
    r = _cli(args, cluster.env, 180)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert re.match(r"allatt-dist submit: error: job raysubmit_\w+ FAILED: allatt-dist train: error: ", err), err
    assert "not-on-the-cluster: data folder not found" in err
    assert not out.exists()


@pytest.mark.cluster
def test_plain_ray_job_submit_with_the_runtime_env(cluster):
    """What docs/cluster.md shows for users without this CLI: `ray job submit` with the token by file."""
    env = dict(cluster.env, RAY_API_SERVER_ADDRESS=cluster.address)
    r = subprocess.run(
        ["ray", "job", "submit", "--runtime-env", RUNTIME_ENV, "--",
         "python", "-m", "allatt_dist.cli", "train", RECIPE, "--help"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "usage: allatt-dist train" in r.stdout and "succeeded" in r.stdout


@pytest.mark.cluster
def test_jobs_stop(cluster):
    env = cluster.env
    code = "import time; print('sleeping', flush=True); time.sleep(300)"
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    job_id = client.submit_job(entrypoint=f'{sys.executable} -c "{code}"')
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    r = _cli(["jobs", "stop", job_id, "--address", cluster.address], env, 90)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"job_id": job_id, "status": "STOPPED", "stopped": True}
    r = _cli(["jobs", "status", "raysubmit_doesnotexist", "--address", cluster.address], env, 60)
    assert r.returncode == 2 and "raysubmit_doesnotexist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
