"""`allatt-dist serve EXP_OR_MODEL`: models on Ray Serve, HTTP JSON (routes: infer/serve.py).

What is served: a model directory, or from a ranked experiment the row `--name` / `--budget` /
`--latency-budget` picks (each at `/`), or with no pick the whole Pareto front, one application per
model under `/<name>/`. Local or in a bucket; each replica reads the model itself. Ray: the embedded
local instance by default (loopback only, cluster/session.py), or a cluster (`--address`). Everything
the command can check is checked before Ray starts: the model, the pick, the port.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass

from allatt_dist.cliargs import positive_int
from allatt_dist.errors import EnvironmentFailure, UserError
from allatt_dist.infer.args import Limits, add_pick_args, pick_of


@dataclass(frozen=True)
class Target:
    name: str
    route: str  # the application's route prefix
    source: str  # what the replica loads (as the user named it)
    pick: object  # source.Pick


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP JSON on Ray Serve (generate, score, health)")
    add_serve_options(p)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or the embedded local Ray)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own logs")
    p.set_defaults(fn=cmd_serve)


def add_serve_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """What is served and how (all but --address and --verbose); returns the options' actions, which
    `submit serve` passes on to the job (cluster/submit.py)."""
    p.add_argument("model", help="model directory or ranked experiment (local or s3://); no pick: the Pareto front")
    acts = add_pick_args(p)
    add = p.add_argument
    acts += [
        add("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1: this machine only)"),
        add("--port", type=positive_int, default=8000),
        add("--replicas", type=positive_int, default=1, help="replicas per model"),
        add("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (the model runs on cuda)"),
        add(
            "--cpus-per-replica",
            type=float,
            default=None,
            help="CPUs per replica (default 1; on the local Ray at most an even share of its CPUs, so every "
            "replica fits)",
        ),
        add("--max-batch-size", type=positive_int, default=8, help="requests computed together"),
        add("--batch-wait-ms", type=float, default=10.0, help="longest wait to fill a batch"),
        add("--max-new-tokens", type=positive_int, default=256, help="limit per /generate request"),
        add("--max-tokens", type=positive_int, default=2048, help="limit on a prompt or scored text"),
    ]
    return acts


def targets(text: str, pick) -> list[Target]:
    """What to serve, checked (and the leaderboard read) before anything starts."""
    from allatt_dist.infer.source import Pick, choose, leaderboard_of
    from allatt_dist.modelio import read_meta

    rows, where = leaderboard_of(text, pick)
    if rows is None:  # a model directory
        if not where.startswith(("s3://", "gs://")):
            read_meta(where)  # one line when it is not a model directory
        return [Target(text.rstrip("/").rsplit("/", 1)[-1], "/", text, Pick())]
    if pick != Pick():
        row = choose(rows, pick, text)
        return [Target(row["name"], "/", text, Pick(name=row["name"]))]
    choose(rows, Pick(), text)  # one line when the leaderboard keeps nothing
    front = [r for r in rows if r.get("pareto") and r.get("model_dir")]
    return [Target(r["name"], "/" + r["name"], text, Pick(name=r["name"])) for r in front]


def check_port(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"--port {port}: cannot listen on {host} ({e.strerror}); give another port") from None


def cmd_serve(a: argparse.Namespace) -> dict | None:
    todo = targets(a.model, pick_of(a))
    if not a.address:
        check_port(a.host, a.port)
    limits = Limits(a.max_new_tokens, a.max_tokens, a.max_batch_size, a.batch_wait_ms / 1000.0)
    start(todo, a, limits)
    routes = {t.name: f"http://{a.host}:{a.port}{t.route.rstrip('/')}/" for t in todo}
    print(json.dumps({"serving": routes}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_serving(todo, on_cluster=bool(a.address))
        print("allatt-dist serve: stopped", file=sys.stderr)
    return None


def stop_serving(todo: list[Target], on_cluster: bool) -> None:
    """Ctrl-C, or SIGTERM (`allatt-dist jobs stop` of a submitted serve): this command's applications go.
    On a cluster the applications others deploy stay, and Serve with them; it goes with the last one."""
    from ray import serve

    if on_cluster:
        for t in todo:
            serve.delete(_app_name(t.name))
        if serve.status().applications:
            return
    serve.shutdown()


def start(todo: list[Target], a: argparse.Namespace, limits) -> None:
    """Ray (local or --address), Serve's HTTP proxy on host:port, one application per target."""
    from allatt_dist.cluster.session import connect

    connect(a.address, a.verbose)
    from ray import serve

    from allatt_dist.infer.serve import LanguageModelServer

    cpus = replica_cpus(len(todo) * a.replicas, a)
    serve.start(http_options={"host": a.host, "port": a.port}, logging_config={"log_level": "WARNING"})
    device = "cuda" if a.gpus_per_replica > 0 else "cpu"
    apps = []
    for t in todo:
        app = LanguageModelServer.options(
            name=_app_name(t.name),
            num_replicas=a.replicas,
            ray_actor_options={"num_cpus": cpus, "num_gpus": a.gpus_per_replica},
            max_ongoing_requests=4 * limits.max_batch_size,
            graceful_shutdown_wait_loop_s=0.5,  # Ctrl-C: requests in flight finish, then the replica goes
            graceful_shutdown_timeout_s=10,
        ).bind(t.source, t.pick, limits, device)
        apps.append(serve.RunTarget(app, name=_app_name(t.name), route_prefix=t.route))
    try:
        serve.run_many(apps)  # the applications deploy side by side; returns once every one is running
    except Exception as e:  # a replica that cannot load its model (e.g. no access to the bucket from its node)
        serve.shutdown()
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise EnvironmentFailure(f"a model did not start on Ray Serve ({first})") from None


def replica_cpus(replicas: int, a: argparse.Namespace) -> float:
    """CPUs per replica. On the local Ray every replica must fit (Serve would otherwise wait for ever for
    the last one): by default an even share of its CPUs (at most 1), and a given value is checked, as
    are GPUs. A cluster (--address) may grow (autoscaling): its requests are left to Ray."""
    import ray

    if a.address:
        return 1.0 if a.cpus_per_replica is None else a.cpus_per_replica
    total = ray.cluster_resources()
    cpus = min(1.0, total.get("CPU", 1.0) / replicas) if a.cpus_per_replica is None else a.cpus_per_replica
    for what, each, flag in (("CPU", cpus, "--cpus-per-replica"), ("GPU", a.gpus_per_replica, "--gpus-per-replica")):
        if replicas * each > total.get(what, 0.0) + 1e-9:
            raise UserError(
                f"{flag} {each:g}: {replicas} replica(s) need {replicas * each:g} {what}s and this machine's Ray "
                f"has {total.get(what, 0.0):g}; give a smaller {flag}, fewer --replicas or one model (--name)"
            )
    return cpus


def _app_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)
