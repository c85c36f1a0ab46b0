"""`allatt-dist submit` and `allatt-dist jobs ...`: the command-line side of allatt_dist.cluster.submit
(what a job runs) and allatt_dist.cluster.jobs_api (the Jobs SDK calls).

`register(sub)` adds both commands to the CLI's sub-parsers; each handler follows the CLI's rules
(a result as JSON on stdout, a `UserError` as one line with a non-zero exit). Logs go to stderr so
that stdout stays the JSON result.
"""

from __future__ import annotations

import argparse
import sys

from allatt_dist.cliargs import add_override_arg
from allatt_dist.errors import UserError

_ADDRESS_HELP = "the head's Jobs API, e.g. http://127.0.0.1:8265 through a tunnel (default: RAY_API_SERVER_ADDRESS)"


def cmd_submit(a: argparse.Namespace) -> dict:
    from allatt_dist.cluster import jobs_api as api
    from allatt_dist.cluster import submit as js

    extra = list(a.extra)
    if a.phase is not None:
        if a.remote_command != "train":
            raise UserError(f"--phase is an option of train, not of --command {a.remote_command}")
        extra += ["--phase", a.phase]
    if a.force:
        extra.append("--force")
    if a.verbose:
        extra.append("--verbose")
    if a.remote_command in ("train", "run"):
        extra.append("--no-progress")  # a job log is no terminal: plain progress lines are enough
    entrypoint, runtime_env, metadata = js.build_job(
        a.config, a.runtime_env, a.remote_command, a.overrides, a.out, extra
    )
    client = api.make_client(a.address)
    job_id = api.submit(client, entrypoint, runtime_env, metadata, a.submission_id)
    address = client.get_address()
    print(f"allatt-dist submit: job {job_id} submitted to {address}", file=sys.stderr, flush=True)
    if a.no_wait:
        return {"job_id": job_id, "status": "PENDING", "address": address, "entrypoint": entrypoint}
    try:
        if a.follow:
            api.follow_logs(client, job_id)
        status = api.wait(client, job_id)
    except KeyboardInterrupt:
        print(
            f"allatt-dist submit: stopped waiting; job {job_id} keeps running "
            f"(allatt-dist jobs stop {job_id} --address {address} ends it)",
            file=sys.stderr,
        )
        raise
    return js.outcome(client, job_id, status)


def cmd_jobs(a: argparse.Namespace):
    from allatt_dist.cluster import jobs_api as api
    from allatt_dist.cluster import submit as js

    client = api.make_client(a.address)
    if a.action == "list":
        return [js.describe(j) for j in api.list_jobs(client)]
    if a.action == "status":
        return js.describe(api.job_info(client, a.job_id))
    if a.action == "logs":
        api.job_info(client, a.job_id)  # an unknown id fails here, with one line
        if a.follow:
            api.follow_logs(client, a.job_id, sys.stdout)
        else:
            sys.stdout.write(api.job_logs(client, a.job_id))
            sys.stdout.flush()
        return None
    # stop
    info = api.job_info(client, a.job_id)
    status = str(info.status.value)
    if status in api.TERMINAL:
        return {"job_id": a.job_id, "status": status, "stopped": False}
    api.stop_job(client, a.job_id)
    if a.no_wait:
        return {"job_id": a.job_id, "status": "STOPPING", "stopped": True}
    return {"job_id": a.job_id, "status": api.wait(client, a.job_id), "stopped": True}


def register(sub) -> None:
    """Add `submit` and `jobs` to the CLI's sub-parsers."""
    from allatt_dist.cluster.submit import COMMANDS

    p = sub.add_parser(
        "submit",
        help="run train/run/tune (or serve: `submit serve MODEL ...`) on a remote Ray cluster as a Ray Job",
        usage="%(prog)s CONFIG [options] [-- ARGS passed on to the remote command]\n"
        "       %(prog)s serve EXP_OR_MODEL [serve options] [options]  (see `submit serve --help`)",
        description="Submit `allatt-dist COMMAND CONFIG ...` as a Ray Job. Arguments after `--` are passed "
        "on to the remote command unchanged. `submit serve EXP_OR_MODEL` runs `serve` as a job that keeps "
        "serving until `allatt-dist jobs stop JOB_ID`.",
    )
    p.add_argument("config", help="recipe YAML, inside the uploaded working_dir (e.g. tune_configs/quickstart.yaml)")
    p.add_argument("--address", default=None, help=_ADDRESS_HELP)
    p.add_argument(
        "--runtime-env",
        default=None,
        metavar="YAML",
        help="runtime env file (e.g. cluster/runtime_env.yaml); working_dir defaults to the current directory",
    )
    p.add_argument("--command", dest="remote_command", choices=COMMANDS, default="train", help="what to run")
    add_override_arg(p, "override a config key (repeatable), passed on to the job")
    p.add_argument(
        "--out",
        default=None,
        help="run directory: s3://BUCKET/PREFIX (or gs://), or an absolute path every node mounts",
    )
    p.add_argument("--phase", choices=["all", "dense", "prune", "finetune"], default=None, help="train only")
    p.add_argument("--force", action="store_true", help="passed on: reuse a run directory of another config")
    p.add_argument("--follow", action="store_true", help="stream the job's log (to stderr) until it ends")
    p.add_argument("--no-wait", action="store_true", help="return once submitted, without waiting for the end")
    p.add_argument("--submission-id", default=None, help="a job id of your choice (must be new on the cluster)")
    p.add_argument("--verbose", action="store_true", help="passed on: Ray's and DeepSpeed's own logs in the job")
    p.set_defaults(fn=cmd_submit, extra=[])  # `-- ARGS`: filled by cli.parse_args

    p = sub.add_parser("jobs", help="status, logs, stop or list of Ray Jobs on a cluster")
    acts = p.add_subparsers(dest="action", required=True)
    for name, helptext in (
        ("status", "status of one job (JSON)"),
        ("logs", "the log of one job"),
        ("stop", "stop one job and wait until it has stopped"),
    ):
        q = acts.add_parser(name, help=helptext)
        q.add_argument("job_id", help="the id printed by submit (raysubmit_...)")
        q.add_argument("--address", default=None, help=_ADDRESS_HELP)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
        if name == "stop":
            q.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
        q.set_defaults(fn=cmd_jobs)
    q = acts.add_parser("list", help="every job the cluster knows (JSON)")
    q.add_argument("--address", default=None, help=_ADDRESS_HELP)
    q.set_defaults(fn=cmd_jobs)
