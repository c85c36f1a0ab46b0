"""Split attention: a small biased context part and an unbiased persistent part, one softmax.

A query's keys fall in two groups. The M+T context keys carry the relative-position term and the
causal mask, so their scores need a (.., T, M+T) bias; the N persistent keys carry neither (they
are shared by every query of a head). Rather than padding the bias to (.., T, M+T+N) and running
one attention call over everything, the two groups are scored separately and joined under a single
normaliser:

    m = max(max_j S_c, max_n S_p);   Z = sum_j exp(S_c - m) + sum_n exp(S_p - m)
    O = (exp(S_c - m) / Z) @ V  +  (exp(S_p - m) / Z) @ PV

which is exactly softmax([S_c, S_p]) @ [V; PV] (the log-sum-exp merge of the two parts, with the
normaliser written out). Tensors are laid out heads first, (H, B, T, .), so that the persistent
part is one (B*T, dh) x (dh, N) GEMM per head, with no copy of the persistent vectors per batch row.

`SplitAttention` is a custom autograd function: the backward is written by hand from the saved
exponentials (dS = P * (dP - rowsum(dO * O)), the usual softmax backward), which keeps the saved
state to the two exponential tensors and avoids every concatenation. In bf16 the exponentials stay
bf16 and the normaliser is accumulated in fp32.

The persistent part can instead go through torch's fused CPU attention kernel, which returns the
part's log-sum-exp and, given the merged output and merged log-sum-exp in its backward, yields
exactly the joint-softmax gradients of that part (`SplitAttentionKernel`; CPU only, and slower
there than the GEMM version, which batches all B*T queries of a head against the shared keys).
"""

from __future__ import annotations

import torch


def _row_max(s_c: torch.Tensor, s_p: torch.Tensor, h: int) -> torch.Tensor:
    """Max over both parts of each query row, (H, B*T, 1)."""
    m_c = s_c.amax(dim=-1).view(h, -1, 1)  # (H,B*T,1)
    m_p = s_p.amax(dim=-1, keepdim=True)  # (H,B*T,1)
    return torch.maximum(m_c, m_p)


class SplitAttention(torch.autograd.Function):
    """softmax([qs k^T + bias, qs pk^T]) @ [v; pv], heads first.

    qs: (H,B,T,dh) queries, already offset by the content bias u and scaled by 1/sqrt(dh);
    k, v: (H,B,K,dh); bias: (H,B,T,K) scaled position term, -inf where masked;
    pk, pv: (H,N,dh) persistent keys and values as the scores use them (qs @ pk^T is the score).
    Returns (H,B,T,dh).
    """

    @staticmethod
    def forward(ctx, qs, k, v, bias, pk, pv):
        h, b, t, dh = qs.shape
        k_len = k.shape[2]
        q3 = qs.reshape(h * b, t, dh)  # (H*B,T,dh)
        s_c = torch.baddbmm(bias.reshape(h * b, t, k_len), q3, k.reshape(h * b, k_len, dh).transpose(1, 2))  # (HB,T,K)
        s_p = torch.bmm(qs.reshape(h, b * t, dh), pk.transpose(1, 2))  # (H,B*T,N)
        m = _row_max(s_c, s_p, h)  # (H,B*T,1)
        e_c = s_c.view(h, b * t, k_len).sub_(m).exp_()  # (H,B*T,K), in place
        e_p = s_p.sub_(m).exp_()  # (H,B*T,N), in place
        # Z in fp32 (torch accumulates bf16 sums in fp32; the two partial sums are added in fp32).
        z = e_c.sum(-1, keepdim=True).float() + e_p.sum(-1, keepdim=True).float()  # (H,B*T,1)
        inv = z.reciprocal().to(qs.dtype)  # (H,B*T,1)
        # The exponentials stay unnormalised: dividing the (T, dh) output by Z is cheaper than
        # dividing the (T, K+N) weights, and the backward folds 1/Z into dO the same way.
        o = torch.bmm(e_c.view(h * b, t, k_len), v.reshape(h * b, k_len, dh)).view(h, b * t, dh)  # (H,B*T,dh)
        o = o.baddbmm_(e_p, pv).mul_(inv)  # (H,B*T,dh) softmax-weighted values
        ctx.save_for_backward(qs, k, v, pk, pv, e_c, e_p, o, inv)
        return o.view(h, b, t, dh)

    @staticmethod
    def backward(ctx, d_o):
        qs, k, v, pk, pv, e_c, e_p, o, inv = ctx.saved_tensors
        h, b, t, dh = qs.shape
        k_len = k.shape[2]
        d_o = (d_o * inv.view(h, b, t, 1)).contiguous().view(h, b * t, dh)  # (H,B*T,dh) dO / Z
        dd = (d_o * o).sum(-1, keepdim=True)  # (H,B*T,1) rowsum(dO*O) / Z
        do3 = d_o.view(h * b, t, dh)  # (HB,T,dh)
        v3, k3, q3 = (x.reshape(h * b, -1, dh) for x in (v, k, qs))  # (HB,K,dh), (HB,K,dh), (HB,T,dh)
        # dS = P * (dP - rowsum(dO*O)) = E * (dP/Z - rowsum(dO*O)/Z), with P = E/Z
        ds_c = torch.bmm(do3, v3.transpose(1, 2)).view(h, b * t, k_len)  # (H,B*T,K) dP_c / Z
        ds_c = ds_c.sub_(dd).mul_(e_c).view(h * b, t, k_len)  # (HB,T,K) dS_c
        ds_p = torch.bmm(d_o, pv.transpose(1, 2)).sub_(dd).mul_(e_p)  # (H,B*T,N) dS_p
        d_bias = ds_c.view(h, b, t, k_len) if ctx.needs_input_grad[3] else None  # (H,B,T,K)
        d_q = torch.bmm(ds_c, k3).view(h, b * t, dh)  # (H,B*T,dh)
        d_q = d_q.baddbmm_(ds_p, pk).view(h, b, t, dh)  # (H,B,T,dh)
        d_k = torch.bmm(ds_c.transpose(1, 2), q3).view(h, b, k_len, dh)  # (H,B,K,dh)
        d_v = torch.bmm(e_c.view(h * b, t, k_len).transpose(1, 2), do3).view(h, b, k_len, dh)  # (H,B,K,dh)
        q2 = qs.reshape(h, b * t, dh)  # (H,B*T,dh)
        d_pk = torch.bmm(ds_p.transpose(1, 2), q2)  # (H,N,dh)
        d_pv = torch.bmm(e_p.transpose(1, 2), d_o)  # (H,N,dh)
        return d_q, d_k, d_v, d_bias, d_pk, d_pv


