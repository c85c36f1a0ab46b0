"""Transformer-XL relative multi-head attention with per-head persistent key/value vectors.

For head h, a query at absolute position i attends, under one softmax, to
  - context keys j (memory + current segment): (q_i + u_h)·k_j + (q_i + v_h)·r_{i-j}
  - its own N persistent keys p_n:             (q_i + u_h)·(sqrt(d_h) p_n), or with
    `persistent_content_bias=False` (the authors' code) q_i·(sqrt(d_h) p_n); the fast paths then
    pass the bare query and move u_h·k_j into the context keys' bias
with values v_j and sqrt(N)·pv_n (the All-attention reparameterisation, Sukhbaatar et al. 2019).
Three implementations of the same math, chosen per module by `impl`:
  - "split" (default): heads-first layout, the biased context part and the unbiased persistent part
    scored separately and joined under one softmax normaliser (`fastattn.SplitAttention`); no
    (B, H, T, K+N) bias and no per-batch copy of the persistent vectors.
  - "split_kernel": the same, but the persistent part goes through torch's fused CPU attention
    kernel and is merged by log-sum-exp (CPU only; slower than "split" on CPU, kept to measure).
  - "dense_bias": the position term padded with zeros to a (B, H, T, K+N) bias and one
    `scaled_dot_product_attention` call over context and persistent keys (the first version; kept
    as the benchmark baseline, and used whenever attention dropout is active in training).
`reference_attention` spells the math out with an explicit softmax; the tests compare all three
implementations against it.

Heads may differ in number per layer (a pruned layer keeps `num_heads` <= the config's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from allatt_dist.model.fastattn import SplitAttention, SplitAttentionKernel

IMPLS = ("split", "split_kernel", "dense_bias")


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Map scores against relative distances to scores against key positions.

    x: (B, H, T, K) with K = M + T keys, column c holding distance K-1-c (positions K-1 .. 0).
    Returns y with y[..., i, j] = x[..., i, j + T-1-i]: the score of query i (absolute M + i)
    against key j at distance M + i - j. Entries with j > M + i (future keys) hold garbage and
    are always masked. Done with the pad-and-reshape trick: no gather, no copy beyond one pad.
    """
    b, h, t, k = x.shape
    pad = x.new_zeros(b, h, t, 1)
    y = torch.cat([pad, x], dim=-1).view(b, h, k + 1, t)[:, :, 1:]  # (B,H,K,T)
    return y.reshape(b, h, t, k)  # (B,H,T,K)


def attention_mask(t: int, m: int, mem_len: int, same_length: bool, device: torch.device) -> torch.Tensor:
    """True where query i (absolute m + i) may NOT attend context key j, (T, M+T) bool.

    Keys after the query are always masked. With `same_length` (and mem_len > 0) a query also skips
    keys more than `mem_len` positions back, so once the memory is full (m == mem_len) every query
    sees exactly mem_len + 1 context keys; while it fills (the first segments after a reset) the
    queries see their whole causal context, as in Transformer-XL.
    """
    k = m + t
    i = torch.arange(t, device=device)[:, None]  # (T,1)
    j = torch.arange(k, device=device)[None, :]  # (1,K)
    masked = j > i + m  # future
    if same_length and mem_len > 0:
        masked = masked | (j < i + m - mem_len)  # distance m + i - j > mem_len
    return masked  # (T,K)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(K,) float positions -> (K, dim) sinusoidal embeddings."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float) / dim))
    ang = positions[:, None].float() * inv[None, :]  # (K, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)  # (K, dim)


