"""A real `tensorboard` for tests, read through its own HTTP data API (what the browser reads)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def tensorboard_on(logdir: Path | str, env: dict | None = None):
    """A real `tensorboard` on a free loopback port, serving `logdir` (a folder, or s3://... read with boto3,
    which takes AWS_ENDPOINT_URL from `env`); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def hparams_over_http(url: str, sessions: int) -> tuple[dict, list[dict], list[str]]:
    """TensorBoard's HParams experiment, session groups and run names, once `sessions` are loaded."""
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    query = {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "startIndex": 0, "sliceSize": 100}
    deadline, groups = time.monotonic() + 90, []
    while time.monotonic() < deadline:
        try:
            groups = http(url + "/data/plugin/hparams/session_groups", query)["sessionGroups"]
            if len(groups) >= sessions:
                break
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    return http(url + "/data/plugin/hparams/experiment", {"experimentName": ""}), groups, http(url + "/data/runs")
