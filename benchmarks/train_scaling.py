"""Data-parallel training throughput and memory on CPU: 1 vs 2 Ray Train workers, ZeRO stages 0/2/3.

Each case trains the dense phase of a recipe (default: tune_configs/quickstart.yaml) for --steps
steps at the recipe's global batch, on a local Ray started in this process, and reads back:

  tokens/s        global training throughput, from the median of the step times that rank 0
                  logs to TensorBoard (perf/step_time_s: the mean step time of each window of
                  --log-every steps, as in a real run, where logging is amortised over a window),
                  leaving out windows that end within the first --skip steps (warm-up) and the
                  last window (the final step also evaluates and checkpoints).
                  With --repeat N the cases run N times, interleaved, and the table shows each
                  case's fastest run (the one least disturbed by other load on the machine).
  opt state       bytes of optimizer state (Adam moments) each rank holds, measured in the worker
                  (result.json `optimizer_state_bytes`, one entry per rank)
  peak RSS        peak resident memory of each worker process (getrusage ru_maxrss)

Usage:
    python benchmarks/train_scaling.py [--config tune_configs/quickstart.yaml] [--steps 60]
        [--cases w1z0,w2z0,w2z2,w2z3] [--repeat N] [--log-every N] [--set section.key=value ...] [--json out.json]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

CASES = {  # name: (workers, ZeRO stage)
    "w1z0": (1, 0),
    "w2z0": (2, 0),
    "w2z2": (2, 2),
    "w2z3": (2, 3),
}


def step_times(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars("perf/step_time_s")})
    return out


def run_case(
    name: str, base_overrides: list[str], config: str, steps: int, skip: int, run_dir: Path, log_every: int
) -> dict:
    from allatt_dist.plan import make_plan
    from allatt_dist.recipe import load_config
    from allatt_dist.train.trainer import train

    workers, stage = CASES[name]
    overrides = [
        *base_overrides,
        f"scaling.num_workers={workers}",
        "scaling.cpus_per_worker=0.99",
        "scaling.max_failures=0",
        f"deepspeed.zero_stage={stage}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        f"train.log_every={log_every}",
    ]
    cfg = load_config(config, overrides)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    res = train(make_plan(cfg, run_dir, progress=False), ["dense"])["dense"]
    wall = time.monotonic() - t0
    times = step_times(run_dir / "tb/dense")
    # windows of log_every steps that start after the warm-up; the last one also evaluates
    timed = [times[s] for s in sorted(times) if s - log_every >= skip and s < steps]
    step_s = statistics.median(timed)
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    return {
        "case": name,
        "workers": workers,
        "zero_stage": stage,
        "global_batch": cfg.train.batch_size,
        "seq_len": cfg.model.seq_len,
        "params": res["params"],
        "steps_timed": len(timed),
        "step_time_s_median": step_s,
        "step_time_s_mean": statistics.fmean(timed),
        "tokens_per_s": tokens_per_step / step_s,
        "optimizer_state_bytes": res["optimizer_state_bytes"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "final_train_loss": res["train_loss"],
        "wall_s": wall,
        "load_avg_1min": [load_before, os.getloadavg()[0]],  # before / after: other work on the machine
    }


def best_runs(runs: list[dict]) -> list[dict]:
    """Per case (in first-seen order), its fastest run, with every run's tokens/s attached."""
    out: dict[str, dict] = {}
    for r in runs:
        best = out.get(r["case"])
        if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
            out[r["case"]] = dict(r)
    for name, row in out.items():
        row["tokens_per_s_all_runs"] = [r["tokens_per_s"] for r in runs if r["case"] == name]
    return list(out.values())


def table(rows: list[dict]) -> str:
    base = next((r["tokens_per_s"] for r in rows if r["workers"] == 1), None)
    mib = 2**20
    lines = [
        "| workers | ZeRO | step (ms, median) | tokens/s | vs 1 worker | tokens/s, all runs "
        "| opt. state / worker (MiB) | peak RSS / worker (MiB) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        opt = " / ".join(f"{b / mib:.2f}" for b in r["optimizer_state_bytes"])
        rss = " / ".join(f"{b / mib:.0f}" for b in r["peak_rss_bytes"])
        every = ", ".join(f"{t:.0f}" for t in r.get("tokens_per_s_all_runs", [r["tokens_per_s"]]))
        lines.append(
            f"| {r['workers']} | {r['zero_stage']} | {1000 * r['step_time_s_median']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {speed} | {every} | {opt} | {rss} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tune_configs/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", type=int, default=60, help="training steps per case")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the timing (warm-up)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every: steps per timed window")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=1, help="run every case this many times (interleaved)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--keep", default=None, help="keep the run directories here (default: a temp dir, removed)")
    a = ap.parse_args()
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    if a.log_every < 1 or a.steps < a.skip + 3 * a.log_every:
        ap.error("--steps must leave at least 3 windows of --log-every steps after --skip")
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")

    import ray

    from allatt_dist.cluster.session import connect

    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="allatt-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    connect()
    runs = []
    try:
        for i in range(a.repeat):
            for name in cases:
                run_dir = root / f"{name}_{i}"
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                runs.append(run_case(name, a.overrides, a.config, a.steps, a.skip, run_dir, a.log_every))
                r = runs[-1]
                load = "/".join(f"{x:.1f}" for x in r["load_avg_1min"])
                tps, wall = r["tokens_per_s"], r["wall_s"]
                print(f"{name} (run {i + 1}): {tps:.0f} tokens/s, {wall:.0f}s, load {load}", flush=True)
    finally:
        ray.shutdown()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    info = {
        "config": a.config,
        "overrides": a.overrides,
        "steps": a.steps,
        "skip": a.skip,
        "log_every": a.log_every,
        "repeat": a.repeat,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows = best_runs(runs)
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "best": rows, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
