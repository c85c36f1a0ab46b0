"""Connecting to Ray: an in-process local instance by default, or an existing cluster.

Whether a run's workers fit the cluster is `capacity.py`'s question.
"""

from __future__ import annotations

import logging
import os
import socket

from allatt_dist.errors import UserError


def connect(address: str | None = None, verbose: bool = False, num_cpus: int | None = None) -> None:
    """`ray.init` once per process. With no address (and no RAY_ADDRESS) a local Ray starts in-process
    with its dashboard, which Ray Train needs to release the placement groups of stopped trials."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = logging.INFO if verbose else logging.ERROR
    kwargs = dict(logging_level=quiet, log_to_driver=verbose, configure_logging=True)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(include_dashboard=True, num_cpus=num_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a local Ray instance"
        raise UserError(f"could not connect to Ray at {where}: {str(e).splitlines()[0]}") from None


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
