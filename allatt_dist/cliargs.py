"""argparse pieces shared by every sub-command module (cli.py, bench/options.py and bench/command.py,
cluster/commands.py, infer/): --set, the number types, --device."""

from __future__ import annotations

import argparse
from typing import Any

from allatt_dist.errors import UserError


def add_override_arg(
    parser: Any, help: str = "override a config key (repeatable)", metavar: str = "SECTION.KEY=VALUE"
) -> None:
    """The `--set SECTION.KEY=VALUE` option every recipe-reading command takes (`recipe.parse_overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for a seed or a top-k: an integer >= 0."""
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    """argparse type for a temperature or a budget in ms: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0.0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def probability(text: str) -> float:
    """argparse type for top-p: a number in (0, 1]."""
    v = non_negative_float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def parse_device(name: str, allow_auto: bool = False):
    """`--device`: cpu, cuda or cuda:N (and `auto` where allowed: cuda when there is one), checked against
    this machine; one line (UserError) otherwise."""
    import torch

    if allow_auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    give = f"give {'auto, ' if allow_auto else ''}cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: {give}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: {give}")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device
