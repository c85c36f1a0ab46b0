"""Connecting to Ray: an in-process local instance by default, or an existing cluster.

The local instance is closed by default: every port of it (GCS, raylet, object manager, workers,
dashboard and its agents) listens on the loopback interface only, and it requires a token that only
this process and the processes Ray starts for it know (nothing is written to ~/.ray). Whether a
run's workers fit the cluster is `capacity.py`'s question.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from pathlib import Path

from allatt_dist.errors import UserError

# Ray picks the node address of a new local instance from this switch, read when `ray` is imported:
# "0" (Ray's own default on macOS and Windows) makes it 127.0.0.1, and Ray's servers then bind
# loopback only. `connect` sets it, and since whatever imported `ray` first may have done so before it was
# set, it also makes the imported Ray read it again (`_apply_local_only`): a local instance is closed whatever
# the command imported first. A user may set it to "1" to open the local instance.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _close_local_instance() -> None:
    """Before a local `ray.init`: loopback only, and a token of this process's own unless the user
    chose one (Ray would otherwise generate ~/.ray/auth_token, which changes later `ray` commands)."""
    os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    if not any(os.environ.get(k) for k in AUTH_ENV) and not (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _apply_local_only() -> None:
    """Make the imported Ray follow LOCAL_ONLY_ENV as it is now. Ray reads it once, into
    `ray_constants.ENABLE_RAY_CLUSTER`, when `ray` is first imported; a module imported before `connect`
    (Ray Tune's, Ray Train's) has it read unset, i.e. open. No public setting replaces it: `ray.init`'s node
    address is resolved through it again (127.0.0.1 becomes the host's address while it is true), and the
    processes Ray starts read the (now set) variable themselves."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOCAL_ONLY_ENV, not ray_constants.IS_WINDOWS_OR_OSX)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def connect(address: str | None = None, verbose: bool = False, num_cpus: int | None = None) -> None:
    """`ray.init` once per process. With no address (and no RAY_ADDRESS) a local Ray starts in-process
    with its dashboard, which Ray Train needs to release the placement groups of stopped trials."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        _close_local_instance()  # before `import ray`: Ray reads the switch when imported
    import ray

    if ray.is_initialized():
        return
    quiet = logging.INFO if verbose else logging.ERROR
    kwargs = dict(logging_level=quiet, log_to_driver=verbose, configure_logging=True)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            _apply_local_only()
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray instance"
        raise UserError(f"could not connect to Ray at {where}: {str(e).splitlines()[0]}") from None
    if not address and os.environ.get(LOCAL_ONLY_ENV) == "0" and not is_loopback(ray.util.get_node_ip_address()):
        logging.getLogger(__name__).warning(
            "the local Ray listens beyond loopback (on %s) although %s=0; "
            "set it in the environment before starting Python to keep a local run closed",
            ray.util.get_node_ip_address(),
            LOCAL_ONLY_ENV,
        )


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a `host:port` address: `ray.init` would retry for minutes."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local", ...: left to ray.init, which fails fast on those
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"could not connect to Ray at {address}: nothing answers at {host}:{port} ({reason}); "
            "check the address and that the cluster is up (`ray status` on its head node)"
        ) from None
    if not os.environ.get("RAY_USE_TLS"):
        _check_speaks_grpc(address, f"{host}:{port}", timeout)


def _check_speaks_grpc(address: str, hostport: str, timeout: float) -> None:
    """Something listens, but is it Ray's GCS? It speaks gRPC (HTTP/2); a dashboard, any HTTP/1 server
    or a silent port never lets a gRPC channel become ready, and ray.init would hang retrying it."""
    import grpc

    channel = grpc.insecure_channel(hostport)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise UserError(
            f"could not connect to Ray at {address}: it accepts connections but does not answer as Ray's GCS "
            "(gRPC); give the head's GCS address (port 6379 by default), not the dashboard's (8265, which "
            "`allatt-dist submit` takes)"
        ) from None
    finally:
        channel.close()