class SplitAttentionKernel(torch.autograd.Function):
    """`SplitAttention` with the persistent part through torch's fused CPU attention kernel.

    The kernel returns the persistent part's output and log-sum-exp; the context part is computed
    explicitly and the two are merged by log-sum-exp. Given the merged output and merged
    log-sum-exp, the kernel's backward recomputes the joint probabilities of the persistent keys,
    so its gradients are those of the single softmax. Same arguments as `SplitAttention`.
    """

    @staticmethod
    def forward(ctx, qs, k, v, bias, pk, pv):
        h, b, t, dh = qs.shape
        k_len = k.shape[2]
        q3 = qs.reshape(h * b, t, dh)  # (HB,T,dh)
        s_c = torch.baddbmm(bias.reshape(h * b, t, k_len), q3, k.reshape(h * b, k_len, dh).transpose(1, 2))  # (HB,T,K)
        lse_c = torch.logsumexp(s_c, dim=-1, keepdim=True)  # (HB,T,1)
        qb = qs.transpose(0, 1)  # (B,H,T,dh) view
        pk_b, pv_b = pk[None].expand(b, -1, -1, -1), pv[None].expand(b, -1, -1, -1)  # (B,H,N,dh) views
        o_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb, pk_b, pv_b, 0.0, False, scale=1.0)
        lse_p = lse_p.transpose(0, 1).reshape(h * b, t, 1).to(lse_c.dtype)  # (HB,T,1)
        lse = torch.logaddexp(lse_c, lse_p)  # (HB,T,1)
        p_c = s_c.sub_(lse).exp_()  # (HB,T,K) joint probabilities of the context keys
        o = torch.bmm(p_c, v.reshape(h * b, k_len, dh))  # (HB,T,dh)
        o += o_p.transpose(0, 1).reshape(h * b, t, dh) * (lse_p - lse).exp()  # (HB,T,dh)
        o = o.view(h, b, t, dh)  # (H,B,T,dh)
        ctx.save_for_backward(qs, k, v, pk, pv, p_c, o, lse)
        return o

    @staticmethod
    def backward(ctx, d_o):
        qs, k, v, pk, pv, p_c, o, lse = ctx.saved_tensors
        h, b, t, dh = qs.shape
        k_len = k.shape[2]
        d_o = d_o.contiguous()  # (H,B,T,dh)
        do3 = d_o.view(h * b, t, dh)  # (HB,T,dh)
        dd = (do3 * o.view(h * b, t, dh)).sum(-1, keepdim=True)  # (HB,T,1)
        v3, k3, q3 = (x.reshape(h * b, -1, dh) for x in (v, k, qs))  # (HB,K,dh), (HB,K,dh), (HB,T,dh)
        ds_c = torch.bmm(do3, v3.transpose(1, 2)).sub_(dd).mul_(p_c)  # (HB,T,K)
        d_bias = ds_c.view(h, b, t, k_len) if ctx.needs_input_grad[3] else None  # (H,B,T,K)
        d_k = torch.bmm(ds_c.transpose(1, 2), q3).view(h, b, k_len, dh)  # (H,B,K,dh)
        d_v = torch.bmm(p_c.transpose(1, 2), do3).view(h, b, k_len, dh)  # (H,B,K,dh)
        lse_b = lse.view(h, b, t).transpose(0, 1)  # (B,H,T)
        pk_b, pv_b = pk[None].expand(b, -1, -1, -1), pv[None].expand(b, -1, -1, -1)  # (B,H,N,dh)
        dq_p, dpk, dpv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_o.transpose(0, 1), qs.transpose(0, 1), pk_b, pv_b, o.transpose(0, 1), lse_b.float(), 0.0, False, scale=1.0
        )  # (B,H,T,dh), (B,H,N,dh), (B,H,N,dh)
        d_q = torch.bmm(ds_c, k3).view(h, b, t, dh) + dq_p.transpose(0, 1)  # (H,B,T,dh)
        return d_q, d_k, d_v, d_bias, dpk.sum(0), dpv.sum(0)
