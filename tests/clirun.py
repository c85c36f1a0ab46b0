"""`allatt-dist` as a user runs it: a fresh `python -m allatt_dist.cli` process, its output captured.

    r = run_cli("prune", str(src), "--out", str(out))          # CompletedProcess: returncode, stdout, stderr
    r = run_cli("train", recipe, env=env, cwd=REPO, timeout=900)
    cmd = cli_cmd("rank", str(exp))                              # the argument list, for Popen

One copy for every test file: the tests that check what a user sees run this, not `cli.main` in-process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "allatt_dist.cli"]


def cli_cmd(*args: str | Path) -> list[str]:
    return [*CLI, *map(str, args)]


def run_cli(
    *args: str | Path, env: dict | None = None, cwd: Path | str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the CLI to its end (env: the whole environment, default this process's; cwd: default this one's)."""
    return subprocess.run(cli_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
