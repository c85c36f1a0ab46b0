"""Physical pruning of the shared stack (LanguageModel): cut closed heads out of a gated model, layer by layer.

A head is kept when its eval gate is open (gate logit > theta, 0 for the default stretch; see
gates.py). For each layer the kept heads' slices of the q/k/v, position and output projections,
their u/v biases and their persistent vectors are copied into a smaller, ungated model. With
attention output scaling the layer's eval output is multiplied by H / open; that constant is folded
into the output projection, so the pruned model's logits equal the gated model's eval logits.
The built-in families declare `prune_heads` as their pruning (model/families.py).
"""

from __future__ import annotations

import torch

from allatt_dist.model.attention import RelPersistentAttention
from allatt_dist.model.transformer import LanguageModel


def kept_heads(model: LanguageModel) -> list[torch.Tensor]:
    """Per layer, the indices of the heads that survive pruning, (H_l',) long."""
    out = []
    for blk in model.layers:
        if blk.attn is None:
            out.append(torch.zeros(0, dtype=torch.long))
        elif blk.gate is None:
            out.append(torch.arange(blk.num_heads))
        else:
            out.append(torch.nonzero(blk.gate.open_mask().cpu()).flatten())
    return out


def _slice_attention(src: RelPersistentAttention, dst: RelPersistentAttention, idx: torch.Tensor, scale: float):
    h, dh = src.h, src.dh
    cols = (idx[:, None] * dh + torch.arange(dh)[None]).flatten()  # (H'*dh,) rows of each head
    dst.q.weight.copy_(src.q.weight.detach()[cols])  # (H'*dh, D)
    k, v = src.kv.weight.detach().view(2, h * dh, -1)  # 2 x (H*dh, D)
    dst.kv.weight.copy_(torch.cat([k[cols], v[cols]], dim=0))  # (2*H'*dh, D)
    dst.r_proj.weight.copy_(src.r_proj.weight.detach()[cols])  # (H'*dh, D)
    dst.out.weight.copy_(src.out.weight.detach()[:, cols] * scale)  # (D, H'*dh)
    if src.out.bias is not None:
        dst.out.bias.copy_(src.out.bias.detach() * scale)  # (D,) the layer output is scaled whole
    dst.r_w_bias.copy_(src.r_w_bias.detach()[idx])  # (H', dh)
    dst.r_r_bias.copy_(src.r_r_bias.detach()[idx])  # (H', dh)
    if src.n:
        dst.pk.copy_(src.pk.detach()[idx])  # (H', N, dh)
        dst.pv.copy_(src.pv.detach()[idx])  # (H', N, dh)


@torch.no_grad()
def prune_heads(gated: LanguageModel) -> LanguageModel:
    """The stack's pruning: an ungated LanguageModel holding only the open heads, same eval outputs."""
    keep = kept_heads(gated)
    heads = [len(k) for k in keep]
    pruned = LanguageModel(gated.cfg, gated.vocab_size, gates=None, heads_per_layer=heads, layout=gated.layout)
    pruned.to(next(gated.parameters()).dtype)
    src_state = gated.weight_state_dict()
    # Everything that is not a per-head tensor (embeddings, norms, FFN) is copied as is.
    own = pruned.state_dict()
    for name, tensor in src_state.items():
        if ".attn." not in name and name in own:
            own[name].copy_(tensor)
    for src_blk, dst_blk, idx in zip(gated.layers, pruned.layers, keep, strict=True):
        if dst_blk.attn is None:
            if dst_blk.empty_bias is not None:  # every head closed: the bias alone (x 0 under output scaling)
                src_bias = src_blk.empty_bias if src_blk.attn is None else src_blk.attn.out.bias
                dst_blk.empty_bias.copy_(src_bias.detach() * (0.0 if src_blk.output_scaling else 1.0))
            continue
        scale = src_blk.full_heads / len(idx) if src_blk.output_scaling else 1.0
        _slice_attention(src_blk.attn, dst_blk.attn, idx, scale)
    return pruned.eval()
