"""Perplexity over a whole split, memory carried across segments, deterministic."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from allatt_dist.data.stream import eval_segments
from allatt_dist.model.transformer import LanguageModel


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean per-token negative log-likelihood (nats)
    tokens: int  # targets scored


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int | None = None,
    max_segments: int | None = None,
    progress: bool = False,
    rows: tuple[int, int] | None = None,
) -> EvalResult:
    """Score every next-token target of `tokens` (or the first `max_segments` segments).

    `rows=(rank, world)` scores only every world-th row of the layout, starting at rank: the
    data-parallel split used during training (sum the per-rank totals to get the whole).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq_len = seq_len or model.cfg.seq_len
    total, count, mems = 0.0, 0, None
    segments = eval_segments(tokens, batch_size, seq_len, max_segments)
    if progress:
        from tqdm import tqdm

        n_seg = math.ceil(math.ceil((len(tokens) - 1) / batch_size) / seq_len)
        segments = tqdm(segments, total=min(n_seg, max_segments or n_seg), desc="eval", leave=False)
    for x, y in segments:
        if rows is not None:
            x, y = x[rows[0] :: rows[1]], y[rows[0] :: rows[1]]  # (B/world, T)
        out = model(x.to(device), mems, y.to(device))  # nll (B,T)
        mems = out.mems
        total += float(out.nll.double().sum())
        count += int((y != -100).sum())
    model.train(was_training)
    nll = total / max(count, 1)
    return EvalResult(ppl=math.exp(min(nll, 50.0)), nll=nll, tokens=count)
