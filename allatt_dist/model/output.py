"""Word embeddings and the output distribution, with tied weights.

- No cutoffs: a plain embedding and a full softmax whose weight is the embedding matrix.
- With cutoffs: torch's `AdaptiveLogSoftmaxWithLoss` (Grave et al. 2017) holds the output's
  parameters and gives full distributions (`log_prob`), and an adaptive input (Baevski & Auli
  2019) reads the same matrices: the shortlist rows of the softmax head are the frequent-word
  embeddings, and each tail cluster's (down-projection, word matrix) pair is reused transposed as
  the cluster's (embedding, up-projection). torch has no adaptive *input* module, which is why
  this one is written here; the training NLL is also computed here (`AdaptiveIO.nll` says why).
- With `proj` (`model.adaptive_proj`, the authors' code): a d x d projection before the shortlist on
  each side (input: embedding row, then projection; output: projection, then the shortlist rows;
  the two are separate matrices, the cluster logits read h itself) and a bias on every tail
  cluster's words. The full distribution then comes from `_log_probs_proj`, not torch's module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul on `x`'s device (x's own dtype when autocast is off)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _linear_nll(h, weight, bias, target, keep: bool):
    """nll (N,) fp32 of the logits h W^T + b, computed in the compute dtype; with `keep`, also what
    the backward needs: the unnormalised exponentials (V,N), the normaliser (1,N) fp32, and h, W
    as used."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
        # Logits transposed, (V, N): the GEMM with the long vocabulary dimension first runs
        # markedly faster on CPU, and the per-row reductions become cheap reductions over dim 0.
        logits = torch.addmm(bias[:, None], weight, h.t())  # (V,N)
        picked = logits.gather(0, target[None, :]).float()  # (1,N)
        m = logits.amax(dim=0, keepdim=True)  # (1,N)
        e = logits.sub_(m).exp_()  # (V,N), in place
        z = e.sum(dim=0, keepdim=True).float()  # (1,N), accumulated in fp32 by torch
        nll = (m.float() + z.log() - picked).squeeze(0)  # (N,) fp32
    return nll, ((e, z, h, weight) if keep else None)


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row NLL of softmax(h W^T + b) at `target`, the logits never leaving the compute dtype.

    Same math as `cross_entropy(linear(h, W, b).float(), target)`. The forward keeps only the
    exponentials (written over the logits buffer) and the normaliser Z; the backward turns them in
    place into (softmax - onehot) * g, i.e. exp * (g / Z) minus g at the target, and runs the
    three products. Z is accumulated in fp32 (torch's reductions do that for bf16 too).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target):
        nll, (e, z, h_c, w_c) = _linear_nll(h, weight, bias, target, keep=True)
        ctx.save_for_backward(h_c, w_c, e, z, target)
        return nll

    @staticmethod
    def backward(ctx, g):
        h, weight, e, z, target = ctx.saved_tensors
        gd = g.to(e.dtype)  # (N,)
        d = e.mul_((g[None, :] / z).to(e.dtype))  # (V,N) softmax * g, in place: e is not needed again
        cols = torch.arange(d.shape[1], device=d.device)  # (N,)
        d[target, cols] -= gd  # (V,N) (softmax - onehot) * g; one entry per column (scatter_add_ copies bf16)
        d_h = d.t() @ weight if ctx.needs_input_grad[0] else None  # (N,D)
        d_w = d @ h if ctx.needs_input_grad[1] else None  # (V,D)
        d_b = d.sum(1) if ctx.needs_input_grad[2] else None  # (V,)
        return d_h, d_w, d_b, None


def linear_cross_entropy(h, weight, bias, target) -> torch.Tensor:
    """(N,) fp32 NLL; through `LinearCrossEntropy` when a gradient is wanted, else forward only."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad):
        return LinearCrossEntropy.apply(h, weight, bias, target)
    return _linear_nll(h, weight, bias, target, keep=False)[0]


class TiedSoftmax(nn.Module):
    fused = True  # False: the plain linear + cross_entropy (the benchmark baseline)

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * 0.02)  # (V, D)
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # (V,)
        self.scale = math.sqrt(dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight) * self.scale  # (B,T,D)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.weight, self.bias)  # (B,T,V)
        return torch.log_softmax(logits.float(), dim=-1)

    def nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h: (N, D), target: (N,) -> (N,) negative log-likelihood (fp32)."""
        if self.fused:
            return linear_cross_entropy(h, self.weight, self.bias, target)  # (N,)
        logits = F.linear(h, self.weight, self.bias)  # (N,V)
        return F.cross_entropy(logits.float(), target, reduction="none")


AUTO_COVERAGE = (0.8, 0.95)  # model.adaptive_cutoffs "auto": the share of train tokens each cutoff's ids cover


def auto_cutoffs(counts: np.ndarray) -> list[int]:
    """`model.adaptive_cutoffs: auto` from the train split's count of each id (V,): the head holds the first ids
    (a word vocabulary's are the most frequent; a BPE's merges come roughly by frequency) up to those covering 80%
    of the train tokens, the next cluster up to 95%, the tail the rest. Each cutoff is in [1, V-1], repeats
    dropped, so any vocabulary of 2 or more types gets at least a head and a tail."""
    vocab = int(counts.shape[0])
    if vocab < 2:
        raise ValueError(f"model.adaptive_cutoffs auto: a vocabulary of {vocab} type(s) has no clusters")
    cum = np.cumsum(counts, dtype=np.float64)  # (V,)
    cut = [min(vocab - 1, max(1, int(np.searchsorted(cum, f * cum[-1])) + 1)) for f in AUTO_COVERAGE]
    return sorted(set(cut))


def resolve_cutoffs(cutoffs: list[int] | list[float] | str, vocab_size: int) -> list[int]:
    """Cutoffs as token ids: fractions of the vocabulary (0.05, 0.3) rounded to ids, so one recipe fits any
    vocabulary size (a subword tokenizer's, data.vocab_size); ids as given. `auto` is resolved from the corpus
    when a run is planned (plan.py), never here."""
    if cutoffs == "auto":
        raise ValueError("model.adaptive_cutoffs auto is resolved from the train split when a run starts")
    if not any(isinstance(c, float) for c in cutoffs):
        return list(cutoffs)
    ids = [max(1, round(c * vocab_size)) for c in cutoffs]
    if sorted(set(ids)) != ids or ids[-1] >= vocab_size:
        raise ValueError(f"model.adaptive_cutoffs {cutoffs} give no distinct clusters for a vocabulary of {vocab_size}")
    return ids


class AdaptiveIO(nn.Module):
    """Adaptive input + adaptive softmax sharing their matrices (the WikiText-103 setup)."""

    def __init__(self, vocab_size: int, dim: int, cutoffs: list[int], div: int, proj: bool = False):
        super().__init__()
        cut = [c for c in resolve_cutoffs(cutoffs, vocab_size) if c < vocab_size]
        if not cut:
            raise ValueError(f"model.adaptive_cutoffs {cutoffs} leave no tail for a vocabulary of {vocab_size}")
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(dim, vocab_size, cut, div_value=float(div), head_bias=True)
        self.cutoffs = cut + [vocab_size]
        self.scale = math.sqrt(dim)
        nn.init.normal_(self.asm.head.weight, std=0.02)
        for down, words in self.asm.tail:
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(words.weight, std=0.02)
        self.short_in = self.short_out = self.tail_bias = None
        if proj:
            self.short_in = nn.Linear(dim, dim, bias=False)  # embedding row -> input
            self.short_out = nn.Linear(dim, dim, bias=False)  # h -> shortlist logits' input
            nn.init.normal_(self.short_in.weight, std=dim**-0.5)
            nn.init.normal_(self.short_out.weight, std=dim**-0.5)
            sizes = [self.cutoffs[i + 1] - self.cutoffs[i] for i in range(len(self.cutoffs) - 1)]
            self.tail_bias = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N,D) -> (N, shortlist + clusters) head logits."""
        head = self.asm.head
        if self.short_in is None:
            return head(h)  # (N, short + C)
        short = self.cutoffs[0]
        w, b = head.weight, head.bias
        s = F.linear(self.short_out(h), w[:short], b[:short])  # (N, short)
        return torch.cat([s, F.linear(h, w[short:], b[short:]).to(s.dtype)], dim=-1)  # (N, short + C)

    def tail_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h: (n,D) -> (n, size of tail cluster i), i from 1."""
        out = self.asm.tail[i - 1](h)  # (n, size_i)
        return out if self.tail_bias is None else out + self.tail_bias[i - 1].to(out.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,T) ids -> (B,T,D), each word through its cluster's tied matrices."""
        out = x.new_zeros(*x.shape, self.asm.in_features, dtype=self.asm.head.weight.dtype)  # (B,T,D)
        lo = 0
        for i, hi in enumerate(self.cutoffs):
            sel = (x >= lo) & (x < hi)  # (B,T)
            if sel.any():
                ids = x[sel] - lo  # (n,)
                if i == 0:
                    rows = F.embedding(ids, self.asm.head.weight)  # (n,D) shortlist rows
                    out[sel] = rows if self.short_in is None else self.short_in(rows).to(out.dtype)  # (n,D)
                else:
                    proj, words = self.asm.tail[i - 1]
                    small = F.embedding(ids, words.weight)  # (n, D/div^i)
                    out[sel] = F.linear(small, proj.weight.t()).to(out.dtype)  # (n,D); autocast: bf16 product
            lo = hi
        return out * self.scale

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        h = h.reshape(b * t, d).to(self.asm.head.weight.dtype)  # (B*T,D) the weights' dtype (fp32 under autocast)
        if self.short_in is not None:
            return self._log_probs_proj(h).view(b, t, -1)  # (B,T,V)
        return self.asm.log_prob(h).float().view(b, t, -1)  # (B,T,V)

    def _log_probs_proj(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N,D) -> (N,V) fp32 log-probabilities, with the projections and tail biases."""
        short = self.cutoffs[0]
        head_lp = torch.log_softmax(self.head_logits(h).float(), dim=-1)  # (N, short + C)
        parts = [head_lp[:, :short]]  # (N, short)
        for i in range(1, len(self.cutoffs)):
            tail_lp = torch.log_softmax(self.tail_logits(i, h).float(), dim=-1)  # (N, size_i)
            parts.append(tail_lp + head_lp[:, short + i - 1 : short + i])  # (N, size_i)
        return torch.cat(parts, dim=-1)  # (N,V)

    def nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h: (N, D), target: (N,) -> (N,) negative log-likelihood (fp32).

        The same value as `AdaptiveLogSoftmaxWithLoss.forward`, computed differently in two ways.
        Every tail cluster is evaluated on every call, on the rows whose target falls in it (none
        included), so the autograd graph does not depend on the batch: DeepSpeed's ZeRO reduces
        gradients bucket by bucket as backward hooks fire (stages 1-2) and gathers weights module by
        module (stage 3), and both need the same graph on every rank (torch's module skips clusters
        with no target, and the ranks' collectives then mismatch). And the products run in the
        weights' dtype (or autocast's) while every log-softmax runs in fp32 (torch's module keeps the
        weights' dtype throughout: bf16 log-probabilities under `deepspeed.precision: bf16`)."""
        asm = self.asm
        h = h.to(asm.head.weight.dtype)  # (N,D); bf16 under DeepSpeed's bf16, fp32 under autocast
        short = self.cutoffs[0]
        bounds = torch.tensor(self.cutoffs[:-1], device=target.device)  # (C,) first id of each tail
        cluster = torch.bucketize(target, bounds, right=True)  # (N,) 0: shortlist, i: tail i
        head_lp = torch.log_softmax(self.head_logits(h).float(), dim=-1)  # (N, short + C) fp32
        head_idx = torch.where(cluster == 0, target, short + cluster - 1)  # (N,) word or its cluster
        lp = head_lp.gather(1, head_idx[:, None]).squeeze(1)  # (N,)
        for i in range(1, len(self.cutoffs)):
            rows = (cluster == i).nonzero().squeeze(1)  # (n_i,) may be empty
            tail_lp = torch.log_softmax(self.tail_logits(i, h.index_select(0, rows)).float(), dim=-1)  # (n_i, size_i)
            rel = target.index_select(0, rows) - self.cutoffs[i - 1]  # (n_i,) id within the cluster
            lp = lp.index_add(0, rows, tail_lp.gather(1, rel[:, None]).squeeze(1))  # (N,)
        return -lp


def make_output(vocab_size: int, dim: int, cutoffs: list[int], div: int, proj: bool = False) -> nn.Module:
    if cutoffs == "auto":
        resolve_cutoffs(cutoffs, vocab_size)  # one line: resolved when a run starts
    if cutoffs and min(cutoffs) < vocab_size:
        return AdaptiveIO(vocab_size, dim, cutoffs, div, proj)
    return TiedSoftmax(vocab_size, dim)
