"""The `tune:` section of a recipe: search space, algorithm, scheduler, and trial resources.

    tune:
      space:                                  # any config key, dotted
        gates.temperature: {grid: [0.33, 0.66]}
        gates.sparsity_target: {grid: [0.25, 0.5]}
        gates.l0_coefficient: {loguniform: [0.001, 0.1]}
      search: grid                            # grid | random | optuna (optional extra)
      num_samples: 1                          # repeats of the grid / samples of random
      max_concurrent_trials: 1
      scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
      trial_driver_cpus: 0.01                 # the trial function itself; Train workers are separate

Every searched key is checked against the real config classes with a sample value, so a typo or an
out-of-range bound fails here with one line instead of inside a trial.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from allatt_dist.config import RunConfig, build_config, config_to_dict, deep_merge
from allatt_dist.errors import ConfigError

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Strict):
    type: Literal["fifo", "asha"] = "asha"
    grace_period: int = Field(1, gt=0)  # in training steps of the prune phase
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(_Strict):
    space: dict[str, dict[str, list[Any]]]
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: Literal["valid_ppl"] = "valid_ppl"
    trial_driver_cpus: float = Field(0.01, gt=0.0)
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        if not space:
            raise ValueError("tune.space is empty: give at least one key to search")
        for key, dom in space.items():
            if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
                raise ValueError(f"tune.space.{key}: give exactly one of {', '.join(DOMAINS)}, e.g. {{grid: [a, b]}}")
            kind, values = next(iter(dom.items()))
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.space.{key}.{kind}: needs a non-empty list")
            if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or values[0] >= values[1]):
                raise ValueError(f"tune.space.{key}.{kind}: needs [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"tune.space.{key}.loguniform: bounds must be > 0")
        return space

    @model_validator(mode="after")
    def _grid_only_with_grid(self) -> TuneConfig:
        kinds = {next(iter(d)) for d in self.space.values()}
        if self.search == "grid" and kinds - {"grid", "choice"}:
            raise ValueError("tune.search: grid takes only grid/choice domains; use search: random for ranges")
        return self


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"gates.temperature": 0.5} -> {"gates": {"temperature": 0.5}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def samples(tc: TuneConfig) -> list[dict[str, Any]]:
    """Representative values of every domain (its ends), used to validate the searched keys."""
    return [{k: next(iter(d.values()))[i] for k, d in tc.space.items()} for i in (0, -1)]


def space_origin(config: str, overrides: list[str] | None) -> str:
    """What a search-space error names: the recipe, and --set when the tune section was overridden."""
    return f"{config} with --set" if any(o.strip().startswith("tune.") for o in overrides or []) else config


def parse_tune(cfg: RunConfig, origin: str = "") -> TuneConfig:
    """Validate cfg.tune and check each searched key against the config classes."""
    where = f"{origin}: " if origin else ""
    if not cfg.tune:
        raise ConfigError(f"{where}tune: section missing (see docs/search.md)")
    try:
        tc = TuneConfig.model_validate(cfg.tune)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(f"{where}tune.{loc}: {msg}" if loc else f"{where}{msg}") from None
    base = config_to_dict(cfg)
    for key in tc.space:
        section, _, leaf = key.partition(".")
        if section not in base or section == "tune" or not isinstance(base[section], dict) or leaf not in base[section]:
            raise ConfigError(f"{where}tune.space.{key}: no such config key (see docs/configuration.md)")
    for sample in samples(tc):
        build_config(deep_merge(base, nested(sample)), f"{where}tune.space")
    return tc


def param_space(tc: TuneConfig) -> dict[str, Any]:
    """The Ray Tune param_space (flat dotted keys -> tune domains)."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(v[0], v[1]),
        "loguniform": lambda v: tune.loguniform(v[0], v[1]),
        "randint": lambda v: tune.randint(v[0], v[1]),
    }
    return {key: make[kind](values) for key, dom in tc.space.items() for kind, values in dom.items()}


def trial_config(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """The run config of one trial: the base recipe with the sampled values applied."""
    data = config_to_dict(cfg)
    return build_config(deep_merge(data, nested({k: v for k, v in overrides.items() if "." in k})), "trial")
