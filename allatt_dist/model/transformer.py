"""The language models: All-attention (no feed-forward) and the Transformer-XL baseline.

Both are pre-LayerNorm stacks of relative attention with segment-level memory; they differ only in
persistent vectors (All-attention) versus a feed-forward sublayer (Transformer-XL), which their
family declares (`StackLayout`, model/stack.py). With a
`GateConfig` every layer's heads get a Hard Concrete gate; with `heads_per_layer` the model is a
physically pruned one (layers may differ in head count; a layer with none is a pure residual, plus
the output projection's bias when it has one). The `ModelConfig` switches (final norm, learned
positions, zero-memory start, word dropout, ...; `model.variant` presets them) are read here and in
attention.py / output.py; docs/model.md, "Variants". Single-device code: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.model.attention import (
    RelPersistentAttention,
    attention_mask,
    reference_attention,
    set_attention_impl,
    sinusoid,
)
from allatt_dist.model.gates import GatedModule, HeadGate
from allatt_dist.model.output import TiedSoftmax, make_output
from allatt_dist.model.stack import StackLayout, stack_layout


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, num_heads: int, gates: GateConfig | None, layout: StackLayout):
        super().__init__()
        persistent = layout.num_persistent
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.num_heads, self.full_heads = num_heads, cfg.num_heads
        self.attn = (
            RelPersistentAttention(
                cfg.hidden_dim,
                num_heads,
                cfg.head_dim,
                persistent,
                cfg.dropatt,
                out_bias=cfg.attn_out_bias,
                persistent_content_bias=cfg.persistent_content_bias,
            )
            if num_heads
            else None
        )
        # A pruned layer without heads still adds the output projection's bias (when it has one):
        # the gated layer's output with every head closed (0 under output scaling; set by pruning).
        self.empty_bias = nn.Parameter(torch.zeros(cfg.hidden_dim)) if cfg.attn_out_bias and not num_heads else None
        self.gate = HeadGate(num_heads, gates) if gates is not None and num_heads else None
        self.output_scaling = bool(gates is not None and gates.output_scaling)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = None
        if layout.ffn_dim:
            self.ffn = nn.Sequential(
                nn.LayerNorm(cfg.hidden_dim),
                nn.Linear(cfg.hidden_dim, layout.ffn_dim),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(layout.ffn_dim, cfg.hidden_dim),
            )

    def gate_values(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(z (H,), detached output scale H/open) for this forward pass; (None, None) when ungated."""
        if self.gate is None:
            return None, None
        z = self.gate()  # (H,)
        if not self.output_scaling:
            return z, None
        n_open = z.detach().sum()
        scale = torch.where(n_open > 0, self.full_heads / n_open.clamp(min=1), torch.zeros_like(n_open))
        return z, scale

    def forward(self, h: torch.Tensor, mem: torch.Tensor | None, pos, mask, reference: bool = False):
        """h: (B,T,D) layer input; mem: (B,M,D) previous segment's inputs to this layer."""
        if self.attn is not None:
            cat = h if mem is None or mem.shape[1] == 0 else torch.cat([mem, h], dim=1)  # (B,M+T,D)
            normed = self.norm(cat)  # (B,M+T,D)
            x = normed[:, -h.shape[1] :]  # (B,T,D)
            z, scale = self.gate_values()
            if reference:
                y = reference_attention(self.attn, x, normed, pos, mask, z, scale)  # (B,T,D)
            else:  # through __call__, so module hooks (e.g. ZeRO-3 parameter gathering) run
                y = self.attn(x, normed, pos, mask, z, scale)  # (B,T,D)
            h = h + self.drop(y)  # (B,T,D)
        elif self.empty_bias is not None:
            h = h + self.drop(self.empty_bias.to(h.dtype))  # (B,T,D)
        if self.ffn is not None:
            h = h + self.drop(self.ffn(h))  # (B,T,D)
        return h


@dataclass
class LMOutput:
    nll: torch.Tensor | None  # (B,T) per-token NLL (0 where the target is ignored), when targets given
    log_probs: torch.Tensor | None  # (B,T,V), when no targets given
    mems: list[torch.Tensor]  # per layer (B,M,D), detached


