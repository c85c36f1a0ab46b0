"""argparse pieces shared by every sub-command module (cli.py, bench/options.py and bench/command.py,
cluster/commands.py)."""

from __future__ import annotations

import argparse
from typing import Any


def add_override_arg(
    parser: Any, help: str = "override a config key (repeatable)", metavar: str = "SECTION.KEY=VALUE"
) -> None:
    """The `--set SECTION.KEY=VALUE` option every recipe-reading command takes (`recipe.parse_overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value
