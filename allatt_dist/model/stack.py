"""The shared stack's layer layout (what one layer holds besides its heads) and the formulas that
follow from it: parameters per head (pruning) and forward FLOPs per layer (bench). No torch import.

A stack family (model/families.py) declares its layout here with `declare_layout`; model/transformer.py
builds the layers from `stack_layout(cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from allatt_dist.config import ModelConfig


@dataclass(frozen=True)
class StackLayout:
    """What one layer of the stack holds besides its heads."""

    num_persistent: int  # N persistent key/value vectors per head; 0 for none
    ffn_dim: int  # width of the feed-forward sublayer; 0 for none


def all_attention_layout(cfg: ModelConfig) -> StackLayout:
    return StackLayout(num_persistent=cfg.num_persistent, ffn_dim=0)


def transformer_xl_layout(cfg: ModelConfig) -> StackLayout:
    return StackLayout(num_persistent=0, ffn_dim=cfg.ffn_dim)


# The built-in families' layouts are known here, so a LanguageModel is built without the registry loaded.
_LAYOUTS: dict[str, Callable[[ModelConfig], StackLayout]] = {
    "all_attention": all_attention_layout,
    "transformer_xl": transformer_xl_layout,
}


def stack_layout(cfg: ModelConfig) -> StackLayout:
    """The layer layout of `cfg.architecture` (a stack family)."""
    if cfg.architecture not in _LAYOUTS:
        raise ValueError(f"architecture {cfg.architecture!r} is not built on the shared stack (model/transformer.py)")
    return _LAYOUTS[cfg.architecture](cfg)


def stack_per_head_params(cfg: ModelConfig) -> int:
    """q,k,v,r,o projections (5 d dh) + u,v biases (2 dh) + persistent keys and values (2 N dh)."""
    n = stack_layout(cfg).num_persistent
    return cfg.head_dim * (5 * cfg.hidden_dim + 2 + 2 * n)


def stack_layer_flops(cfg: ModelConfig, heads: int, batch: int) -> float:
    """Forward matmul FLOPs per token of one layer with `heads` heads (docs/performance.md):
    q 2dI + k,v 4dI K/T + positions 2dI K/(B T) + context scores (content and position) 4IK
    + persistent scores 2IN + weighted values 2I(K+N) + output projection 2Id + feed-forward 4 d ffn_dim,
    with I = heads * head_dim, K = mem_len + T context keys, N persistent vectors."""
    layout = stack_layout(cfg)
    d, t, k, n = cfg.hidden_dim, cfg.seq_len, cfg.mem_len + cfg.seq_len, layout.num_persistent
    i = heads * cfg.head_dim
    total = 2 * d * i + 4 * d * i * k / t + 2 * d * i * k / (batch * t)
    total += 4 * i * k + 2 * i * n + 2 * i * (k + n) + 2 * i * d
    return total + 4 * d * layout.ffn_dim


def declare_layout(name: str, layout: Callable[[ModelConfig], StackLayout]) -> None:
    """Architecture `name` is the shared stack with layers laid out by `layout(cfg)`."""
    _LAYOUTS[name] = layout
