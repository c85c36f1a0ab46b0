"""The prepared bench run that the training and inference measurements share: the device, the
tokens, the precision and fast-path switches of the fast model and the baseline, and the clock."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from allatt_dist.bench.options import BenchOptions
from allatt_dist.config import RunConfig
from allatt_dist.errors import UserError


@dataclass
class BenchContext:
    cfg: RunConfig
    opts: BenchOptions
    device: Any  # torch.device
    splits: dict[str, Any]  # "train"/"valid" -> 1-D int64 token ids
    vocab: int
    note: dict[str, str] = field(default_factory=dict)  # "compile_error" once torch.compile failed

    @property
    def train_batch(self) -> int:
        return self.opts.batch_size or self.cfg.train.batch_size

    @property
    def eval_batch(self) -> int:
        return self.opts.eval_batch_size or self.cfg.data.eval_batch_size

    @property
    def fill(self) -> int:
        """Segments until the Transformer-XL memory is full."""
        mc = self.cfg.model
        return math.ceil(mc.mem_len / mc.seq_len) if mc.mem_len else 0

    @property
    def train_warmup(self) -> int:
        """Untimed training steps: `--warmup` plus those filling the memory."""
        return self.opts.warmup + self.fill

    def amp(self, fast: bool = True):
        """The precision of the fast model, or of the baseline (--baseline-dtype)."""
        import torch

        bf16 = (self.opts.dtype if fast else self.opts.precision_of_baseline) == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def set_paths(self, model, fast: bool) -> None:
        """Fast: the fast paths with --impl / --unfused-loss; else the straightforward baseline."""
        from allatt_dist.model.attention import set_attention_impl
        from allatt_dist.model.output import TiedSoftmax
        from allatt_dist.model.transformer import use_fast_paths

        use_fast_paths(model, fast)
        if fast:
            set_attention_impl(model, self.opts.impl)
            for mod in model.modules():
                if isinstance(mod, TiedSoftmax):
                    mod.fused = not self.opts.unfused_loss

    def time_interleaved(self, calls: dict[Hashable, Callable[[], None]]) -> dict[Hashable, list[float]]:
        """`--repeats` rounds, each timing every call once in turn (so all see the same machine load)."""
        from allatt_dist.perf import clock

        times: dict[Hashable, list[float]] = {k: [] for k in calls}
        for _ in range(self.opts.repeats):
            for key, call in calls.items():
                t0 = clock(self.device, self.opts.cpu_clock)
                call()
                times[key].append(clock(self.device, self.opts.cpu_clock) - t0)
        return times

    def peak_memory(self, call: Callable[[], None]) -> int | None:
        """Peak memory of one more call (see `perf.PeakMemory`)."""
        from allatt_dist.perf import PeakMemory

        with PeakMemory(self.device) as pm:
            call()
        return pm.peak


def prepare(cfg: RunConfig, opts: BenchOptions) -> BenchContext:
    """Set the threads, pick and check the device, load the tokens (or draw random ids)."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device")
    if opts.cpu_clock and dev.type != "cpu":
        raise UserError("--clock cpu measures CPU time: use it with --device cpu")
    if opts.impl == "split_kernel" and dev.type != "cpu":
        raise UserError("--impl split_kernel runs on CPU only")
    ctx = BenchContext(cfg, opts, dev, {}, 0)
    if opts.vocab_size:  # no corpus: seeded uniform ids (e.g. on a machine without the data)
        import numpy as np

        rng = np.random.default_rng(opts.seed)
        n = max(ctx.train_batch, ctx.eval_batch) * cfg.model.seq_len * 64 + 1
        ctx.splits = {s: rng.integers(0, opts.vocab_size, n, dtype=np.int64) for s in ("train", "valid")}
        ctx.vocab = opts.vocab_size
    else:
        from allatt_dist.data.corpus import load_corpus

        corpus = load_corpus(cfg.data, splits=("train", "valid"))
        ctx.splits = {s: corpus.tokens(s) for s in ("train", "valid")}
        ctx.vocab = len(corpus.vocab)
    return ctx