class RelPersistentAttention(nn.Module):
    """One layer's heads: q/k/v/r/o projections, u/v biases, persistent vectors (N may be 0)."""

    impl = "split"  # or "split_kernel", "dense_bias"; see the module docstring and `set_attention_impl`

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        head_dim: int,
        num_persistent: int,
        dropatt: float,
        out_bias: bool = False,
        persistent_content_bias: bool = True,
    ):
        super().__init__()
        # False: persistent keys are scored with the bare query, q·p (the authors' code), not (q + u)·p.
        self.pu = persistent_content_bias or not num_persistent
        self.d, self.h, self.dh, self.n = hidden_dim, num_heads, head_dim, num_persistent
        inner = num_heads * head_dim
        # q and kv are separate modules, each called as a module: ZeRO-3 gathers a module's weights only
        # around its own forward, so no weight is read directly from outside its module.
        self.q = nn.Linear(hidden_dim, inner, bias=False)
        self.kv = nn.Linear(hidden_dim, 2 * inner, bias=False)
        self.r_proj = nn.Linear(hidden_dim, inner, bias=False)
        self.out = nn.Linear(inner, hidden_dim, bias=out_bias)
        self.r_w_bias = nn.Parameter(torch.zeros(num_heads, head_dim))  # u, (H, dh)
        self.r_r_bias = nn.Parameter(torch.zeros(num_heads, head_dim))  # v, (H, dh)
        if num_persistent:
            # Stored unscaled; used as sqrt(dh)*pk and sqrt(N)*pv so both start at unit scale.
            self.pk = nn.Parameter(torch.randn(num_heads, num_persistent, head_dim) / math.sqrt(head_dim))
            self.pv = nn.Parameter(torch.randn(num_heads, num_persistent, head_dim) / math.sqrt(num_persistent))
        else:
            self.register_parameter("pk", None)
            self.register_parameter("pv", None)
        self.dropatt = dropatt
        nn.init.normal_(self.q.weight, std=0.02)
        nn.init.normal_(self.kv.weight, std=0.02)
        nn.init.normal_(self.r_proj.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)

    def project(self, x: torch.Tensor, cat: torch.Tensor, pos: torch.Tensor):
        """x: (B,T,D) normed segment; cat: (B,K,D) normed memory+segment; pos: (K,D) embeddings."""
        b, t, _ = x.shape
        k_len = cat.shape[1]
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)  # (B,H,T,dh)
        kv = self.kv(cat).view(b, k_len, 2, self.h, self.dh)  # (B,K,2,H,dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,K,dh) each
        r = self.r_proj(pos).view(k_len, self.h, self.dh).transpose(0, 1)  # (H,K,dh)
        return q, k, v, r

    def position_bias(self, q: torch.Tensor, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(q + v)·r, shifted to key positions, masked, and scaled: (B,H,T,K)."""
        bd = torch.matmul(q + self.r_r_bias[None, :, None, :], r.transpose(-1, -2)[None])  # (B,H,T,K)
        bd = rel_shift(bd) / math.sqrt(self.dh)  # (B,H,T,K)
        return bd.masked_fill(mask, float("-inf"))

    def persistent(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pk = self.pk.to(dtype) * math.sqrt(self.dh)  # (H,N,dh)
        pv = self.pv.to(dtype) * math.sqrt(self.n)  # (H,N,dh)
        return pk, pv

    def forward(self, x, cat, pos, mask, gate=None, scale=None) -> torch.Tensor:
        """Returns the layer's attention output (B,T,D); `gate` (H,) multiplies each head."""
        if self.impl == "dense_bias" or (self.training and self.dropatt > 0):
            return self.dense_bias_forward(x, cat, pos, mask, gate, scale)
        return self.split_forward(x, cat, pos, mask, gate, scale)

    def split_forward(self, x, cat, pos, mask, gate=None, scale=None) -> torch.Tensor:
        """Heads-first split attention (no dropout on the attention weights)."""
        b, t, _ = x.shape
        h, dh, k_len = self.h, self.dh, cat.shape[1]
        inv = 1.0 / math.sqrt(dh)
        q = self.q(x).view(b, t, h, dh).permute(2, 0, 1, 3).contiguous()  # (H,B,T,dh)
        kv = self.kv(cat).view(b, k_len, 2, h, dh).permute(2, 3, 0, 1, 4).contiguous()  # (2,H,B,K,dh)
        k, v = kv.unbind(0)  # (H,B,K,dh) each
        r = self.r_proj(pos).view(k_len, h, dh).transpose(0, 1)  # (H,K,dh)
        u = self.r_w_bias.to(q.dtype)  # (H,dh)
        qv = (q + self.r_r_bias.to(q.dtype)[:, None, None, :]).mul_(inv)  # (H,B,T,dh)
        bd = torch.bmm(qv.view(h, b * t, dh), r.transpose(1, 2))  # (H,B*T,K)
        bias = rel_shift(bd.view(h, b, t, k_len))  # (H,B,T,K)
        if self.pu:
            qu = (q + u[:, None, None, :]).mul_(inv)  # (H,B,T,dh)
        else:  # bare query for every key; u·k_j joins the context keys' bias instead
            qu = q * inv  # (H,B,T,dh)
            bias = bias + torch.bmm(k.view(h, b * k_len, dh), u[:, :, None] * inv).view(h, b, 1, k_len)  # (H,B,T,K)
        bias = bias.masked_fill(mask, float("-inf"))  # (H,B,T,K)
        if self.n:
            pk, pv = self.persistent(q.dtype)  # (H,N,dh) each
            fn = SplitAttentionKernel if self.impl == "split_kernel" else SplitAttention
            o = fn.apply(qu, k, v, bias, pk, pv)  # (H,B,T,dh)
        else:
            o = F.scaled_dot_product_attention(qu, k, v, attn_mask=bias, scale=1.0)  # (H,B,T,dh)
        if gate is not None:
            o = o * gate.to(o.dtype)[:, None, None, None]  # (H,B,T,dh)
        y = self.out(o.permute(1, 2, 0, 3).reshape(b, t, h * dh))  # (B,T,D)
        return y * scale if scale is not None else y

    def dense_bias_forward(self, x, cat, pos, mask, gate=None, scale=None) -> torch.Tensor:
        """One SDPA call over [context; persistent] keys with a zero-padded (B,H,T,K+N) bias."""
        b, t, _ = x.shape
        q, k, v, r = self.project(x, cat, pos)
        bias = self.position_bias(q, r, mask)  # (B,H,T,K)
        if self.pu:
            qu = q + self.r_w_bias[None, :, None, :]  # (B,H,T,dh)
        else:  # bare query for every key; u·k_j joins the context keys' bias instead
            qu = q  # (B,H,T,dh)
            uk = torch.matmul(k, self.r_w_bias[None, :, :, None]).transpose(-1, -2)  # (B,H,1,K) u·k_j
            bias = bias + uk / math.sqrt(self.dh)  # (B,H,T,K)
        if self.n:
            pk, pv = self.persistent(k.dtype)
            k = torch.cat([k, pk[None].expand(b, -1, -1, -1)], dim=2)  # (B,H,K+N,dh)
            v = torch.cat([v, pv[None].expand(b, -1, -1, -1)], dim=2)  # (B,H,K+N,dh)
            bias = F.pad(bias, (0, self.n))  # (B,H,T,K+N), zero bias on persistent slots
        p = self.dropatt if self.training else 0.0
        o = F.scaled_dot_product_attention(qu, k, v, attn_mask=bias.to(qu.dtype), dropout_p=p)  # (B,H,T,dh)
        return self.merge_heads(o, gate, scale)

    def merge_heads(self, o: torch.Tensor, gate, scale) -> torch.Tensor:
        """o: (B,H,T,dh) -> gated, scaled, projected (B,T,D)."""
        if gate is not None:
            o = o * gate.to(o.dtype)[None, :, None, None]  # (B,H,T,dh)
        b, _, t, _ = o.shape
        y = self.out(o.transpose(1, 2).reshape(b, t, self.h * self.dh))  # (B,T,D)
        return y * scale if scale is not None else y


def reference_attention(attn: RelPersistentAttention, x, cat, pos, mask, gate=None, scale=None):
    """The same layer with explicit scores and softmax (fp32 check for the SDPA path)."""
    b, t, _ = x.shape
    m = cat.shape[1] - t
    q, k, v, r = attn.project(x, cat, pos)
    ac = torch.matmul(q + attn.r_w_bias[None, :, None, :], k.transpose(-1, -2))  # (B,H,T,K)
    bd = torch.empty_like(ac)
    rq = torch.matmul(q + attn.r_r_bias[None, :, None, :], r.transpose(-1, -2)[None])  # (B,H,T,K)
    k_len = k.shape[2]
    for i in range(t):  # explicit relative indexing, no shift trick
        for j in range(k_len):
            dist = m + i - j
            bd[:, :, i, j] = rq[:, :, i, k_len - 1 - dist] if 0 <= dist < k_len else 0.0
    scores = ((ac + bd) / math.sqrt(attn.dh)).masked_fill(mask, float("-inf"))  # (B,H,T,K)
    values = v
    if attn.n:
        pk, pv = attn.persistent(k.dtype)
        qp = q + attn.r_w_bias[None, :, None, :] if attn.pu else q  # (B,H,T,dh)
        ps = torch.matmul(qp, pk.transpose(-1, -2)[None])  # (B,H,T,N)
        scores = torch.cat([scores, ps / math.sqrt(attn.dh)], dim=-1)  # (B,H,T,K+N)
        values = torch.cat([v, pv[None].expand(b, -1, -1, -1)], dim=2)  # (B,H,K+N,dh)
    o = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B,H,T,dh)
    return attn.merge_heads(o, gate, scale)


def set_attention_impl(model: nn.Module, impl: str) -> None:
    """Switch every attention layer of `model` to `impl` (one of `IMPLS`)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    for mod in model.modules():
        if isinstance(mod, RelPersistentAttention):
            mod.impl = impl
