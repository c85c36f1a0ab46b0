"""The Ray Jobs API through the public Jobs SDK (`ray.job_submission.JobSubmissionClient`): the
address, the token, the client, and the SDK calls this CLI makes, with their errors as one line.

Token authentication (Ray >= 2.52): the token is read the way Ray itself reads it, in this order:
the RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. When one is
found it is sent as an `Authorization: Bearer ...` header, whatever RAY_AUTH_MODE says on this side.

Every problem the user can fix (no cluster at the address, a refused token, an unknown job id) is
raised as one `UserError` line.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from allatt_dist.errors import UserError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
DOCS = "docs/cluster.md"
AGENT_WAIT_S = 60.0  # how long submit waits for the job agent of a head that has just started


# --------------------------------------------------------------------------------------------------
# Address, token and client


def jobs_address(address: str | None) -> str:
    """The http(s) URL of the head's Jobs API (the dashboard port, 8265 by default)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster given: use --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https"):
        raise UserError(
            f"--address {address}: expected the Jobs API URL http://HEAD:8265, not a {parts.scheme}:// address"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise UserError(f"--address {address}: the port is not a number") from None
    if not parts.hostname:
        raise UserError(f"--address {address}: no host name")
    return address.rstrip("/")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one TCP connect) instead of letting an HTTP client hang on a dead address."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(
            f"cannot reach the Ray Jobs API at {address} ({why}); is the head up, and is the SSH tunnel or "
            f"kubectl port-forward open? (see {DOCS})"
        ) from None
    # Something accepts connections; a port that never answers would hang the Jobs SDK's first request.
    try:
        urllib.request.urlopen(address.rstrip("/") + "/api/version", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # an HTTP answer (401, 404, ...): the SDK reports what it means
    except (OSError, http.client.HTTPException) as e:
        why = "no answer" if isinstance(e, TimeoutError) or "timed out" in str(e) else first_line(e)
        raise UserError(
            f"the Ray Jobs API at {address} accepts connections but gives no HTTP answer ({why}); check that it "
            f"is the head's dashboard address, port 8265 by default (see {DOCS})"
        ) from None


def read_token() -> tuple[str | None, str]:
    """(token, where it came from), looked up like Ray does; (None, "") when there is none."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if value:
        return value, TOKEN_ENV
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        p = Path(path).expanduser()
        try:
            value = p.read_text().strip()
        except OSError as e:
            raise UserError(f"{TOKEN_PATH_ENV}={path}: cannot read the token file ({e.strerror})") from None
        if not value:
            raise UserError(f"{TOKEN_PATH_ENV}={path}: the token file is empty")
        return value, f"{TOKEN_PATH_ENV} ({p})"
    p = DEFAULT_TOKEN_FILE.expanduser()
    try:
        value = p.read_text().strip() if p.is_file() else ""
    except OSError:
        value = ""
    return (value, str(p)) if value else (None, "")


def _auth_error(address: str, source: str) -> UserError:
    """`source` is where the token sent came from; "" when none was found (and none was sent)."""
    if not source:
        return UserError(
            f"the Ray cluster at {address} requires a token and none was found: set {TOKEN_PATH_ENV}=FILE "
            f"(or {TOKEN_ENV}, or write it to ~/.ray/auth_token); see {DOCS}"
        )
    return UserError(
        f"the Ray cluster at {address} rejected the token from {source}: get the cluster's "
        f"token with `ray get-auth-token` on the head (see {DOCS})"
    )


def make_client(address: str | None, timeout: float = 5.0):
    """A `JobSubmissionClient` that carries the auth token, or one clear `UserError`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    check_reachable(url, timeout)
    token, source = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        raise _auth_error(url, source) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot use the Ray Jobs API at {url}: {first_line(e)}") from None


@contextmanager
def sdk_errors(client, what: str) -> Iterator[None]:
    """The Jobs SDK calls inside raise one `UserError` line, prefixed with `what`, for what the user
    can fix: a refused token, an unreachable head, an HTTP error such as an unknown job id."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise _auth_error(client.get_address(), read_token()[1]) from None
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        msg = first_line(e)
        m = re.search(r"status code (\d+): (.*)", msg)
        if m:
            msg = m.group(2).rstrip(".") if m.group(2).strip() else f"HTTP {m.group(1)}"
        raise UserError(f"{what}: {msg}") from None


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:400] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------
# The SDK calls


def submit(
    client,
    entrypoint: str,
    runtime_env: dict[str, Any],
    metadata: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            with sdk_errors(client, "job submission failed"):
                return client.submit_job(
                    entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=submission_id
                )
        except UserError as e:
            # A head that has just started answers this until its job agent is up; nothing was created.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def job_info(client, job_id: str):
    with sdk_errors(client, f"job {job_id}"):
        return client.get_job_info(job_id)


def job_logs(client, job_id: str) -> str:
    with sdk_errors(client, f"job {job_id}"):
        return client.get_job_logs(job_id)


def job_status(client, job_id: str) -> str:
    with sdk_errors(client, f"job {job_id}"):
        return str(client.get_job_status(job_id).value)


def list_jobs(client) -> list:
    with sdk_errors(client, "listing jobs"):
        return client.list_jobs()


def stop_job(client, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    with sdk_errors(client, f"job {job_id}"):
        return client.stop_job(job_id)


def follow_logs(client, job_id: str, stream=None) -> None:
    """Copy the job's log to `stream` (stderr) until the job ends."""
    stream = stream or sys.stderr

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the socket closed early (head restarted, tunnel dropped): callers poll on
        print(f"(log stream of {job_id} ended: {first_line(e)})", file=sys.stderr)


def wait(client, job_id: str, poll_s: float = 1.0) -> str:
    """Block until the job reaches a terminal status; returns it."""
    while True:
        status = job_status(client, job_id)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
