"""What a pruning target asks for, in heads, and the final cut that meets it exactly.

A recipe asks for a sparsity fraction t (`gates.sparsity_target`) or a parameter budget
(`gates.param_budget`, non-embedding parameters: everything but the word embeddings and the softmax,
which pruning never touches). Either becomes a number of heads to remove:

    fraction t:  k = round(t * L * H)
    budget B:    k = ceil((P_dense - B) / p_head)      (the fewest heads that bring the model to <= B)

with P_dense the dense model's non-embedding count and p_head the parameters one head carries (its
architecture's per-head formula, docs/model.md). The Lagrangian trains towards k / (L H); the final
cut (`gates.final_cut`) then keeps exactly the L H - k most open heads (largest log alpha), so the
pruned model removes exactly k heads: within one head of t L H, and at or under the budget.
"""

from __future__ import annotations

import math

import torch

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.model.pruning import per_head_params
from allatt_dist.model.transformer import LanguageModel


def non_embedding_params(model: ModelConfig) -> int:
    """Parameters of the dense model outside the word embeddings and softmax (built on the meta device)."""
    if model.adaptive_cutoffs == "auto":  # resolved from the corpus later; the count is outside the embeddings
        model = model.model_copy(update={"adaptive_cutoffs": [0.5]})
    cut = model.adaptive_cutoffs
    fractions = any(isinstance(c, float) for c in cut)
    vocab = 10**6 if fractions else (max(cut) + 1 if cut else 2)  # outside the count: any size the cutoffs fit
    with torch.device("meta"):
        lm = LanguageModel(model, vocab)
    io = {id(p) for p in lm.io.parameters()}
    return sum(p.numel() for p in lm.parameters() if id(p) not in io)


def per_head(model: ModelConfig) -> int:
    return per_head_params(model)


def heads_to_remove(model: ModelConfig, gates: GateConfig) -> int | None:
    """k, the heads the target removes; None in L0 mode or without gates' target."""
    total = model.num_layers * model.num_heads
    if gates.param_budget is not None:
        dense, head = non_embedding_params(model), per_head(model)
        return min(total, max(0, math.ceil((dense - gates.param_budget) / head)))
    if gates.sparsity_target is not None:
        return round(gates.sparsity_target * total)
    return None


def check_budget(model: ModelConfig, gates: GateConfig) -> None:
    """ValueError (one line) when the budget is above the dense model or below the smallest pruned one."""
    if gates.param_budget is None:
        return
    dense, head = non_embedding_params(model), per_head(model)
    smallest = dense - model.num_layers * model.num_heads * head
    if gates.param_budget > dense:
        raise ValueError(
            f"gates.param_budget {gates.param_budget:,} is above the dense model ({dense:,} non-embedding)"
        )
    if gates.param_budget < smallest:
        raise ValueError(
            f"gates.param_budget {gates.param_budget:,} is below the smallest pruned model ({smallest:,} "
            "non-embedding, every head removed)"
        )


def training_gates(model: ModelConfig, gates: GateConfig) -> GateConfig:
    """The gate config the objective trains with: a budget becomes the sparsity target k / (L H)."""
    if gates.param_budget is None:
        return gates
    k = heads_to_remove(model, gates)
    return gates.model_copy(update={"param_budget": None, "sparsity_target": k / (model.num_layers * model.num_heads)})


def final_mask(log_alpha: torch.Tensor, remove: int) -> torch.Tensor:
    """(L, H) bool: every head kept but the `remove` with the smallest log alpha (ties: earlier index first)."""
    flat = log_alpha.detach().float().flatten()  # (L*H,)
    order = torch.argsort(flat, stable=True)  # ascending: least open first
    keep = torch.ones_like(flat, dtype=torch.bool)  # (L*H,)
    keep[order[:remove]] = False
    return keep.view_as(log_alpha)
