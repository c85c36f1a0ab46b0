"""An All-attention (or Transformer-XL) language model pruned by allatt-dist, for inference.

A pre-LayerNorm stack of relative multi-head attention (Transformer-XL) with segment memory. In an
All-attention layer each head also attends to N persistent key/value vectors and there is no
feed-forward sublayer; a Transformer-XL layer has a feed-forward sublayer instead. Layers may keep
different numbers of heads; a layer with none adds only its output bias (when it has one).

`logits` are log-probabilities. The memory (`mems`, per layer the inputs of the last positions) is
returned and may be passed back: a long input is read in segments of `seq_len`, each attending over
at most `seq_len + mem_len` positions, and `generate()` feeds one token at a time over that memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_allatt import AllAttConfig


@dataclass
class AllAttOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B,T,V) log-probabilities of the next token
    mems: list[torch.Tensor] | None = None  # per layer (B,M,D)


def sinusoid(k: int, dim: int, device) -> torch.Tensor:
    """Embeddings of the distances k-1 .. 0, (K,D)."""
    dist = torch.arange(k - 1, -1, -1, device=device, dtype=torch.float)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim))
    ang = dist[:, None] * inv[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def masked_keys(t: int, m: int, mem_len: int, same_length: bool, device) -> torch.Tensor:
    """(T,K) True where query i (position m + i) may not see key j: future keys, and with same_length
    keys more than mem_len back."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(m + t, device=device)[None, :]
    masked = j > i + m
    if same_length and mem_len > 0:
        masked = masked | (j < i + m - mem_len)
    return masked


class Attention(nn.Module):
    def __init__(self, cfg: AllAttConfig, heads: int):
        super().__init__()
        d, dh, n = cfg.hidden_dim, cfg.head_dim, cfg.num_persistent
        self.h, self.dh, self.n = heads, dh, n
        self.bias_persistent = cfg.persistent_content_bias
        self.q = nn.Linear(d, heads * dh, bias=False)
        self.kv = nn.Linear(d, 2 * heads * dh, bias=False)
        self.r_proj = nn.Linear(d, heads * dh, bias=False)
        self.out = nn.Linear(heads * dh, d, bias=cfg.attn_out_bias)
        self.r_w_bias = nn.Parameter(torch.zeros(heads, dh))  # u: content bias
        self.r_r_bias = nn.Parameter(torch.zeros(heads, dh))  # v: position bias
        self.pk = nn.Parameter(torch.zeros(heads, n, dh)) if n else None
        self.pv = nn.Parameter(torch.zeros(heads, n, dh)) if n else None

    def forward(self, x, cat, pos, mask):
        """x: (B,T,D) normed queries' inputs; cat: (B,K,D) normed memory + segment; pos: (K,D)."""
        b, t, _ = x.shape
        k_len, m = cat.shape[1], cat.shape[1] - t
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)  # (B,H,T,dh)
        k, v = self.kv(cat).view(b, k_len, 2, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,K,dh)
        r = self.r_proj(pos).view(k_len, self.h, self.dh).transpose(0, 1)  # (H,K,dh), row c: distance K-1-c
        u, w = self.r_w_bias[None, :, None], self.r_r_bias[None, :, None]  # (1,H,1,dh)
        content = (q + u) @ k.transpose(-1, -2)  # (B,H,T,K)
        by_distance = (q + w) @ r.transpose(-1, -2)[None]  # (B,H,T,K): column c is distance K-1-c
        i = torch.arange(t, device=x.device)[:, None]
        j = torch.arange(k_len, device=x.device)[None, :]
        col = (k_len - 1 - (m + i - j)).clamp(0, k_len - 1)  # (T,K) the column of key j's distance
        position = by_distance.gather(-1, col.expand(b, self.h, t, k_len))  # (B,H,T,K)
        scores = (content + position).masked_fill(mask, float("-inf"))
        values = v
        if self.n:
            qp = q + u if self.bias_persistent else q
            persistent = qp @ (self.pk * math.sqrt(self.dh)).transpose(-1, -2)[None]  # (B,H,T,N)
            scores = torch.cat([scores, persistent], dim=-1)  # (B,H,T,K+N)
            values = torch.cat([v, (self.pv * math.sqrt(self.n))[None].expand(b, -1, -1, -1)], dim=2)
        o = torch.softmax(scores / math.sqrt(self.dh), dim=-1) @ values  # (B,H,T,dh)
        return self.out(o.transpose(1, 2).reshape(b, t, self.h * self.dh))  # (B,T,D)


class Block(nn.Module):
    def __init__(self, cfg: AllAttConfig, heads: int):
        super().__init__()
        d = cfg.hidden_dim
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, heads) if heads else None
        self.empty_bias = nn.Parameter(torch.zeros(d)) if cfg.attn_out_bias and not heads else None
        self.ffn = None
        if cfg.ffn_dim:  # indices as saved: 0 norm, 1 in, 2 ReLU, 3 dropout, 4 out
            self.ffn = nn.Sequential(
                nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                nn.Linear(d, cfg.ffn_dim),
                nn.ReLU(),
                nn.Dropout(0.0),
                nn.Linear(cfg.ffn_dim, d),
            )

    def forward(self, h, mem, pos, mask):
        if self.attn is not None:
            normed = self.norm(torch.cat([mem, h], dim=1))  # (B,M+T,D)
            h = h + self.attn(normed[:, mem.shape[1] :], normed, pos, mask)
        elif self.empty_bias is not None:
            h = h + self.empty_bias
        if self.ffn is not None:
            h = h + self.ffn(h)
        return h


