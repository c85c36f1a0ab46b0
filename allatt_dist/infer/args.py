"""Flags `generate`, `export` and `serve` share: the leaderboard pick, sampling numbers, the device."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from allatt_dist.cliargs import non_negative_float, positive_int
from allatt_dist.errors import UserError


def add_pick_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """--budget, --name, --latency-budget; returns the actions (`submit serve` passes them on)."""
    return [
        p.add_argument("--budget", type=positive_int, default=None, help="experiment: best model with at most PARAMS"),
        p.add_argument("--name", default=None, help="experiment: the leaderboard row of this name"),
        p.add_argument(
            "--latency-budget",
            type=non_negative_float,
            default=None,
            metavar="MS",
            help="experiment: best model whose measured segment latency (rank's latency_ms) is at most MS",
        ),
    ]


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
