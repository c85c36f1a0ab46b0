"""The model families: which architectures `model.architecture` may name, each declared once.

A family says how to check its config, build a (gated or pruned) model, prune a gated one, and how
many parameters and FLOPs one head / one layer costs. Everything else (training, export, model
directories, `prune`, `evaluate`, `bench`'s formula, the Pareto plot) goes through this registry, so
adding an architecture is one module that declares a `ModelFamily` and one `register(...)` line.
The built-in families (`model/families.py`) are registered when this module is imported.

A family's models offer what the rest of the code uses (see `FamilyModel`, model/family.py): `LanguageModel`
(model/transformer.py) is the shared implementation of the built-in ones.

Importing this module does not import torch: config validation stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allatt_dist.errors import ConfigError
from allatt_dist.model.families import BUILTIN
from allatt_dist.model.family import FamilyModel, ModelFamily

if TYPE_CHECKING:
    from allatt_dist.config import GateConfig, ModelConfig

__all__ = ["FamilyModel", "ModelFamily", "build_model", "family_names", "get_family", "register", "unregister"]


_FAMILIES: dict[str, ModelFamily] = {family.name: family for family in BUILTIN}  # model/families.py


def register(family: ModelFamily) -> ModelFamily:
    """Make `family` available under `family.name` (a name may be registered once)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"architecture {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (for tests and plug-ins); unknown names are ignored."""
    _FAMILIES.pop(name, None)


def family_names() -> list[str]:
    return list(_FAMILIES)


def unknown_architecture(name: str) -> str:
    return f"unknown architecture {name!r}; registered: {', '.join(family_names())}"


def get_family(name: str) -> ModelFamily:
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
