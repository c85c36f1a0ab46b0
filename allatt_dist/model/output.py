"""Word embeddings and the output distribution, with tied weights.

- No cutoffs: a plain embedding and a full softmax whose weight is the embedding matrix.
- With cutoffs: torch's `AdaptiveLogSoftmaxWithLoss` (Grave et al. 2017) for the output, and an
  adaptive input (Baevski & Auli 2019) that reads the same matrices: the shortlist rows of the
  softmax head are the frequent-word embeddings, and each tail cluster's (down-projection,
  word matrix) pair is reused transposed as the cluster's (embedding, up-projection). torch has
  no adaptive *input* module, which is why this one is written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TiedSoftmax(nn.Module):
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
        logits = F.linear(h, self.weight, self.bias)  # (N,V)
        return F.cross_entropy(logits.float(), target, reduction="none")


class AdaptiveIO(nn.Module):
    """Adaptive input + adaptive softmax sharing their matrices (the WikiText-103 setup)."""

    def __init__(self, vocab_size: int, dim: int, cutoffs: list[int], div: int):
        super().__init__()
        cut = [c for c in cutoffs if c < vocab_size]
        if not cut:
            raise ValueError(f"model.adaptive_cutoffs {cutoffs} leave no tail for a vocabulary of {vocab_size}")
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(dim, vocab_size, cut, div_value=float(div), head_bias=True)
        self.cutoffs = cut + [vocab_size]
        self.scale = math.sqrt(dim)
        nn.init.normal_(self.asm.head.weight, std=0.02)
        for proj, words in self.asm.tail:
            nn.init.normal_(proj.weight, std=0.02)
            nn.init.normal_(words.weight, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,T) ids -> (B,T,D), each word through its cluster's tied matrices."""
        out = x.new_zeros(*x.shape, self.asm.in_features, dtype=self.asm.head.weight.dtype)  # (B,T,D)
        lo = 0
        for i, hi in enumerate(self.cutoffs):
            sel = (x >= lo) & (x < hi)  # (B,T)
            if sel.any():
                ids = x[sel] - lo  # (n,)
                if i == 0:
                    out[sel] = F.embedding(ids, self.asm.head.weight)  # (n,D) shortlist rows
                else:
                    proj, words = self.asm.tail[i - 1]
                    small = F.embedding(ids, words.weight)  # (n, D/div^i)
                    out[sel] = F.linear(small, proj.weight.t())  # (n,D)
            lo = hi
        return out * self.scale

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        return self.asm.log_prob(h.reshape(b * t, d).float()).view(b, t, -1)  # (B,T,V)

    def nll(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """h: (N, D), target: (N,) -> (N,) negative log-likelihood (fp32)."""
        return -self.asm(h.float(), target).output


def make_output(vocab_size: int, dim: int, cutoffs: list[int], div: int) -> nn.Module:
    if cutoffs and min(cutoffs) < vocab_size:
        return AdaptiveIO(vocab_size, dim, cutoffs, div)
    return TiedSoftmax(vocab_size, dim)
