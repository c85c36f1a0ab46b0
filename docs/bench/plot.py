"""Draw docs/img/bench_cpu.png from the JSON results of `allatt-dist bench` under docs/bench/results/,
and docs/img/dp_scaling.png from those of benchmarks/train_scaling.py under docs/bench/results/scaling/.

    python docs/bench/plot.py            # reads cpu1-{fp32,bf16}_*.json and scaling/small_b*.json

Left: inference latency per segment against sparsity (median over runs, bars from the fastest to
the slowest run), with the FLOPs-proportional line (dense latency x pruned/dense FLOPs) and its
1.1x bound. Right: training tokens/s of each variant (median over runs, same bars).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "img" / "bench_cpu.png"
OUT_SCALING = HERE.parent / "img" / "dp_scaling.png"


def load(prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}_*.json"))]


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, median - min, max - median), for error bars."""
    med = statistics.median(values)
    return med, med - min(values), max(values) - med


def main() -> None:
    runs = {"fp32": load("cpu1-fp32"), "bf16": load("cpu1-bf16")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for dtype, marker in (("fp32", "o"), ("bf16", "s")):
        rs = runs[dtype]
        if not rs:
            continue
        keys = list(rs[0]["infer_ms"])
        xs = [float(k) for k in keys]
        stats = [spread([r["infer_ms"][k] for r in rs]) for k in keys]
        meds = [s[0] for s in stats]
        left.errorbar(
            xs,
            meds,
            yerr=[[s[1] for s in stats], [s[2] for s in stats]],
            marker=marker,
            capsize=3,
            label=f"pruned, {dtype} (median of {len(rs)} runs)",
        )
        ratio = [statistics.median(r["infer_check"][k]["flops_ratio"] for r in rs) for k in keys]
        left.plot(xs, [meds[0] * f for f in ratio], ":", color="grey")
        left.plot(xs, [1.1 * meds[0] * f for f in ratio], "--", color="grey", linewidth=0.8)
    left.plot([], [], ":", color="grey", label="dense x FLOPs ratio")
    left.plot([], [], "--", color="grey", linewidth=0.8, label="1.1 x that (target bound)")
    left.set_xlabel("sparsity (fraction of heads removed)")
    left.set_ylabel("eval forward per segment (ms of CPU time)")
    left.set_title("Inference latency, batch 8 x 64 tokens, memory 64, 1 thread")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)

    names, meds, lo, hi = [], [], [], []
    for dtype in ("fp32", "bf16"):
        rs = runs[dtype]
        if not rs:
            continue
        for label, get in (
            ("baseline", lambda r: r["baseline"]["train_tokens_per_s"]),
            ("fast", lambda r: r["train_tokens_per_s"]),
        ):
            m, a, b = spread([get(r) for r in rs])
            names.append(f"{label}\n{dtype}")
            meds.append(m)
            lo.append(a)
            hi.append(b)
    colors = ["#999999", "#1f77b4"] * (len(names) // 2)
    right.bar(names, meds, yerr=[lo, hi], capsize=4, color=colors)
    for i, m in enumerate(meds):
        right.text(i, m + hi[i] + 0.01 * max(meds), f"{m:.0f}", ha="center", va="bottom", fontsize=8)
    right.set_ylabel("training tokens per CPU second")
    right.set_title("One train step (fwd + bwd + Adam), batch 8 x 64, 1 thread")
    fig.suptitle(
        "allatt-dist bench docs/bench/small.yaml --baseline --clock cpu --threads 1 [--dtype bf16]; "
        "2-core CPU VM (AMD EPYC), 2026-11-27",
        fontsize=9,
    )
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(OUT)
    scaling()


def scaling() -> None:
    """Training tokens/s (left) and speed-up over one worker (right) against the global batch."""
    rows = [r for p in sorted((RESULTS / "scaling").glob("small_b*.json")) for r in json.loads(p.read_text())["best"]]
    if not rows:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    one = {r["global_batch"]: r["tokens_per_s"] for r in rows if r["workers"] == 1}
    cases = (((1, 0), "o-", "#7f7f7f"), ((2, 0), "s-", "#1f77b4"), ((2, 2), "^--", "#2ca02c"))
    for (workers, stage), style, color in cases:
        pts = sorted(
            (r["global_batch"], r["tokens_per_s"]) for r in rows if (r["workers"], r["zero_stage"]) == (workers, stage)
        )
        if not pts:
            continue
        label = f"{workers} worker{'s' if workers > 1 else ''}, ZeRO-{stage}"
        left.plot([b for b, _ in pts], [t for _, t in pts], style, color=color, label=label)
        if workers > 1:
            right.plot([b for b, _ in pts], [t / one[b] for b, t in pts], style, color=color, label=label)
            for b, t in pts:
                right.annotate(
                    f"{t / one[b]:.2f}x", (b, t / one[b]), textcoords="offset points", xytext=(4, -12), fontsize=8
                )
    right.axhline(1.7, color="grey", linestyle=":", label="1.7x (target)")
    right.axhline(2.0, color="grey", linewidth=0.6)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(one), [str(b) for b in sorted(one)])
        ax.set_xlabel("global batch (rows of 64 tokens)")
        ax.legend(fontsize=8)
    left.set_ylabel("training tokens/s (whole job)")
    left.set_ylim(bottom=0)
    right.set_ylabel("speed-up over 1 worker")
    right.set_ylim(1.0, 2.05)
    left.set_title("Throughput, small configuration (5.9 M params)")
    right.set_title("2 workers against 1, same global batch")
    fig.suptitle(
        "benchmarks/train_scaling.py --config docs/bench/small.yaml; Ray Train + DeepSpeed, gloo; "
        "2-core CPU VM (AMD EPYC), 2026-11-27",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(OUT_SCALING, dpi=110)
    print(OUT_SCALING)


if __name__ == "__main__":
    main()
