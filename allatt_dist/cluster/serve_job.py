"""`allatt-dist submit serve EXP_OR_MODEL [serve options] --address http://HEAD:8265`: `serve` as a
long-running Ray Job.

The job's entrypoint is `python -m allatt_dist.cli serve MODEL [serve options] --address auto`: the driver
joins the cluster the job runs on, deploys the models on Ray Serve (its HTTP proxy on `--host`/`--port` of
the cluster's nodes, 127.0.0.1:8000 by default: reached through the same SSH tunnel or port-forward as the
dashboard, docs/deploy.md) and runs until the job is stopped (`allatt-dist jobs stop ID`). Stopped, it
deletes its applications (and Serve, when no other application is left) before Ray's grace period
(`RAY_JOB_STOP_WAIT_TIME_S`, set here to STOP_WAIT_S) ends. The model is read on the cluster: a bucket URI,
or an absolute path every node mounts. `submit serve` returns once the job's log says that every model
answers, with the routes and the job id.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from allatt_dist.errors import UserError

STOP_WAIT_S = "60"  # seconds a stopped serve job has to delete its applications before Ray kills it
_ADDRESS_HELP = "the head's Jobs API, e.g. http://127.0.0.1:8265 through a tunnel (default: RAY_API_SERVER_ADDRESS)"


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line after `allatt-dist submit serve`: serve's own options plus submit's."""
    from allatt_dist.infer.serve_cli import add_serve_options

    p = argparse.ArgumentParser(
        prog="allatt-dist submit serve",
        description="Run `allatt-dist serve MODEL ...` on a Ray cluster as a Ray Job that keeps serving until "
        "`allatt-dist jobs stop JOB_ID`. MODEL: s3://... or gs://..., or an absolute path every node mounts.",
    )
    actions = add_serve_options(p)
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    p.add_argument("--runtime-env", default=None, metavar="YAML", help="runtime env file (cluster/runtime_env.yaml)")
    p.add_argument("--follow", action="store_true", help="stream the job's log (to stderr) until the job ends")
    p.add_argument("--no-wait", action="store_true", help="return once submitted, before the models answer")
    p.add_argument("--submission-id", default=None, help="a job id of your choice (must be new on the cluster)")
    p.add_argument("--verbose", action="store_true", help="passed on: Ray's and Serve's own logs in the job")
    a = p.parse_args(argv)
    a.command, a.fn, a.serve_actions = "submit", cmd_submit_serve, actions
    return a


def build_serve_job(a: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(entrypoint, runtime_env, metadata) of a serve job; the model and the pick are checked here when the
    model is readable from this machine too."""
    from allatt_dist.cluster.submit import _working_dir, load_runtime_env
    from allatt_dist.infer.args import pick_of
    from allatt_dist.remote import is_uri, parse_remote

    pick = pick_of(a)
    if is_uri(a.model):
        parse_remote(a.model, flag="MODEL")
    elif not Path(a.model).is_absolute():
        raise UserError(
            f"{a.model}: give the model as s3://... (or gs://...) or as an absolute path every node of the "
            "cluster mounts (a relative one would be looked up in the job's copy of the working_dir)"
        )
    elif Path(a.model).exists():  # a shared filesystem mounted here too: check the model and the pick now
        from allatt_dist.infer.serve_cli import targets

        targets(a.model, pick)
    runtime_env = load_runtime_env(a.runtime_env)
    _working_dir(runtime_env, a.runtime_env)
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("RAY_JOB_STOP_WAIT_TIME_S", STOP_WAIT_S)
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    runtime_env["env_vars"] = env_vars
    argv = ["python", "-m", "allatt_dist.cli", "serve", a.model]
    for act in a.serve_actions:
        value = getattr(a, act.dest)
        if act.option_strings and value is not None and value != act.default:
            argv += [act.option_strings[0], str(value)]
    argv += ["--address", "auto"] + (["--verbose"] if a.verbose else [])
    return shlex.join(argv), runtime_env, {"allatt_command": "serve", "allatt_model": a.model}


def wait_serving(client, job_id: str, poll_s: float = 1.0) -> dict[str, str]:
    """The routes the job prints once every model answers; `JobFailed` (one line) if it ends first."""
    from allatt_dist.cluster import jobs_api as api
    from allatt_dist.cluster.submit import _ANSI, JobFailed, outcome

    while True:
        status = api.job_status(client, job_id)
        if status in api.TERMINAL:
            outcome(client, job_id, status)  # FAILED / STOPPED: the job's error line
            raise JobFailed(f"job {job_id} {status} before serving (see `allatt-dist jobs logs {job_id}`)")
        for line in api.job_logs(client, job_id).splitlines():
            line = _ANSI.sub("", line).strip()
            if line.startswith('{"serving"'):
                return json.loads(line)["serving"]
        time.sleep(poll_s)


def cmd_submit_serve(a: argparse.Namespace) -> dict:
    from allatt_dist.cluster import jobs_api as api

    entrypoint, runtime_env, metadata = build_serve_job(a)
    client = api.make_client(a.address)
    job_id = api.submit(client, entrypoint, runtime_env, metadata, a.submission_id)
    address = client.get_address()
    stop = f"allatt-dist jobs stop {job_id} --address {address}"
    print(f"allatt-dist submit: job {job_id} submitted to {address}", file=sys.stderr, flush=True)
    result = {"job_id": job_id, "status": "PENDING", "address": address, "entrypoint": entrypoint, "stop": stop}
    if a.no_wait:
        return result
    try:
        if a.follow:
            api.follow_logs(client, job_id)
            from allatt_dist.cluster.submit import outcome

            return outcome(client, job_id, api.wait(client, job_id))
        routes = wait_serving(client, job_id)
    except KeyboardInterrupt:
        print(f"allatt-dist submit: stopped waiting; job {job_id} keeps running ({stop} ends it)", file=sys.stderr)
        raise
    return result | {"status": "RUNNING", "serving": routes}
