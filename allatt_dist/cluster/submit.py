"""Running `allatt-dist` commands on a remote Ray cluster as Ray Jobs, through the Jobs SDK.

`allatt-dist submit CONFIG --address http://HEAD:8265` packs a working directory (by default the
current one, without runs/, .git/ and wheels), sends it with the runtime environment of
`--runtime-env`, and starts `python -m allatt_dist.cli <command> CONFIG ...` on the head node, with
CONFIG given by its path relative to that working directory (so the recipe travels with the code).

Token authentication (Ray >= 2.52): the token is read the way Ray itself reads it, in this order:
the RAY_AUTH_TOKEN variable, the file named by RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. When one is
found it is sent as an `Authorization: Bearer ...` header, whatever RAY_AUTH_MODE says on this side.

Every problem the user can fix (no cluster at the address, a refused token, a missing config, a
malformed runtime-env YAML, a job that ended FAILED) is raised as one `UserError` line.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from allatt_dist.errors import UserError

COMMANDS = ("train", "run", "tune")
DEFAULT_EXCLUDES = [
    "runs/",
    "experiments/",
    ".git/",
    "*.whl",
    "/.whl/",
    "__pycache__/",
    "*.egg-info/",
    ".venv/",
    ".pytest_cache/",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
DOCS = "docs/cluster.md"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class JobFailed(UserError):
    """A submitted job that ended FAILED or STOPPED; the message carries the job's error line."""


# --------------------------------------------------------------------------------------------------
# Address and token


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
        why = "no answer" if isinstance(e, TimeoutError) or "timed out" in str(e) else _first_line(e)
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
        raise UserError(f"cannot use the Ray Jobs API at {url}: {_first_line(e)}") from None


