"""What a model family declares (`ModelFamily`) and what its models offer (`FamilyModel`): the types
the registry (model/registry.py) and the families (model/families.py) share. No torch import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from allatt_dist.config import GateConfig, ModelConfig
    from allatt_dist.model.gates import HeadGate


class FamilyModel(Protocol):
    """What training, pruning, export and evaluation need of a model (LanguageModel has it all)."""

    cfg: ModelConfig
    vocab_size: int
    heads_per_layer: list[int]  # heads per layer as built (after pruning, fewer)

    @property
    def gates(self) -> list[HeadGate]: ...  # per gated layer, in order; [] when ungated

    def gate_parameters(self) -> dict[str, nn.Parameter]: ...  # gate logits by parameter name

    def weight_state_dict(self) -> dict[str, torch.Tensor]: ...  # the state without the gates

    # forward(x (B,T), mems, target (B,T) | None) -> LMOutput (nll (B,T) or log_probs, new mems)
    def __call__(self, x: torch.Tensor, mems: list[torch.Tensor] | None = None, target=None) -> Any: ...

    def loss(self, x: torch.Tensor, target: torch.Tensor, mems=None) -> tuple[torch.Tensor, list]: ...


def _no_checks(cfg: ModelConfig) -> None:
    return None


@dataclass(frozen=True)
class ModelFamily:
    """One architecture. `validate` raises ValueError (one line naming the key) for a config the
    family cannot build; `layer_flops(cfg, heads, batch)` is the forward matmul FLOPs per token of one
    layer with `heads` heads (perf.flops_per_token adds the output layer)."""

    name: str
    build: Callable[[ModelConfig, int, GateConfig | None, list[int] | None], FamilyModel]
    prune: Callable[[FamilyModel], FamilyModel]  # gated -> ungated with only the open heads
    per_head_params: Callable[[ModelConfig], int]  # parameters removed with one head
    layer_flops: Callable[[ModelConfig, int, int], float]
    validate: Callable[[ModelConfig], None] = _no_checks
    marker: str = "o"  # Pareto plot
    color: str | None = None
