"""Head pruning for any registered family: the pruned model, the parameters one head carries, sparsity.

`prune_model` and `per_head_params` ask the model's family (model/registry.py); the built-in families
prune the shared stack physically (model/stack_pruning.py). Removing one head removes exactly
`per_head_params(cfg)` parameters (see docs/model.md, "Pruning").
"""

from __future__ import annotations

from allatt_dist.config import ModelConfig
from allatt_dist.model.registry import FamilyModel, get_family


def per_head_params(cfg: ModelConfig) -> int:
    """Parameters removed with one head of a `cfg.architecture` model (its family's formula)."""
    return get_family(cfg.architecture).per_head_params(cfg)


def prune_model(gated: FamilyModel) -> FamilyModel:
    """A plain (ungated) model of the same family holding only the open heads; eval outputs unchanged."""
    return get_family(gated.cfg.architecture).prune(gated)


def sparsity(heads_per_layer: list[int], cfg: ModelConfig) -> float:
    """Fraction of the dense model's heads that were removed."""
    return 1.0 - sum(heads_per_layer) / (cfg.num_layers * cfg.num_heads)