def _call(client, what: str, fn, *args, **kwargs):
    """Run one SDK call; its errors become one line."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise _auth_error(client.get_address(), read_token()[1]) from None
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        msg = _first_line(e)
        m = re.search(r"status code (\d+): (.*)", msg)
        if m:
            msg = m.group(2).rstrip(".") if m.group(2).strip() else f"HTTP {m.group(1)}"
        raise UserError(f"{what}: {msg}") from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:400] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------------
# Runtime environment and entrypoint


def load_runtime_env(path: str | Path | None) -> dict[str, Any]:
    """The runtime env of a YAML file (checked by Ray's own `RuntimeEnv`), or {} without one."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: runtime-env file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{p}: malformed runtime-env YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a runtime env must be a mapping (working_dir, pip, env_vars, ...)")
    env_vars = data.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            raise UserError(f"{p}: env_vars must be a mapping of NAME: value")
        data["env_vars"] = {str(k): "" if v is None else str(v) for k, v in env_vars.items()}
    from ray.runtime_env import RuntimeEnv

    unknown = sorted(k for k in data if k not in RuntimeEnv.known_fields)
    if unknown:  # Ray would take them for plugin names and ignore a typo silently
        known = ", ".join(sorted(k for k in RuntimeEnv.known_fields if not k.startswith("_")))
        raise UserError(f"{p}: unknown runtime env field {unknown[0]!r} (known: {known})")
    try:
        RuntimeEnv(**data)
    except Exception as e:  # Ray raises TypeError/ValueError/its own errors for a bad field
        raise UserError(f"{p}: invalid runtime env: {_first_line(e)}") from None
    return data


def _is_uri(s: str) -> bool:
    return "://" in s


def _excluded(rel: str, root: Path, patterns: list[str]) -> str | None:
    """The rule that keeps `rel` out of the uploaded working_dir (excludes, root .gitignore/.rayignore)."""
    try:
        from ray._private.thirdparty.pathspec import PathSpec
    except ImportError:  # private module moved: skip the check, the job then fails with "not found"
        return None
    sources = [("excludes", patterns)]
    for name in (".gitignore", ".rayignore"):
        f = root / name
        if f.is_file():
            sources.append((name, f.read_text().splitlines()))
    parents = [str(Path(*Path(rel).parts[:i])) + "/" for i in range(1, len(Path(rel).parts))]
    for name, lines in sources:
        spec = PathSpec.from_lines("gitwildmatch", lines)
        if spec.match_file(rel) or any(spec.match_file(d) for d in parents):
            return name
    return None


def build_job(
    config: str,
    runtime_env_path: str | None,
    command: str,
    overrides: list[str] | None = None,
    out: str | None = None,
    extra: list[str] | None = None,
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(entrypoint, runtime_env, metadata) of one submission; checks everything local first."""
    from allatt_dist.recipe import load_config

    if command not in COMMANDS:
        raise UserError(f"--command {command}: expected one of {', '.join(COMMANDS)}")
    cfg = load_config(config, overrides)  # the job runs this code on this recipe: a bad key fails here, not there
    if command in ("run", "tune") and cfg.tune is None:
        raise UserError(f"{config}: tune: section missing (see docs/search.md)")
    runtime_env = load_runtime_env(runtime_env_path)
    wd = runtime_env.get("working_dir", ".")
    if not isinstance(wd, str):
        raise UserError(f"{runtime_env_path}: working_dir must be a path or a URI")
    excludes = list(runtime_env.get("excludes") or [])
    runtime_env["excludes"] = excludes + [e for e in DEFAULT_EXCLUDES if e not in excludes]
    if _is_uri(wd):
        # A package already uploaded (s3://, gs://, https://...zip): CONFIG names a file inside it.
        if Path(config).is_absolute():
            raise UserError(f"{config}: with working_dir {wd}, give CONFIG relative to that package's root")
        rel = Path(config).as_posix()
    else:
        root = Path(wd).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"working_dir {wd}: not a directory")
        cfg = Path(config).expanduser().resolve()
        if not cfg.is_relative_to(root):
            raise UserError(
                f"{config}: not inside the uploaded working_dir {root}; move the recipe under it (e.g. "
                "tune_configs/) or run submit from a directory that holds it"
            )
        rel = cfg.relative_to(root).as_posix()
        rule = _excluded(rel, root, runtime_env["excludes"])
        if rule:
            raise UserError(f"{config}: left out of the uploaded working_dir by its {rule}; move it elsewhere")
        runtime_env["working_dir"] = str(root)
    if out is not None:
        if _is_uri(out):
            raise UserError(
                f"--out {out}: URIs are not supported for run directories yet; give a path on a filesystem "
                f"that every node mounts (see {DOCS})"
            )
        if not Path(out).is_absolute():
            raise UserError(
                f"--out {out}: give an absolute path on the cluster's shared filesystem (a relative one "
                "would land in the job's temporary copy of the working_dir)"
            )
    argv = ["python", "-m", "allatt_dist.cli", command, rel]
    for item in overrides or []:
        argv += ["--set", item]
    if out is not None:
        argv += ["--out", out]
    argv += list(extra or [])
    metadata = {"allatt_command": command, "allatt_config": rel}
    if out is not None:
        metadata["allatt_out"] = out
    return shlex.join(argv), runtime_env, metadata


# --------------------------------------------------------------------------------------------------
# Submitting and following


def submit(
    client,
    entrypoint: str,
    runtime_env: dict[str, Any],
    metadata: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> str:
    return _call(
        client,
        "job submission failed",
        client.submit_job,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata=metadata,
        submission_id=submission_id,
    )


def job_info(client, job_id: str):
    return _call(client, f"job {job_id}", client.get_job_info, job_id)


def job_logs(client, job_id: str) -> str:
    return _call(client, f"job {job_id}", client.get_job_logs, job_id)


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
        print(f"(log stream of {job_id} ended: {_first_line(e)})", file=sys.stderr)


def wait(client, job_id: str, poll_s: float = 1.0) -> str:
    """Block until the job reaches a terminal status; returns it."""
    while True:
        status = str(_call(client, f"job {job_id}", client.get_job_status, job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def error_line(logs: str, message: str | None) -> str:
    """The line of a failed job that says why: the CLI's own `error:` line, else the last error-like
    line of its log, else the first line of Ray's message."""
    lines = [_ANSI.sub("", ln).strip() for ln in logs.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if re.match(r"allatt-dist \w+: (error|interrupted)", ln):
            return ln[:500]
    for ln in reversed(lines):
        if re.search(r"\b\w*(Error|Exception)\b|\berror\b", ln):
            return ln[:500]
    msg = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    return (msg[0] if msg else (lines[-1] if lines else "no log"))[:500]


def outcome(client, job_id: str, status: str) -> dict[str, Any]:
    """The job's summary when it SUCCEEDED; `JobFailed` (one line) otherwise."""
    info = job_info(client, job_id)
    if status == "SUCCEEDED":
        return {
            "job_id": job_id,
            "status": status,
            "address": client.get_address(),
            "entrypoint": info.entrypoint,
            "metadata": info.metadata or {},
        }
    try:
        logs = job_logs(client, job_id)
    except UserError:
        logs = ""
    raise JobFailed(f"job {job_id} {status}: {error_line(logs, info.message)}")


def describe(info) -> dict[str, Any]:
    def when(ms):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ms / 1000)) if ms else None

    return {
        "job_id": info.submission_id or info.job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "start_time": when(info.start_time),
        "end_time": when(info.end_time),
        "metadata": info.metadata or {},
    }
