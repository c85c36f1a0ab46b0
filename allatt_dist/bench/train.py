"""Measure-train: one training step of the dense model (forward with the memory, backward, Adam),
the fast model and, with --baseline, the straightforward one, their steps interleaved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from allatt_dist.bench.context import BenchContext


@dataclass
class TrainStep:
    """A warmed-up training step, ready to be timed."""

    run: Callable[[], None]
    optimizer: str  # "fused", "foreach" or "default"
    state_bytes: int  # parameters and optimizer state, allocated before the step


def make_train_step(ctx: BenchContext, fast: bool) -> TrainStep:
    """Build the model (seeded), its optimizer and a stream of training batches; warm the step up
    (falling back to eager if a compiled step fails)."""
    import torch

    from allatt_dist.data.stream import LMStream
    from allatt_dist.model.transformer import LanguageModel
    from allatt_dist.perf import adam, compiled, warm

    mc, opts = ctx.cfg.model, ctx.opts
    torch.manual_seed(opts.seed)
    model = LanguageModel(mc, ctx.vocab).to(ctx.device).train()
    ctx.set_paths(model, fast)
    opt, kind = adam(model, ctx.cfg.train.lr, fast and not opts.plain_adam)
    stream = LMStream(ctx.splits["train"], ctx.train_batch, mc.seq_len)
    state: dict[str, Any] = {"mems": None}

    def make_step(loss_fn):
        def step():
            x, y, reset = stream.next_batch()
            x, y = x.to(ctx.device), y.to(ctx.device)  # (B,T) each
            opt.zero_grad(set_to_none=True)
            with ctx.amp(fast):
                loss, mems = loss_fn(x, y, None if reset else state["mems"])
            loss.backward()
            opt.step()
            state["mems"] = mems

        return step

    eager = make_step(model.loss)
    if fast and opts.compile:
        step = warm(ctx.train_warmup, make_step(compiled(model.loss, ctx.note)), eager, ctx.note)
    else:
        step = warm(ctx.train_warmup, eager, None, ctx.note)
    state_bytes = sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )
    return TrainStep(step, kind, state_bytes)


def measure_train(ctx: BenchContext) -> dict[str, Any]:
    """The training fields of the result: tokens/s, step times, peak memory, state bytes and
    optimizer of the fast model at the top level, the baseline's under "baseline"."""
    from allatt_dist.perf import summary

    steps = {"fast": make_train_step(ctx, True)}
    if ctx.opts.baseline:
        steps["baseline"] = make_train_step(ctx, False)
    times = ctx.time_interleaved({name: s.run for name, s in steps.items()})
    tokens = ctx.train_batch * ctx.cfg.model.seq_len
    res: dict[str, Any] = {}
    for name, s in steps.items():
        peak = ctx.peak_memory(s.run)
        stats = summary(times[name])
        out = res if name == "fast" else res.setdefault("baseline", {})
        out["train_tokens_per_s"] = tokens / (stats["median"] / 1e3)
        out["train_step_ms"] = stats
        out["train_peak_mem_bytes"] = peak
        out["train_state_bytes"] = s.state_bytes
        out["optimizer"] = s.optimizer
        out["dtype"] = ctx.opts.dtype if name == "fast" else ctx.opts.precision_of_baseline
    return res
