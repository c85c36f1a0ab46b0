"""`allatt-dist submit serve`: `serve` as a long-running Ray Job, sent through the Jobs API of the session's
local Ray (`local_ray`, started with its dashboard), answering real HTTP requests until `allatt-dist jobs
stop` ends it. Bad input to `submit serve` fails before anything is sent (no Ray needed).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
import torch

from allatt_dist.cli import main
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.infer.decode import Sampling, generate
from allatt_dist.infer.text import prompt_ids
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from tests.clirun import REPO, run_cli
from tests.ray_procs import _ours

CFG = ModelConfig(num_layers=2, hidden_dim=16, num_heads=2, num_persistent=2, seq_len=8, mem_len=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(root):
    vocab = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(20)]])
    torch.manual_seed(0)
    model = build_model(CFG, len(vocab), None, None).eval()
    save_model_dir(model, vocab, root / "tiny")
    return root / "tiny", model, vocab


@pytest.mark.parametrize(
    "argv, message",
    [
        (["relative/model"], "relative/model: give the model as s3://"),
        (["ftp://host/m"], "MODEL ftp://host/m: no filesystem for ftp://"),
        (["/m", "--name", "a", "--budget", "3"], "--name picks one row"),
    ],
)
def test_submit_serve_bad_input_is_one_line(capsys, argv, message):
    assert main(["submit", "serve", *argv, "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_submit_serve_model_checked_before_sending(tmp_path, capsys):
    """An absolute path this machine also sees is checked here: a folder that is no model, one line."""
    assert main(["submit", "serve", str(tmp_path), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a model directory" in err, err


def _jobs_api_of_session_ray() -> str:
    """The Jobs API (dashboard) URL of the session's local Ray. Ray Jobs run through the node's dashboard
    agent, whose HTTP port a local `ray.init` cannot choose (52365): where another Ray on this machine
    (a second test session) listens on it too, a job may be handed to that Ray's agent, so the test is
    skipped with that reason rather than submitting into the other Ray."""
    import psutil
    import ray

    info = ray.init(ignore_reinit_error=True).address_info
    port, token = info["dashboard_agent_listen_port"], os.environ.get("RAY_AUTH_TOKEN")
    holders = [c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    if token and not (holders and all(pid and _ours(pid, [token]) for pid in holders)):
        pytest.skip(f"another Ray on this machine holds the dashboard agent port {port} (Ray Jobs need it)")
    return "http://" + info["webui_url"]


@pytest.mark.ray
def test_submit_serve_answers_until_stopped(local_ray, tmp_path):
    import requests

    jobs_api = _jobs_api_of_session_ray()
    model_dir, model, vocab = _model(tmp_path)
    port = _free_port()
    args = ["submit", "serve", str(model_dir), "--port", str(port), "--cpus-per-replica", "0.5"]
    r = run_cli(*args, "--address", jobs_api, cwd=REPO, timeout=400)
    if "No available agent" in r.stderr:  # the session Ray's agent lost the port race to another Ray (see above)
        pytest.skip("the session Ray's dashboard agent is not serving (another Ray on this machine took its port)")
    if r.returncode != 0:
        failed = re.search(r"job (raysubmit_\w+)", r.stderr)
        log = run_cli("jobs", "logs", failed.group(1), "--address", jobs_api).stdout if failed else ""
        pytest.fail(f"{r.stderr.strip().splitlines()[-1]}\n--- job log ---\n{log[-4000:]}")
    out = json.loads(r.stdout)
    job_id = out["job_id"]
    try:
        assert out["status"] == "RUNNING" and out["serving"] == {"tiny": f"http://127.0.0.1:{port}/"}, out
        assert " serve " in out["entrypoint"] and "--address auto" in out["entrypoint"]
        body = {"prompt": "w1 w2 w3", "max_new_tokens": 5, "temperature": 0.0}
        got = requests.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=120)
        want = generate(model, prompt_ids(vocab, "w1 w2 w3"), Sampling(5, temperature=0.0)).ids
        assert got.status_code == 200 and got.json()["text"] == " ".join(vocab.decode(want)), got.text
        status = json.loads(run_cli("jobs", "status", job_id, "--address", jobs_api, timeout=60).stdout)
        assert status["status"] == "RUNNING" and status["metadata"]["allatt_model"] == str(model_dir)
    finally:
        stop = run_cli("jobs", "stop", job_id, "--address", jobs_api, timeout=120)
    assert stop.returncode == 0 and json.loads(stop.stdout)["status"] == "STOPPED", stop.stderr
    deadline = time.monotonic() + 30  # the job deleted its application and Serve (no other was left)
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        except requests.ConnectionError:
            break
        time.sleep(1)
    else:
        pytest.fail(f"port {port} still answers after the job stopped")
