"""`allatt-dist submit`: what one Ray Job runs, checked locally before anything is sent.

`allatt-dist submit CONFIG --address http://HEAD:8265` packs a working directory (by default the
current one, without runs/, .git/ and wheels), sends it with the runtime environment of
`--runtime-env`, and starts `python -m allatt_dist.cli <command> CONFIG ...` on the head node, with
CONFIG given by its path relative to that working directory (so the recipe travels with the code).
Talking to the cluster (address, token, SDK calls) is `jobs_api.py`; this module builds the job and
reads its outcome.

Every problem the user can fix (a missing config, a malformed runtime-env YAML, a recipe left out of
the upload, a job that ended FAILED) is raised as one `UserError` line.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from allatt_dist.cluster.jobs_api import first_line, job_info, job_logs
from allatt_dist.errors import UserError, yaml_problem
from allatt_dist.recipe import load_config
from allatt_dist.remote import parse_remote

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
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class JobFailed(UserError):
    """A submitted job that ended FAILED or STOPPED; the message carries the job's error line."""


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
        raise UserError(f"{p}: malformed runtime-env YAML{yaml_problem(e)}") from None
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
        raise UserError(f"{p}: invalid runtime env: {first_line(e)}") from None
    return data


def _is_uri(s: str) -> bool:
    return "://" in s


def _excluded(rel: str, root: Path, patterns: list[str]) -> str | None:
    """The rule that keeps `rel` out of the uploaded working_dir (excludes, root .gitignore/.rayignore).

    Ray matches both with gitignore ("gitwildmatch") patterns; the public `pathspec` package reads
    the same syntax. A path is left out when it or one of its parent folders matches."""
    from pathspec import PathSpec

    sources = [("excludes", patterns)]
    for name in (".gitignore", ".rayignore"):
        f = root / name
        if f.is_file():
            sources.append((name, f.read_text().splitlines()))
    parents = [str(Path(*Path(rel).parts[:i])) + "/" for i in range(1, len(Path(rel).parts))]
    for name, lines in sources:
        spec = PathSpec.from_lines("gitignore", lines)
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
    if command not in COMMANDS:
        raise UserError(f"--command {command}: expected one of {', '.join(COMMANDS)}")
    cfg = load_config(config, overrides)  # the job runs this code on this recipe: a bad key fails here, not there
    if command in ("run", "tune") and cfg.tune is None:
        raise UserError(f"{config}: tune: section missing (see docs/search.md)")
    runtime_env = load_runtime_env(runtime_env_path)
    rel = _recipe_in_working_dir(config, runtime_env, runtime_env_path)
    if out is not None:
        _check_out(out)
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


def _working_dir(runtime_env: dict[str, Any], runtime_env_path: str | None) -> str | Path:
    """The job's working_dir: a URI as given, or a local folder made absolute (default: this one); sets the
    runtime env's excludes and, for a local folder, its absolute working_dir."""
    wd = runtime_env.get("working_dir", ".")
    if not isinstance(wd, str):
        raise UserError(f"{runtime_env_path}: working_dir must be a path or a URI")
    excludes = list(runtime_env.get("excludes") or [])
    runtime_env["excludes"] = excludes + [e for e in DEFAULT_EXCLUDES if e not in excludes]
    if _is_uri(wd):
        return wd
    root = Path(wd).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"working_dir {wd}: not a directory")
    runtime_env["working_dir"] = str(root)
    return root


def _recipe_in_working_dir(config: str, runtime_env: dict[str, Any], runtime_env_path: str | None) -> str:
    """CONFIG's path inside the job's working_dir (checked: uploaded, not excluded)."""
    root = _working_dir(runtime_env, runtime_env_path)
    if isinstance(root, str):
        # A package already uploaded (s3://, gs://, https://...zip): CONFIG names a file inside it.
        if Path(config).is_absolute():
            raise UserError(f"{config}: with working_dir {root}, give CONFIG relative to that package's root")
        return Path(config).as_posix()
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
    return rel


def _check_out(out: str) -> None:
    """`--out` as the job will see it: a URI whose scheme a filesystem handles (the bucket is checked by the
    job), or an absolute path on the cluster's shared filesystem."""
    if _is_uri(out):
        parse_remote(out)
    elif not Path(out).is_absolute():
        raise UserError(
            f"--out {out}: give an absolute path on the cluster's shared filesystem (a relative one "
            "would land in the job's temporary copy of the working_dir)"
        )


# --------------------------------------------------------------------------------------------------
# A job's outcome


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
