"""The `allatt-dist bench` command: flags -> `BenchOptions` -> measure-train, measure-inference -> report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from allatt_dist.bench import report
from allatt_dist.bench.context import prepare
from allatt_dist.bench.inference import measure_inference
from allatt_dist.bench.options import BenchOptions, register_flags
from allatt_dist.bench.train import measure_train
from allatt_dist.cliargs import add_override_arg
from allatt_dist.config import RunConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="model speed: train tokens/s, (pruned) inference latency, FLOPs, MFU")
    p.add_argument("config", help="recipe YAML; its model, data, train.batch_size and gates sections are used")
    add_override_arg(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON (default: a short table)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    register_flags(p)
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> dict | None:
    from allatt_dist.outputs import check_output_file
    from allatt_dist.recipe import load_config

    cfg = load_config(a.config, a.overrides)
    out = Path(a.out) if a.out else None
    if out is not None:
        check_output_file(out)
    res = run_bench(cfg, BenchOptions.from_args(a))
    if out is not None:
        report.write_json(res, out)
    if a.json:
        return res
    print(report.format_table(res))
    return None


def run_bench(cfg: RunConfig, opts: BenchOptions) -> dict[str, Any]:
    """The whole result (the JSON of `--json`): header, training (unless `opts.train` is off) and
    inference fields, in that order."""
    ctx = prepare(cfg, opts)
    res = report.header(ctx)
    if opts.train:
        res.update(measure_train(ctx))
        res.update(report.train_rates(res, ctx))
    infer = measure_inference(ctx)
    baseline = infer.pop("baseline", None)
    res.update(infer)
    if baseline is not None:
        res.setdefault("baseline", {}).update(baseline)
    report.compile_outcome(res, ctx)
    return res
