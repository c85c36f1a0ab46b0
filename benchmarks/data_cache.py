"""Token cache benchmark: cold and warm corpus loads, 1 and N worker processes, time and peak RSS each.

    PYTHONPATH=$PWD python benchmarks/data_cache.py                    # WikiText-103's shape (103.7 M tokens)
    PYTHONPATH=$PWD python benchmarks/data_cache.py --tokens 10_000_000 --workers 1 8

A synthetic corpus is written to a temp folder (Zipf-like word frequencies over `--types` word types, lines
of WikiText-103's mean length), then each scenario starts fresh processes that do what a training worker
does: `load_corpus(cfg, ("train", "valid"))` and `LMStream` of its rank's rows. `cold` starts from an
empty cache (the processes start together: one tokenises, the others wait for it and map its file);
`warm` finds the cache built. `baseline` is the load without a cache (tokenised in memory as int64, what
every worker did before the cache), one process. Prints one JSON object; nothing is written outside the
temp folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

WT103 = {"train": 103_227_021, "valid": 217_646, "test": 245_569}  # the tokens of WikiText-103 (with <eos>)
TOKENS_PER_LINE = 57  # WikiText-103 train: 103.2 M tokens over 1.80 M lines


def write_corpus(folder: Path, total: int, types: int, seed: int = 0) -> dict:
    """{train,valid,test}.txt with `total` tokens in all (split as in WikiText-103)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i:x}" for i in range(types)], dtype=object)
    p = 1.0 / (np.arange(types) + 2.7)  # Zipf-like ranks
    cdf = np.cumsum(p / p.sum())
    scale = total / sum(WT103.values())
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in WT103.items():
        n = max(int(n * scale), 1000)
        with open(folder / f"{split}.txt", "w", encoding="utf-8") as f:
            for start in range(0, n, 2_000_000):
                m = min(2_000_000, n - start)
                ids = np.searchsorted(cdf, rng.random(m))
                ids = np.minimum(ids, types - 1)
                cuts = np.arange(TOKENS_PER_LINE, m, TOKENS_PER_LINE)
                f.write("".join(" " + " ".join(words[chunk]) + " \n" for chunk in np.split(ids, cuts)))
    return {s: (folder / f"{s}.txt").stat().st_size for s in WT103}


def _worker(args: tuple) -> dict:
    folder, cache, rank, world, cached, go = args
    from allatt_dist.config import DataConfig
    from allatt_dist.data import corpus as corpus_mod
    from allatt_dist.data.stream import LMStream

    go.wait()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the interpreter, numpy and torch
    t0 = time.perf_counter()
    cfg = DataConfig(path=folder, cache_dir=cache)
    if cached:
        corpus = corpus_mod.load_corpus(cfg, ("train", "valid"))
    else:
        where = {s: str(Path(folder) / f"{s}.txt") for s in ("train", "valid")}
        lines = {s: corpus_mod.read_lines(p) for s, p in where.items()}
        corpus = corpus_mod._make_corpus(lines, where, ("train", "valid"), folder)  # the uncached path
    loaded = time.perf_counter() - t0
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    LMStream(corpus.tokens("train"), 64, 128, rank, world)  # this rank's rows, as a worker holds them
    return {
        "load_s": loaded,
        "ready_s": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": before,
        "rss_load_mib": after_load,
        "types": len(corpus.vocab),
        "train_tokens": int(corpus.tokens("train").shape[0]),
        "dtype": str(corpus.tokens("train").dtype),
    }


def scenario(folder: Path, cache: Path, workers: int, cached: bool) -> dict:
    """`workers` fresh processes load at once; `peak_rss_load` is the peak up to the end of the load,
    `peak_rss` includes the worker's own int64 rows (LMStream, 1/workers of the train split)."""
    ctx = mp.get_context("spawn")  # fresh interpreters, as Ray workers are
    with ctx.Manager() as m:
        go = m.Event()
        with ctx.Pool(workers) as pool:
            jobs = pool.map_async(_worker, [(str(folder), str(cache), r, workers, cached, go) for r in range(workers)])
            time.sleep(3.0)  # let every interpreter start before the clock does
            t0 = time.perf_counter()
            go.set()
            runs = jobs.get()
            wall = time.perf_counter() - t0
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "load_s_max": round(max(r["load_s"] for r in runs), 2),
        "peak_rss_mib_max": round(max(r["peak_rss_mib"] for r in runs)),
        "peak_rss_mib_mean": round(sum(r["peak_rss_mib"] for r in runs) / workers),
        "rss_before_load_mib": round(max(r["rss_before_mib"] for r in runs)),
        "peak_rss_load_mib_max": round(max(r["rss_load_mib"] for r in runs)),
        "types": runs[0]["types"],
        "train_tokens": runs[0]["train_tokens"],
        "dtype": runs[0]["dtype"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=sum(WT103.values()))
    ap.add_argument("--types", type=int, default=267_735)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-baseline", action="store_true", help="skip the uncached load")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="allatt-cachebench-"))
    try:
        t0 = time.perf_counter()
        sizes = write_corpus(tmp / "data", a.tokens, a.types)
        out = {
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
            "corpus": {"tokens": a.tokens, "types_drawn_from": a.types, "bytes": sizes},
            "generate_s": round(time.perf_counter() - t0, 1),
            "runs": [],
        }
        for n in a.workers:
            cache = tmp / f"cache-{n}"
            out["runs"].append({"case": "cold", **scenario(tmp / "data", cache, n, True)})
            out["runs"].append({"case": "warm", **scenario(tmp / "data", cache, n, True)})
            print(json.dumps(out["runs"][-2:]), flush=True)
        if not a.no_baseline:
            out["runs"].append({"case": "baseline (no cache, int64)", **scenario(tmp / "data", tmp / "x", 1, False)})
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