class AdaptiveHead(nn.Module):
    """The shortlist head and tail clusters (parameter names as torch's AdaptiveLogSoftmaxWithLoss)."""

    def __init__(self, d: int, cutoffs: list[int], vocab: int, div: int):
        super().__init__()
        self.head = nn.Linear(d, cutoffs[0] + len(cutoffs), bias=True)
        bounds = [*cutoffs, vocab]
        self.tail = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d, d // div ** (i + 1), bias=False),
                nn.Linear(d // div ** (i + 1), bounds[i + 1] - bounds[i], bias=False),
            )
            for i in range(len(cutoffs))
        )


class AdaptiveIO(nn.Module):
    """Adaptive input and adaptive softmax over the same matrices (frequent words get wider vectors)."""

    def __init__(self, cfg: AllAttConfig):
        super().__init__()
        d, cut = cfg.hidden_dim, [c for c in cfg.adaptive_cutoffs if c < cfg.vocab_size]
        self.bounds = [0, *cut, cfg.vocab_size]
        self.asm = AdaptiveHead(d, cut, cfg.vocab_size, cfg.adaptive_div)
        self.short_in = nn.Linear(d, d, bias=False) if cfg.adaptive_proj else None
        self.short_out = nn.Linear(d, d, bias=False) if cfg.adaptive_proj else None
        sizes = [b - a for a, b in zip(self.bounds[1:-1], self.bounds[2:], strict=True)]
        self.tail_bias = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes) if cfg.adaptive_proj else None
        self.scale = math.sqrt(d)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape, self.asm.head.in_features, dtype=self.asm.head.weight.dtype, device=x.device)
        for c, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:], strict=True)):
            sel = (x >= lo) & (x < hi)
            if c == 0:
                rows = F.embedding(x[sel], self.asm.head.weight)
                out[sel] = rows if self.short_in is None else self.short_in(rows)
            else:
                down, words = self.asm.tail[c - 1]
                out[sel] = F.embedding(x[sel] - lo, words.weight) @ down.weight
        return out * self.scale

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        short, w, b = self.bounds[1], self.asm.head.weight, self.asm.head.bias
        hs = h if self.short_out is None else self.short_out(h)
        head = torch.cat([F.linear(hs, w[:short], b[:short]), F.linear(h, w[short:], b[short:])], dim=-1)
        head = torch.log_softmax(head.float(), dim=-1)  # (..., short + clusters)
        parts = [head[..., :short]]
        for c, cluster in enumerate(self.asm.tail):
            logits = cluster(h) if self.tail_bias is None else cluster(h) + self.tail_bias[c]
            parts.append(torch.log_softmax(logits.float(), dim=-1) + head[..., short + c : short + c + 1])
        return torch.cat(parts, dim=-1)


class TiedSoftmax(nn.Module):
    def __init__(self, cfg: AllAttConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.hidden_dim))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.scale = math.sqrt(cfg.hidden_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight) * self.scale

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(h, self.weight, self.bias).float(), dim=-1)


class AllAttForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AllAttConfig
    base_model_prefix = "allatt"
    main_input_name = "input_ids"

    def __init__(self, config: AllAttConfig):
        super().__init__(config)
        self.io = AdaptiveIO(config) if config.adaptive_cutoffs else TiedSoftmax(config)
        self.layers = nn.ModuleList(Block(config, n) for n in config.heads_per_layer)
        self.final_norm = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps) if config.final_norm else None
        rows = config.position_rows
        self.pos_table = nn.Parameter(torch.zeros(rows, config.hidden_dim)) if config.positions == "learned" else None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own memory, `mems`

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def positions(self, k: int, device) -> torch.Tensor:
        if self.pos_table is None:
            return sinusoid(k, self.config.hidden_dim, device)
        return self.pos_table[-k:]

    def segment(self, x: torch.Tensor, mems: list[torch.Tensor] | None):
        """One segment (B,T), T <= seq_len, over the memory -> (log-probs (B,T,V), new memory)."""
        cfg = self.config
        b, t = x.shape
        window = cfg.seq_len + cfg.mem_len
        h = self.io.embed(x)  # (B,T,D)
        if not mems:
            m = cfg.mem_len if cfg.zero_memory_start else 0
            mems = [h.new_zeros(b, m, h.shape[-1]) for _ in self.layers]
        mems = [mem[:, max(0, mem.shape[1] - (window - t)) :] for mem in mems]  # at most `window` keys
        m = mems[0].shape[1]
        pos, mask = self.positions(m + t, x.device), masked_keys(t, m, cfg.mem_len, cfg.same_length, x.device)
        new_mems = []
        for layer, mem in zip(self.layers, mems, strict=True):
            new_mems.append(torch.cat([mem, h], dim=1)[:, max(0, m + t - (window - 1)) :])
            h = layer(h, mem, pos, mask)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.io.log_probs(h), new_mems

    def forward(self, input_ids, mems=None, labels=None, use_cache=None, **kwargs) -> AllAttOutput:
        outs = []
        for chunk in input_ids.split(self.config.seq_len, dim=1):
            lp, mems = self.segment(chunk, mems)
            outs.append(lp)
        logits = torch.cat(outs, dim=1)  # (B,T,V)
        loss = None
        if labels is not None:
            loss = F.nll_loss(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return AllAttOutput(loss=loss, logits=logits, mems=mems if use_cache is not False else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        """With memory from the last step only the newest token is fed."""
        if past_key_values is not None:
            return {"input_ids": input_ids[:, -1:], "mems": past_key_values}
        return {"input_ids": input_ids}
