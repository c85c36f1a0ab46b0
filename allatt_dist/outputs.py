"""Checks on where a command will write, made before any work starts (and before Ray does).

Each raises `UserError` with one line naming the flag and the path, so that a typo in `--out` costs
a second, not a training run, and nothing a user already has is replaced without being asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from allatt_dist.errors import UserError


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_creatable(path: Path, flag: str) -> None:
    """`path` (file or folder) can be created: its nearest existing ancestor is a writable folder."""
    base = _first_existing(path.parent if path.parent != path else path)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {base} (permission denied)")


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """A run or experiment folder: new, or an existing folder (resumed or refused later by its owner)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: cannot write in it (permission denied)")
        return
    check_creatable(path, flag)


def check_output_file(path: Path, flag: str = "--out") -> None:
    """A result file: a new path or an existing file (replaced); never a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path")
    check_creatable(path, flag)


def check_new_model_dir(path: Path, source: Path, force: bool, flag: str = "--out") -> None:
    """Where a new model directory goes: not the source, and not an existing path unless `force`
    is given and the path is a model directory (config.json), which is then replaced as a whole."""
    path = Path(path)
    if path.resolve() == Path(source).resolve() or Path(source).resolve().is_relative_to(path.resolve()):
        raise UserError(f"{flag} {path}: would replace the input model {source}; give another path")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"{flag} {path}: exists and is not a model directory; give a new path")
        if not force:
            raise UserError(f"{flag} {path}: a model directory already exists there; give a new path or --force")
    check_creatable(path, flag)
