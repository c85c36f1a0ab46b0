"""The built-in model families, All-attention and Transformer-XL, declared once each.

Both are the shared stack of model/transformer.py (pre-LN relative attention with segment memory and
gated heads); they differ only in what a layer holds besides its heads, its `StackLayout`: persistent
key/value vectors (All-attention) or a feed-forward sublayer (Transformer-XL). The per-head parameter
count (pruning) and the per-layer FLOPs (bench) follow from the layout. A further variant of the stack
is one `registry.register(stack_family(...))` line; a different model is a `ModelFamily` of its own.

No torch import at module level (the registry imports this module, and config checks read the registry);
the model code is imported when a model is built or pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from allatt_dist.model.family import ModelFamily
from allatt_dist.model.stack import (
    StackLayout,
    all_attention_layout,
    declare_layout,
    stack_layer_flops,
    stack_per_head_params,
    transformer_xl_layout,
)

if TYPE_CHECKING:
    from allatt_dist.config import GateConfig, ModelConfig


def _build_stack(cfg: ModelConfig, vocab_size: int, gates: GateConfig | None, heads_per_layer: list[int] | None):
    from allatt_dist.model.transformer import LanguageModel

    return LanguageModel(cfg, vocab_size, gates, heads_per_layer)


def _prune_stack(gated):
    from allatt_dist.model.stack_pruning import prune_heads

    return prune_heads(gated)


def stack_family(
    name: str,
    layout: Callable[[ModelConfig], StackLayout],
    validate: Callable[[ModelConfig], None] | None = None,
    marker: str = "o",
    color: str | None = None,
) -> ModelFamily:
    """A family on the shared stack whose layers are laid out by `layout(cfg)`."""
    declare_layout(name, layout)
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
    all_attention_layout,
    validate=_needs_persistent,
    marker="o",
    color="tab:blue",
)
TRANSFORMER_XL = stack_family("transformer_xl", transformer_xl_layout, marker="s", color="tab:orange")

BUILTIN = (ALL_ATTENTION, TRANSFORMER_XL)  # registered by model/registry.py when it is imported
