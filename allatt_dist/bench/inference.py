"""Measure-inference: one eval forward of a segment (targets scored, memory carried in) for the dense
model, for physically pruned models at each sparsity and, with --baseline, the straightforward dense
model; the forwards interleaved.

The pruned models come from a gated copy whose log_alpha is set to a seeded random open/closed
pattern (`perf.head_patterns`: the same heads each run; a higher sparsity closes a superset of the
heads of a lower one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from allatt_dist.bench.context import BenchContext


def make_forward(ctx: BenchContext, model, segs: list, fast: bool) -> Callable[[], None]:
    """Fill the model's memory with all but the last segment, and return the warmed-up timed
    forward of the last one (falling back to eager if a compiled forward fails)."""
    import torch

    from allatt_dist.perf import compiled, warm

    dev = ctx.device
    model.to(dev).eval()
    ctx.set_paths(model, fast)
    mems = None
    with torch.no_grad(), ctx.amp(fast):
        for x, y in segs[:-1]:
            mems = model(x.to(dev), mems, y.to(dev)).mems
    x_t, y_t = (s.to(dev) for s in segs[-1])  # the timed segment, (B,T) each

    def make_fwd(fn):
        def fwd():
            with torch.no_grad(), ctx.amp(fast):
                fn(x_t, mems, y_t)

        return fwd

    steps = ctx.opts.warmup + 1
    if fast and ctx.opts.compile:
        return warm(steps, make_fwd(compiled(model, ctx.note)), make_fwd(model), ctx.note)
    return warm(steps, make_fwd(model), None, ctx.note)


def build_models(ctx: BenchContext) -> dict[float, Any]:
    """Sparsity -> model: 0.0 the dense model, the others pruned from seeded head patterns."""
    import torch

    from allatt_dist.model.transformer import LanguageModel
    from allatt_dist.perf import head_patterns, pruned_model

    mc, seed = ctx.cfg.model, ctx.opts.seed
    torch.manual_seed(seed)
    models = {0.0: LanguageModel(mc, ctx.vocab)}
    sparsities = sorted({s for s in ctx.opts.sparsities if s > 0})
    for s, mask in head_patterns(mc.num_layers, mc.num_heads, sparsities, seed).items():
        models[s] = pruned_model(ctx.cfg, ctx.vocab, mask, seed)
    return models


def measure_inference(ctx: BenchContext) -> dict[str, Any]:
    """The inference fields of the result, keyed by str(sparsity): latency (median ms and stats),
    peak memory, parameters, heads per layer, FLOPs per token and the latency-against-FLOPs check;
    the baseline's dense figures under "baseline"."""
    import statistics

    import torch

    from allatt_dist.data.stream import eval_segments
    from allatt_dist.model.transformer import LanguageModel, count_params
    from allatt_dist.perf import flops_per_token, summary

    mc, b_eval = ctx.cfg.model, ctx.eval_batch
    segs = list(eval_segments(ctx.splits["valid"], b_eval, mc.seq_len, max_segments=ctx.fill + 1))
    models = build_models(ctx)
    fwds: dict[Any, Callable[[], None]] = {s: make_forward(ctx, m, segs, True) for s, m in models.items()}
    if ctx.opts.baseline:
        torch.manual_seed(ctx.opts.seed)
        fwds["baseline"] = make_forward(ctx, LanguageModel(mc, ctx.vocab), segs, False)
    times = ctx.time_interleaved(fwds)
    peaks = {key: ctx.peak_memory(fwd) for key, fwd in fwds.items()}

    fields = ("infer_ms", "infer_ms_stats", "infer_peak_mem_bytes", "params", "heads_per_layer")
    res: dict[str, Any] = {f: {} for f in (*fields, "infer_flops_per_token", "infer_check")}
    f0 = flops_per_token(mc, ctx.vocab, models[0.0].heads_per_layer, b_eval)
    ms0 = statistics.median(times[0.0]) * 1e3
    for s, m in models.items():
        key, st = str(s), summary(times[s])
        fl = flops_per_token(mc, ctx.vocab, m.heads_per_layer, b_eval)
        res["infer_ms"][key] = st["median"]
        res["infer_ms_stats"][key] = st
        res["infer_peak_mem_bytes"][key] = peaks[s]
        res["params"][key] = count_params(m)
        res["heads_per_layer"][key] = list(m.heads_per_layer)
        res["infer_flops_per_token"][key] = fl
        ratio, bound = st["median"] / ms0, 1.1 * fl / f0
        res["infer_check"][key] = {"latency_ratio": ratio, "flops_ratio": fl / f0, "within_1.1x": ratio <= bound}
    if ctx.opts.baseline:
        st = summary(times["baseline"])
        res["baseline"] = {
            "infer_ms_dense": st["median"],
            "infer_ms_dense_stats": st,
            "infer_peak_mem_bytes_dense": peaks["baseline"],
        }
    return res
