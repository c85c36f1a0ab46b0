"""Report: the result's header (device, precision, the model and run configuration, FLOPs per
token), the rates derived from the measurements (TFLOP/s, MFU, speed-up), the JSON file and the
short table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from allatt_dist.bench.context import BenchContext


def header(ctx: BenchContext) -> dict[str, Any]:
    """The fields every result starts with; `config` records what was run."""
    import torch

    from allatt_dist.perf import cpu_name, flops_per_token

    mc, opts, dev = ctx.cfg.model, ctx.opts, ctx.device
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "dtype": opts.dtype,
        "config": {
            "architecture": mc.architecture,
            "num_layers": mc.num_layers,
            "hidden_dim": mc.hidden_dim,
            "num_heads": mc.num_heads,
            "num_persistent": mc.num_persistent,
            "seq_len": mc.seq_len,
            "mem_len": mc.mem_len,
            "adaptive_cutoffs": list(mc.adaptive_cutoffs),
            "vocab_size": ctx.vocab,
            "tokens": "random" if opts.vocab_size else "corpus",
            "train_batch": ctx.train_batch,
            "eval_batch": ctx.eval_batch,
            "impl": opts.impl,
            "fused_loss": not opts.unfused_loss,
            "adam": "default" if opts.plain_adam else "fused",
            "compile": opts.compile,
            "threads": torch.get_num_threads(),
            "clock": "cpu" if opts.cpu_clock else "wall",
            "torch": torch.__version__,
            "repeats": opts.repeats,
            "warmup": ctx.train_warmup,
            "seed": opts.seed,
        },
        "flops_per_token": flops_per_token(mc, ctx.vocab, batch=ctx.train_batch),
    }
    res["train_flops_per_token"] = 3 * res["flops_per_token"]
    return res


def train_rates(res: dict[str, Any], ctx: BenchContext) -> dict[str, Any]:
    """Achieved training TFLOP/s, the device's known peak and MFU (None where the peak is unknown),
    and with a baseline the speed-up over it; from the header and `measure_train`'s fields."""
    from allatt_dist.perf import peak_tflops

    tflops = res["train_flops_per_token"] * res["train_tokens_per_s"] / 1e12
    peak = peak_tflops(res["device"], ctx.opts.dtype) if ctx.device.type == "cuda" else None
    out: dict[str, Any] = {"train_tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None}
    if "baseline" in res:
        out["train_speedup"] = res["train_tokens_per_s"] / res["baseline"]["train_tokens_per_s"]
    return out


def compile_outcome(res: dict[str, Any], ctx: BenchContext) -> None:
    """Whether the model really ran compiled, and torch.compile's error where it fell back to eager."""
    error = ctx.note.get("compile_error")
    res["config"]["compiled"] = ctx.opts.compile and error is None
    if error is not None:
        res["compile_error"] = error


def write_json(res: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")


def format_table(res: dict[str, Any]) -> str:
    """A short human-readable summary of `run_bench`'s result."""

    def mib(x):
        return "n/a" if x is None else f"{x / 2**20:.1f} MiB"

    c = res["config"]
    lines = [
        f"device {res['device']} ({c['threads']} threads), dtype {res['dtype']}, impl {c['impl']}, "
        f"compiled {c['compiled']}, clock {c['clock']}",
        f"model {c['num_layers']}x{c['hidden_dim']}, {c['num_heads']} heads, N={c['num_persistent']}, "
        f"T={c['seq_len']}, M={c['mem_len']}, V={c['vocab_size']}; "
        f"forward {res['flops_per_token'] / 1e6:.2f} MFLOP/token",
    ]
    if "train_tokens_per_s" in res:
        mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        lines.append(
            f"train (batch {c['train_batch']}): {res['train_tokens_per_s']:.0f} tokens/s, step "
            f"{res['train_step_ms']['median']:.1f} ms, peak {mib(res['train_peak_mem_bytes'])}, "
            f"{res['train_tflops']:.3f} TFLOP/s, MFU {mfu}"
        )
        if "baseline" in res:
            b = res["baseline"]
            lines.append(
                f"  baseline ({b['dtype']}): {b['train_tokens_per_s']:.0f} tokens/s, "
                f"step {b['train_step_ms']['median']:.1f} ms, "
                f"peak {mib(b['train_peak_mem_bytes'])}; speed-up {res['train_speedup']:.2f}x"
            )
    lines.append(f"inference (batch {c['eval_batch']}), per segment:")
    lines.append("  sparsity  heads            params      ms   latency/dense  flops/dense")
    for s, ms in res["infer_ms"].items():
        chk = res["infer_check"][s]
        lines.append(
            f"  {float(s):8.2f}  {str(res['heads_per_layer'][s]):15s} {res['params'][s]:9d} {ms:7.2f}"
            f"   {chk['latency_ratio']:13.3f}  {chk['flops_ratio']:11.3f}"
        )
    if "baseline" in res and "infer_ms_dense" in res["baseline"]:
        lines.append(f"  baseline dense: {res['baseline']['infer_ms_dense']:.2f} ms")
    return "\n".join(lines)
