"""What keeping a run in object storage costs: the same `allatt-dist run` into a local folder and into a
bucket of an S3-protocol server on loopback (moto), timed, with what the bucket received.

Loopback has no network latency or bandwidth limit, so this measures the project's own sync work
(listing, comparing, uploading and downloading, the lease's read-back delay), not a real S3 link: a
run whose checkpoints are large will pay their transfer time on top.

Usage:
    python benchmarks/storage_overhead.py [--config tune_configs/quickstart.yaml] [--set section.key=value ...]
        [--data DIR] [--repeat N]

Needs `moto[server]` (the dev extra). Each case runs in its own process (`allatt-dist run`, a local Ray
started in-process) and is repeated --repeat times, interleaved; the table shows each case's fastest run
and the rerun (resume of a finished run) time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TINY = [
    "model.num_layers=2", "model.hidden_dim=32", "model.num_heads=4", "model.num_persistent=16",
    "model.seq_len=16", "model.mem_len=16", "model.adaptive_cutoffs=[]",
    "train.max_steps=40", "train.batch_size=4", "train.eval_every=20", "train.checkpoint_every=20",
    "prune.max_steps=40", "data.eval_batch_size=8", "data.eval_max_segments=10",
    "scaling.num_workers=2", "scaling.cpus_per_worker=0.99",
    'tune.space={"gates.sparsity_target": {"grid": [0.25, 0.75]}}',
]  # fmt: skip


def _run(args: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "allatt_dist.cli", "run", *args, "--no-progress"],
        env=env, capture_output=True, text=True, cwd=HERE.parent,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"run failed: {r.stderr.strip().splitlines()[-1:]}")
    return time.monotonic() - t0, json.loads(r.stdout)


def main() -> None:
    from s3server import S3Server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tune_configs/quickstart.yaml")
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared/data/wikitext-2-mini"))
    ap.add_argument("--set", dest="sets", action="append", default=None, help="override (default: a tiny model)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    sets = [*(a.sets if a.sets is not None else TINY), f"data.path={a.data}"]
    overrides = [x for s in sets for x in ("--set", s)]
    work = Path(tempfile.mkdtemp(prefix="allatt-storage-bench-"))
    rows: dict[str, list[tuple[float, float]]] = {"local": [], "s3": []}
    with S3Server() as s3:
        s3.make_bucket("runs")
        env = {**os.environ, **s3.env(ALLATT_MIRROR_DIR=str(work / "mirrors")), "ALLATT_CACHE_DIR": str(work / "c")}
        for i in range(a.repeat):
            for case in ("local", "s3"):
                out = str(work / f"local{i}") if case == "local" else f"s3://runs/run{i}"
                first, res = _run([a.config, "--out", out, *overrides], env)
                again, res2 = _run([a.config, "--out", out, *overrides], env)
                assert res["leaderboard"] == res2["leaderboard"]
                rows[case].append((first, again))
                print(f"{case} #{i}: run {first:.1f} s, rerun {again:.1f} s", file=sys.stderr, flush=True)
        objects = s3.keys("runs", "run0/")
        pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix="run0/")
        size = sum(o["Size"] for page in pages for o in page.get("Contents", []))
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; config {a.config} with {len(sets)} overrides")
    print("| run directory | run (s) | rerun, all done (s) |")
    print("|---|---|---|")
    for case, vals in rows.items():
        print(f"| {case} | {min(v[0] for v in vals):.1f} | {min(v[1] for v in vals):.1f} |")
    print(f"bucket: {len(objects)} objects, {size / 2**20:.1f} MiB for one run")


if __name__ == "__main__":
    main()
