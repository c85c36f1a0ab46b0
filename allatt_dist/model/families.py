"""The built-in model families, All-attention and Transformer-XL, declared once each.

Both are the shared stack of model/transformer.py (pre-LN relative attention with segment memory and
gated heads); they differ only in what a layer holds besides its heads, its `StackLayout`: persistent
key/value vectors (All-attention) or a feed-forward sublayer (Transformer-XL). The per-head parameter
count (pruning) and the per-layer FLOPs (bench) follow from the layout. A further variant of the stack
is one `register(stack_family(...))` line; a different model is a `ModelFamily` of its own.

No torch import at module level (config validation reads this module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from allatt_dist.model.registry import ModelFamily, register

if TYPE_CHECKING:
    from allatt_dist.config import GateConfig, ModelConfig


@dataclass(frozen=True)
class StackLayout:
    """What one layer of the stack holds besides its heads."""

    num_persistent: int  # N persistent key/value vectors per head; 0 for none
    ffn_dim: int  # width of the feed-forward sublayer; 0 for none


_LAYOUTS: dict[str, Callable[[ModelConfig], StackLayout]] = {}


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


def _build_stack(cfg: ModelConfig, vocab_size: int, gates: GateConfig | None, heads_per_layer: list[int] | None):
    from allatt_dist.model.transformer import LanguageModel

    return LanguageModel(cfg, vocab_size, gates, heads_per_layer)


def _prune_stack(gated):
    from allatt_dist.model.pruning import prune_heads

    return prune_heads(gated)


def stack_family(
    name: str,
    layout: Callable[[ModelConfig], StackLayout],
    validate: Callable[[ModelConfig], None] | None = None,
    marker: str = "o",
    color: str | None = None,
) -> ModelFamily:
    """A family on the shared stack whose layers are laid out by `layout(cfg)`."""
    _LAYOUTS[name] = layout
    extra = {"validate": validate} if validate is not None else {}
    return ModelFamily(
        name=name,
        build=_build_stack,
        prune=_prune_stack,
        per_head_params=stack_per_head_params,
        layer_flops=stack_layer_flops,
        marker=marker,
        color=color,
        **extra,
    )


def _needs_persistent(cfg: ModelConfig) -> None:
    if cfg.num_persistent <= 0:
        raise ValueError("model.num_persistent must be > 0 for architecture all_attention")


ALL_ATTENTION = stack_family(
    "all_attention",
    lambda cfg: StackLayout(num_persistent=cfg.num_persistent, ffn_dim=0),
    validate=_needs_persistent,
    marker="o",
    color="tab:blue",
)
TRANSFORMER_XL = stack_family(
    "transformer_xl", lambda cfg: StackLayout(num_persistent=0, ffn_dim=cfg.ffn_dim), marker="s", color="tab:orange"
)

register(ALL_ATTENTION)
register(TRANSFORMER_XL)
