"""Incremental decoding and scoring of a language model of any registered family.

The cache is the model's own Transformer-XL memory, kept longer: per layer, the inputs of the last
`window - 1` positions (`window` = seq_len + mem_len, the most keys one query saw in training). Each
new token runs through the layers once and attends over the cache and itself; the prompt is never
run again. The model's mask (causal, and with `same_length` at most mem_len back) is the one a full
forward pass applies, so within the window the log-probabilities equal a full forward's over the
same tokens (tests/test_generate.py). A prompt is fed in chunks of at most seq_len, each chunk
attending over at most `window` keys, the evaluation's segments-with-memory.

Requests are decoded together when their prompts have the same length (`generate_batch`); each row
keeps its own sampling settings and its own seeded random stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from allatt_dist.model.registry import FamilyModel


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh seed, reported with the result so the text can be reproduced

    def check(self, limit: int | None = None) -> None:
        """ValueError naming the field and what is allowed."""
        if self.max_new_tokens < 1 or (limit is not None and self.max_new_tokens > limit):
            most = f" and at most {limit}" if limit is not None else ""
            raise ValueError(f"max_new_tokens must be at least 1{most}, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every word), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generated:
    ids: list[int]  # the new tokens
    seed: int
    log_probs: list[torch.Tensor] = field(default_factory=list)  # (V,) per step, when asked for


def window(model: FamilyModel) -> int:
    """Keys one query may attend: the current segment plus the memory, as in training."""
    return model.cfg.seq_len + model.cfg.mem_len


class Decoder:
    """Decoding state of B sequences of equal length: the per-layer cache of their last positions."""

    def __init__(self, model: FamilyModel):
        self.model, self.window = model, window(model)
        self.cache: list[torch.Tensor] | None = None  # per layer (B, <= window-1, D)

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,T) -> log-probabilities of the next token at every fed position, (B,T,V)."""
        outs = []
        for chunk in ids.split(self.model.cfg.seq_len, dim=1):  # (B,<=seq_len)
            t = chunk.shape[1]
            mems = self.cache
            if mems is not None and mems[0].shape[1] + t > self.window:
                mems = [m[:, m.shape[1] - (self.window - t) :] for m in mems]  # (B,window-t,D)
            out = self.model(chunk, mems or None, mem_keep=self.window - 1)
            self.cache = out.mems
            outs.append(out.log_probs)  # (B,t,V)
        return torch.cat(outs, dim=1)  # (B,T,V)


def pick(log_probs: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token from a (V,) log-probability row under `s`."""
    if s.temperature == 0.0:
        return int(log_probs.argmax())
    logits = log_probs.float() / s.temperature  # (V,)
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (V,)
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (V,), (V,)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)  # (V,)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # mass before this word already >= p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))  # (V,)
    probs = torch.softmax(logits, dim=-1)  # (V,)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_batch(
    model: FamilyModel, prompts: list[list[int]], settings: list[Sampling], keep_log_probs: bool = False
) -> list[Generated]:
    """Decode every prompt (token ids, all of one length) under its own settings, in one batch."""
    if len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError("generate_batch takes non-empty prompts of one length")
    device = next(model.parameters()).device
    seeds = [s.seed if s.seed is not None else random.SystemRandom().randrange(2**63) for s in settings]
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    results = [Generated([], seed) for seed in seeds]
    dec = Decoder(model)
    lp = dec.feed(torch.tensor(prompts, device=device))[:, -1].cpu()  # (B,V)
    for step in range(max(s.max_new_tokens for s in settings)):
        nxt = []
        for i, (s, res) in enumerate(zip(settings, results, strict=True)):
            if step < s.max_new_tokens:
                res.ids.append(pick(lp[i], s, gens[i]))
                if keep_log_probs:
                    res.log_probs.append(lp[i])
            nxt.append(res.ids[-1] if step < s.max_new_tokens else 0)  # a finished row idles on any id
        if step + 1 == max(s.max_new_tokens for s in settings):
            break
        lp = dec.feed(torch.tensor(nxt, device=device)[:, None])[:, -1].cpu()  # (B,V)
    return results


def generate(model: FamilyModel, prompt: list[int], s: Sampling, keep_log_probs: bool = False) -> Generated:
    return generate_batch(model, [prompt], [s], keep_log_probs)[0]


@torch.no_grad()
def score_batch(model: FamilyModel, texts: list[list[int]]) -> list[tuple[float, int]]:
    """(summed NLL in nats, targets) of each token list, every token after the first a target; the lists
    are right-padded into one batch and fed in segments of seq_len with memory, as `evaluate` does."""
    device = next(model.parameters()).device
    n = max(len(t) for t in texts)
    x = torch.zeros(len(texts), n, dtype=torch.long)  # (B,N)
    y = torch.full((len(texts), n), -100, dtype=torch.long)  # (B,N); padding and each last token ignored
    for i, t in enumerate(texts):
        x[i, : len(t)] = torch.tensor(t)
        y[i, : len(t) - 1] = torch.tensor(t[1:])
    totals = torch.zeros(len(texts), dtype=torch.float64)  # (B,)
    mems = None
    for xs, ys in zip(x.split(model.cfg.seq_len, 1), y.split(model.cfg.seq_len, 1), strict=True):
        out = model(xs.to(device), mems, ys.to(device))
        mems = out.mems
        totals += out.nll.sum(1).double().cpu()  # (B,)
    return [(float(totals[i]), len(t) - 1) for i, t in enumerate(texts)]
