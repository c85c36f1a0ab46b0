"""Flags `generate`, `export` and `serve` share: the leaderboard pick, sampling numbers, the device."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from allatt_dist.cliargs import positive_int
from allatt_dist.errors import UserError


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0.0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def probability(text: str) -> float:
    v = non_negative_float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {v}")
    return v


def device_of(name: str):
    """`--device`: cpu, cuda or cuda:N, checked against this machine."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: give cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


def add_pick_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=positive_int, default=None, help="experiment: best model with at most PARAMS")
    p.add_argument("--name", default=None, help="experiment: the leaderboard row of this name")
    p.add_argument(
        "--latency-budget",
        type=non_negative_float,
        default=None,
        metavar="MS",
        help="experiment: best model whose measured segment latency (rank's latency_ms) is at most MS",
    )


def pick_of(a: argparse.Namespace):
    from allatt_dist.infer.source import Pick

    if a.name is not None and (a.budget is not None or a.latency_budget is not None):
        raise UserError("--name picks one row; give it without --budget / --latency-budget")
    return Pick(budget=a.budget, name=a.name, latency_ms=a.latency_budget)


@dataclass(frozen=True)
class Limits:
    """What one `serve` replica accepts and how it batches (serve.py)."""

    max_new_tokens: int = 256  # per /generate request
    max_tokens: int = 2048  # prompt or scored text, in the model's tokens
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
