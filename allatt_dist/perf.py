"""Measurement helpers for `allatt-dist bench`: the FLOPs formula, known peaks, peak memory, timing.

No Ray, no DeepSpeed; torch is imported inside the functions that need it, so importing this module
(through the command line) stays cheap.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Dense peak TFLOP/s by (device name fragment, dtype); the first match wins. bf16 is the dense
# tensor-core figure; fp32 the non-tensor-core one (torch keeps TF32 off for matmuls by default).
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
]


# ---- FLOPs ------------------------------------------------------------------------------------------


def flops_per_token(cfg, vocab_size: int, heads_per_layer: list[int] | None = None, batch: int = 1) -> float:
    """Forward matmul FLOPs (2 per multiply-add) per token of a segment with a full memory.

    Per layer the architecture's family says (`layer_flops`; for All-attention and Transformer-XL
    see model/families.py and docs/performance.md), plus the output layer: 2dV (full softmax) or,
    adaptive, the head plus every tail cluster in full (+ 4d^2 for the two shortlist projections with
    `model.adaptive_proj`). Masked scores count (they are computed). Norms, softmax and the optimizer
    are left out.
    """
    from allatt_dist.model.registry import get_family

    d = cfg.hidden_dim
    family = get_family(cfg.architecture)
    heads = heads_per_layer if heads_per_layer is not None else [cfg.num_heads] * cfg.num_layers
    total = float(sum(family.layer_flops(cfg, h, batch) for h in heads))
    cut = [c for c in cfg.adaptive_cutoffs if c < vocab_size]
    if not cut:
        return total + 2 * d * vocab_size
    total += 2 * d * (cut[0] + len(cut)) + (4 * d * d if getattr(cfg, "adaptive_proj", False) else 0)
    edges = cut + [vocab_size]
    for j in range(len(cut)):
        hsz = d // (cfg.adaptive_div ** (j + 1))
        total += 2 * (d * hsz + hsz * (edges[j + 1] - edges[j]))
    return total


def peak_tflops(device_name: str, dtype: str) -> float | None:
    for frag, peaks in PEAK_TFLOPS:
        if frag.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


# ---- measurement helpers ------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of one region: CUDA allocator peak, or CPU resident-set growth (see module doc)."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.rss0 = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
            self.rss0 = self._status("VmRSS")
        except OSError:
            self.rss0 = None
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            hwm = self._status("VmHWM")
            self.peak = hwm - self.rss0 if self.rss0 is not None and hwm is not None else None
        return False


def summary(times: list[float]) -> dict[str, Any]:
    ms = sorted(t * 1e3 for t in times)
    return {"median": statistics.median(ms), "min": ms[0], "max": ms[-1], "all": [round(x, 3) for x in ms]}


def clock(device, cpu_time: bool = False):
    """Wall-clock seconds (after a CUDA sync), or with `cpu_time` this process's CPU seconds: on a
    shared machine the latter counts only the work done, not the time other processes held the cores
    (meaningful with one thread; several threads add their spin-waits)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.process_time() if cpu_time else time.perf_counter()


def head_patterns(num_layers: int, num_heads: int, sparsities: list[float], seed: int) -> dict[float, list]:
    """Per sparsity, per layer, the open-head mask: one seeded permutation of all heads, closed in order."""
    import torch

    total = num_layers * num_heads
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    out = {}
    for s in sparsities:
        open_ = torch.ones(total, dtype=torch.bool)
        open_[order[: round(s * total)]] = False
        out[s] = [open_[i * num_heads : (i + 1) * num_heads] for i in range(num_layers)]
    return out


def pruned_model(cfg, vocab_size: int, masks: list, seed: int):
    """A gated model with its gates set open exactly at `masks` (logits theta +- 3), physically pruned."""
    import torch

    from allatt_dist.model.pruning import prune_model
    from allatt_dist.model.registry import build_model

    torch.manual_seed(seed)
    gated = build_model(cfg.model, vocab_size, gates=cfg.gates)
    for gate, mask in zip(gated.gates, masks, strict=True):
        gate.set_open(mask)
    return prune_model(gated)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def adam(model, lr: float, fast: bool):
    """torch Adam: fused where this torch/device offers it (fast path), else torch's default."""
    import torch

    if fast:
        try:
            return torch.optim.Adam(model.parameters(), lr=lr, fused=True), "fused"
        except (RuntimeError, ValueError, TypeError):
            return torch.optim.Adam(model.parameters(), lr=lr, foreach=True), "foreach"
    return torch.optim.Adam(model.parameters(), lr=lr), "default"


def compiled(fn, note: dict):
    """torch.compile(fn), or fn itself (with a warning) when compile is unavailable."""
    import torch

    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # compile itself failed: continue eager
        compile_failed(e, note)
        return fn


def compile_failed(err: Exception, note: dict) -> None:
    msg = " ".join(str(err).split())[:300] or type(err).__name__
    note["compile_error"] = msg
    print(f"allatt-dist bench: warning: torch.compile failed ({msg}); continuing eager", file=sys.stderr)


def warm(steps: int, run, eager, note: dict):
    """Run `steps` untimed calls; if a compiled callable fails, switch to `eager` and warm that."""
    try:
        for _ in range(steps):
            run()
        return run
    except Exception as e:
        if eager is None:
            raise
        compile_failed(e, note)
        for _ in range(steps):
            eager()
        return eager
