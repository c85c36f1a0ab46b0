"""The model families: which architectures `model.architecture` may name, each declared once.

A family says how to check its config, build a (gated or pruned) model, prune a gated one, and how
many parameters and FLOPs one head / one layer costs. Everything else (training, export, model
directories, `prune`, `evaluate`, `bench`'s formula, the Pareto plot) goes through this registry, so
adding an architecture is one module that declares a `ModelFamily` and one `register(...)` line.
The built-in families (`model/families.py`) are loaded on the first lookup.

A family's models offer what the rest of the code uses (see `FamilyModel`): `LanguageModel`
(model/transformer.py) is the shared implementation of the built-in ones.

Importing this module does not import torch: config validation stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from allatt_dist.errors import ConfigError

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


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` available under `family.name` (a name may be registered once)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"architecture {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (for tests and plug-ins); unknown names are ignored."""
    _FAMILIES.pop(name, None)


def _load_builtins() -> None:
    import allatt_dist.model.families  # noqa: F401  (registers all_attention and transformer_xl)


def family_names() -> list[str]:
    _load_builtins()
    return list(_FAMILIES)


def unknown_architecture(name: str) -> str:
    return f"unknown architecture {name!r}; registered: {', '.join(family_names())}"


def get_family(name: str) -> ModelFamily:
    _load_builtins()
    if name not in _FAMILIES:
        raise ConfigError(f"model.architecture: {unknown_architecture(name)}")
    return _FAMILIES[name]


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    gates: GateConfig | None = None,
    heads_per_layer: list[int] | None = None,
) -> FamilyModel:
    """A model of `cfg.architecture`: dense, gated (`gates`) or pruned (`heads_per_layer`)."""
    return get_family(cfg.architecture).build(cfg, vocab_size, gates, heads_per_layer)
