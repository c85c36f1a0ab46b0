"""Load on `allatt-dist serve`: N concurrent HTTP clients for a fixed time, per model of a ranked experiment.

For each model the leaderboard keeps under models/, and the dense reference (dense/model), one server
is started (`allatt-dist serve EXP --name NAME`, the embedded local Ray, one replica), warmed
up, and driven by `--clients` threads, each sending requests back to back for `--seconds`: POST
/generate (`--max-new-tokens` tokens, temperature 1, top-k 40, a seed per request, prompts drawn from
the corpus' valid split) or POST /score (`--mode score`). Every request is counted: answered (2xx),
refused (another status) or dropped (no answer: a connection error or a timeout).

Reported per model: requests/s, generated (or scored) tokens/s, p50/p99 latency, the mean batch the
server computed requests in, answered/refused/dropped. JSON (`--out`) and a markdown table on stdout.

    python benchmarks/serve_load.py experiments/quickstart --clients 8 --seconds 30 --data DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests


def kept_models(exp: Path) -> list[tuple[dict, list[str]]]:
    """(leaderboard row, what `serve` is given) per model: each kept under models/, and the dense reference
    from dense/model when the leaderboard does not keep it (it is off the front when a pruned model wins)."""
    rows = [r for r in json.loads((exp / "leaderboard.json").read_text())["models"] if r.get("test_ppl") is not None]
    out = [(r, [str(exp), "--name", r["name"]]) for r in rows if r.get("model_dir")]
    dense = [r for r in rows if r["name"] == "dense" and not r.get("model_dir")]
    if dense and (exp / "dense" / "model" / "config.json").is_file():
        out.insert(0, (dense[0], [str(exp / "dense" / "model")]))
    return out


def prompts(data: Path | None, n: int = 200, words: int = 12) -> list[str]:
    """Line starts of the valid split (or generic words when no corpus is given)."""
    if data is None:
        return ["the"] * n
    lines = [ln.split()[:words] for ln in (data / "valid.txt").read_text().splitlines() if len(ln.split()) >= words]
    rng = random.Random(0)
    return [" ".join(rng.choice(lines)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: list[str], port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "allatt_dist.cli", "serve", *target, "--port", str(port), *extra]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    line = proc.stdout.readline()
    if not line.strip():
        proc.wait()
        log.seek(0)
        raise SystemExit(f"serve {' '.join(target)}: did not start (exit {proc.returncode}): {log.read()[-2000:]}")
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def drive(url: str, mode: str, texts: list[str], clients: int, seconds: float, new_tokens: int) -> dict:
    """`clients` threads sending back to back until the deadline; every request's outcome recorded."""
    done: list[tuple[float, int, int, int]] = []  # (latency s, status, tokens, batch); status 0: dropped
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        rng, session = random.Random(c), requests.Session()
        while time.perf_counter() < deadline:
            text = rng.choice(texts)
            if mode == "generate":
                body = {"prompt": text, "max_new_tokens": new_tokens, "temperature": 1.0, "top_k": 40}
                body["seed"] = rng.randrange(2**31)
            else:
                body = {"text": text}
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/{mode}", json=body, timeout=120)
                got = r.json() if r.status_code == 200 else {}
                rec = (time.perf_counter() - t0, r.status_code, got.get("tokens", 0), got.get("batch", 0))
            except (requests.RequestException, ValueError):
                rec = (time.perf_counter() - t0, 0, 0, 0)
            with lock:
                done.append(rec)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ok = [d for d in done if d[1] == 200]
    lat = sorted(d[0] * 1e3 for d in ok)
    return {
        "requests": len(done),
        "answered": len(ok),
        "refused": sum(1 for d in done if d[1] not in (0, 200)),
        "dropped": sum(1 for d in done if d[1] == 0),
        "requests_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(d[2] for d in ok) / wall, 1),
        "p50_ms": round(statistics.median(lat), 1) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "mean_batch": round(statistics.mean(d[3] for d in ok), 2) if ok else None,
        "seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", type=Path, help="a ranked experiment (leaderboard.json, models/)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--mode", choices=["generate", "score"], default="generate")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--data", type=Path, default=None, help="corpus folder: prompts from its valid split")
    ap.add_argument("--serve-args", default="", help="more `serve` flags, e.g. '--max-batch-size 16'")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    a = ap.parse_args()
    texts = prompts(a.data)
    results = []
    for row, target in kept_models(a.experiment):
        port = free_port()
        proc = start_server(target, port, a.serve_args.split())
        try:
            url = f"http://127.0.0.1:{port}"
            drive(url, a.mode, texts, a.clients, min(5.0, a.seconds), a.max_new_tokens)  # warm-up
            res = drive(url, a.mode, texts, a.clients, a.seconds, a.max_new_tokens)
        finally:
            stop_server(proc)
        res.update(model=row["name"], params=row["params"], heads_per_layer=row.get("heads_per_layer"))
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
    setup = {k: v for k, v in vars(a).items() if k not in ("experiment", "out", "data")}
    report = {"command": " ".join(sys.argv), "setup": setup, "cpus": os.cpu_count(), "models": results}
    if a.out:
        a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    cols = ["model", "params", "requests_per_s", "tokens_per_s", "p50_ms", "p99_ms", "mean_batch"]
    cols += ["answered", "refused", "dropped"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    main()
