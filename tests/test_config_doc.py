"""docs/configuration.md documents exactly the keys the config classes accept, and every recipe loads."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from allatt_dist.config import RunConfig, SchedulerConfig, TuneConfig
from allatt_dist.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _keys(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_every_config_key_is_documented_and_nothing_else():
    doc = (ROOT / "docs/configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_.]+)` \|", doc, flags=re.M))
    code = {k for k in _keys(RunConfig, "") if not k.startswith("tune")}
    code |= _keys(TuneConfig, "tune.") - {"tune.scheduler"}
    code |= _keys(SchedulerConfig, "tune.scheduler.")
    assert documented == code, (sorted(code - documented), sorted(documented - code))


@pytest.mark.parametrize("recipe", sorted((ROOT / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_their_search_spaces_validate(recipe):
    load_config(recipe)  # validates the search space too (every searched key, both ends of its domain)