class LanguageModel(GatedModule):
    """All-attention or Transformer-XL LM over word ids, with Transformer-XL memory. `layout`: what a
    layer holds besides its heads (default: that of `cfg.architecture`'s family)."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        gates: GateConfig | None = None,
        heads_per_layer: list[int] | None = None,
        layout: StackLayout | None = None,
    ):
        super().__init__()
        heads = heads_per_layer or [cfg.num_heads] * cfg.num_layers
        if len(heads) != cfg.num_layers or any(not 0 <= n <= cfg.num_heads for n in heads):
            raise ValueError(f"heads_per_layer {heads} does not fit {cfg.num_layers} layers of {cfg.num_heads}")
        self.cfg, self.vocab_size, self.heads_per_layer = cfg, vocab_size, list(heads)
        self.layout = layout or stack_layout(cfg)
        self.io = make_output(vocab_size, cfg.hidden_dim, cfg.adaptive_cutoffs, cfg.adaptive_div, cfg.adaptive_proj)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, n, gates, self.layout) for n in heads)
        self.final_norm = nn.LayerNorm(cfg.hidden_dim) if cfg.final_norm else nn.Identity()
        self._share_rel_bias(cfg, heads)
        if cfg.positions == "learned":  # row r holds distance rows-1-r, as the sinusoid's order
            bound = cfg.hidden_dim**-0.5
            self.pos_table = nn.Parameter(torch.empty(cfg.position_rows, cfg.hidden_dim).uniform_(-bound, bound))
        else:
            self.register_parameter("pos_table", None)

    def forward(
        self,
        x: torch.Tensor,
        mems: list[torch.Tensor] | None = None,
        target: torch.Tensor | None = None,
        reference: bool = False,
        mem_keep: int | None = None,
    ) -> LMOutput:
        """x: (B,T) ids; target: (B,T) ids or -100 (ignored); `reference` uses the explicit softmax;
        `mem_keep`: positions the returned memory keeps (default mem_len; generation keeps its whole window)."""
        b, t = x.shape
        h = self.drop(self._word_dropout(x, self.io.embed(x)))  # (B,T,D), in the weights' dtype (bf16/fp16 under DS)
        if not mems and self.cfg.zero_memory_start and self.cfg.mem_len:
            mems = [h.new_zeros(b, self.cfg.mem_len, h.shape[2]) for _ in self.layers]  # L x (B,M,D)
        m = 0 if not mems else mems[0].shape[1]
        k = m + t
        pos = self.drop(self._positions(k, h.dtype, x.device))  # (K,D)
        mask = attention_mask(t, m, self.cfg.mem_len, self.cfg.same_length, x.device)  # (T,K)
        new_mems = []
        for i, layer in enumerate(self.layers):
            mem = mems[i] if mems else None
            new_mems.append(self._next_mem(mem, h, mem_keep))
            h = layer(h, mem, pos, mask, reference)  # (B,T,D)
        h = self.drop(self.final_norm(h))  # (B,T,D)
        if self.cfg.output_dropout_twice:  # the authors' All-attention: drop, then drop_o (all_transformer.py)
            h = self.drop(h)  # (B,T,D)
        if target is None:
            return LMOutput(None, self.io.log_probs(h), new_mems)
        flat, tgt = h.reshape(b * t, -1), target.reshape(b * t)  # (B*T,D), (B*T,)
        keep = tgt != -100  # (B*T,)
        # Every row is scored (ignored ones against id 0) and the ignored ones zeroed afterwards:
        # no data-dependent shapes, so no host sync and no graph break under torch.compile.
        nll = torch.where(keep, self.io.nll(flat, tgt.masked_fill(~keep, 0)), 0.0)  # (B*T,) fp32
        return LMOutput(nll.view(b, t), None, new_mems)

    def _share_rel_bias(self, cfg: ModelConfig, heads: list[int]) -> None:
        """`model.shared_rel_bias` (the authors' Transformer-XL): one u and one v, (H, dh) each, held here
        and read by every layer's attention as its own r_w_bias / r_r_bias (not registered there, so
        the state and the optimizer hold them once). A pruned model (heads differ per layer) keeps
        per-layer copies of its heads' rows instead: pruning slices them like any per-head tensor."""
        if not cfg.shared_rel_bias or any(n != cfg.num_heads for n in heads):
            return
        first = self.layers[0].attn
        self.rel_u, self.rel_v = first.r_w_bias, first.r_r_bias  # registered here, once
        for layer in self.layers:
            del layer.attn.r_w_bias, layer.attn.r_r_bias
            object.__setattr__(layer.attn, "r_w_bias", self.rel_u)  # a plain attribute: not a parameter there
            object.__setattr__(layer.attn, "r_r_bias", self.rel_v)

    def _positions(self, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Embeddings of the distances k-1 .. 0, (K,D): the sinusoid, or the last k rows of the table."""
        if self.pos_table is None:
            return sinusoid(torch.arange(k - 1, -1, -1, device=device), self.cfg.hidden_dim).to(dtype)  # (K,D)
        if k > self.pos_table.shape[0]:
            raise ValueError(f"{k} context positions exceed the learned table's {self.pos_table.shape[0]} rows")
        return self.pos_table[-k:].to(dtype)  # (K,D)

    def _word_dropout(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Training: drop whole word types (every occurrence of a dropped id in this batch is zeroed),
        scaling the kept ones by 1/(1-p). x: (B,T) ids, e: (B,T,D) their embeddings."""
        p = self.cfg.word_dropout
        if not self.training or p == 0.0:
            return e
        keep = torch.bernoulli(torch.full((self.vocab_size,), 1.0 - p, device=x.device))  # (V,)
        return e * (keep[x] / (1.0 - p)).to(e.dtype)[..., None]  # (B,T,D)

    def _next_mem(self, mem: torch.Tensor | None, h: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Last mem_len (or `keep`) positions of [memory; this layer's input], detached: (B,M',D)."""
        m_len = self.cfg.mem_len if keep is None else keep
        if m_len == 0:
            return h.new_zeros(h.shape[0], 0, h.shape[2])
        cat = h if mem is None else torch.cat([mem, h], dim=1)  # (B,M+T,D)
        return cat[:, -m_len:].detach()

    def loss(self, x, target, mems=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean NLL over non-ignored targets and the new memory."""
        out = self(x, mems, target)
        n = (target != -100).sum().clamp(min=1)
        return out.nll.sum() / n, out.mems


def count_params(model: GatedModule, include_gates: bool = False) -> int:
    """Parameters of the language model proper (gate logits only when asked)."""
    skip = set() if include_gates else {id(p) for p in model.gate_parameters().values()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def use_fast_paths(model: nn.Module, enabled: bool = True) -> None:
    """Fast paths on (the default) or off: off means the first, straightforward versions, that is
    one dense-bias SDPA call per attention layer and an unfused linear + cross-entropy output (the
    benchmark's baseline). Both compute the same function."""
    set_attention_impl(model, "split" if enabled else "dense_bias")
    for mod in model.modules():
        if isinstance(mod, TiedSoftmax):
            mod.fused = enabled
