"""Typed configuration: one pydantic model per component, the `tune:` section included.

Schemas only: reading YAML and `--set` overrides is `recipe.py`'s job, resolving a config into what a
command runs is `plan.py`'s. Every user-facing key is documented in docs/configuration.md;
tests/test_config_doc.py checks that the doc and these classes name the same keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from allatt_dist.config_sections import (
    DataConfig,
    DeepSpeedConfig,
    DistillConfig,
    PhaseConfig,
    ScalingConfig,
    Section,
    TrainConfig,
)
from allatt_dist.crosschecks import conflict
from allatt_dist.errors import first_problem
from allatt_dist.variants import GATE_PRESETS, MODEL_PRESETS, apply_preset, check_variant

__all__ = [  # the sections defined in config_sections.py are imported from here, as every section is
    "DataConfig", "DeepSpeedConfig", "DistillConfig", "GateConfig", "ModelConfig", "PhaseConfig",
    "RunConfig", "ScalingConfig", "SchedulerConfig", "Section", "TrainConfig", "TuneConfig", "merged", "nested",
    "Whole",
]  # fmt: skip


class ModelConfig(Section):
    architecture: str = "all_attention"  # a registered family: checked by model/checks.py (recipe.build_config)
    variant: Literal["ours", "authors", "transformer_xl"] | None = None
    num_layers: int = Field(4, gt=0)
    hidden_dim: int = Field(256, gt=0)
    num_heads: int = Field(4, gt=0)
    num_persistent: int = Field(512, ge=0)
    ffn_dim: int = Field(1024, gt=0)  # Transformer-XL only
    seq_len: int = Field(64, gt=0)
    mem_len: int = Field(64, ge=0)
    same_length: bool = True
    # token ids, fractions of the vocabulary, or "auto" (by the train split's token frequencies: plan.py)
    adaptive_cutoffs: list[int] | list[float] | Literal["auto"] = Field(default_factory=list)
    adaptive_div: int = Field(4, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropatt: float = Field(0.0, ge=0.0, lt=1.0)
    word_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    final_norm: bool = True
    persistent_content_bias: bool = True
    zero_memory_start: bool = False
    positions: Literal["sinusoid", "learned"] = "sinusoid"
    position_len: int | None = Field(None, gt=0)
    attn_out_bias: bool = False
    adaptive_proj: bool | None = None  # None: on when there are cutoffs
    output_dropout_twice: bool = False  # the authors' All-attention drops the last hidden state twice
    shared_rel_bias: bool = False  # one u and one v for all layers (the authors' Transformer-XL)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.adaptive_proj is None:
            self.__dict__["adaptive_proj"] = bool(self.adaptive_cutoffs)
        if self.variant is not None:
            check_variant(self.variant, self.architecture)
            preset = dict(MODEL_PRESETS[self.variant])
            if not self.adaptive_cutoffs:  # no shortlist: nothing to project, the switch stays as given
                del preset["adaptive_proj"]
            apply_preset(self, "model", preset, self.variant)
        if self.adaptive_proj and not self.adaptive_cutoffs:
            raise ValueError("model.adaptive_proj needs model.adaptive_cutoffs (there is no shortlist to project)")
        if self.position_len is not None:
            if self.positions != "learned":
                raise ValueError("model.position_len applies only with model.positions: learned")
            if self.position_len < self.seq_len + self.mem_len:
                raise ValueError(
                    f"model.position_len ({self.position_len}) must be >= model.seq_len + model.mem_len "
                    f"({self.seq_len + self.mem_len})"
                )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.num_heads ({self.num_heads})"
            )
        cut = [] if self.adaptive_cutoffs == "auto" else self.adaptive_cutoffs
        fractions = any(isinstance(c, float) for c in cut)
        if any(c <= 0 or (fractions and c >= 1) for c in cut) or sorted(set(cut)) != cut:
            raise ValueError(
                "model.adaptive_cutoffs must be strictly increasing positive ints (token ids), or fractions of the "
                f"vocabulary strictly between 0 and 1, got {cut}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def position_rows(self) -> int:
        """Rows of the learned relative-position table (distances 0 .. rows-1)."""
        return self.position_len or self.seq_len + self.mem_len


class GateConfig(Section):
    temperature: float = Field(1.0 / 3.0, gt=0.0)
    proper_init: bool = True
    init: float = Field(2.0, gt=0.0)
    l0_coefficient: float | None = Field(None, ge=0.0)
    sparsity_target: float | None = None
    param_budget: int | None = Field(None, gt=0)  # non-embedding parameters (model/targets.py)
    final_cut: bool = True  # target/budget modes: keep exactly the most open heads the target allows
    warmup_start: int = Field(0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    output_scaling: bool = True
    open_at_threshold: bool = False
    lr: float = Field(0.05, gt=0.0)
    lr_scale: float | None = Field(None, gt=0.0)  # set: gate lr = this x the phase's lr, not gates.lr
    per_rank_samples: bool = False  # each rank samples its own gates (the authors); ours: one per step
    gamma: float = Field(-0.1, lt=0.0)
    zeta: float = Field(1.1, gt=1.0)

    @field_validator("sparsity_target")
    @classmethod
    def _target(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"gates.sparsity_target must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> GateConfig:
        given = [k for k in ("l0_coefficient", "sparsity_target", "param_budget") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(
                f"set only one of gates.l0_coefficient, gates.sparsity_target and gates.param_budget "
                f"(got {' and '.join('gates.' + k for k in given)})"
            )
        return self

    @property
    def mode(self) -> Literal["l0", "target", "none"]:
        if self.sparsity_target is not None or self.param_budget is not None:
            return "target"
        return "l0" if self.l0_coefficient else "none"


DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


class SchedulerConfig(Section):
    type: Literal["fifo", "asha"] = "asha"
    grace_period: int = Field(1, gt=0)  # in training steps of the prune phase
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneConfig(Section):
    """The search: which config keys (dotted) to sample from which domain, how, and how many at once.

    tune:
      space:
        gates.temperature: {grid: [0.33, 0.66]}
        gates.sparsity_target: {grid: [0.25, 0.5]}
      search: grid                  # grid | random | optuna; random takes uniform/loguniform/randint too
      scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
    """

    space: dict[str, dict[str, list[Any]]]
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0)
    max_concurrent_trials: int = Field(1, gt=0)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: Literal["valid_ppl"] = "valid_ppl"
    trial_driver_cpus: float = Field(0.01, gt=0.0)
    recover_finetune: bool = False  # `run`: fine-tune each target's best trial before rank (search/recover.py)
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

    def samples(self) -> list[dict[str, Any]]:
        """Representative values of every domain (its ends), used to validate the searched keys."""
        return [{k: next(iter(d.values()))[i] for k, d in self.space.items()} for i in (0, -1)]

    def values_of(self, key: str) -> list[Any] | None:
        """The listed values of a searched key (None when the key is not searched)."""
        dom = self.space.get(key)
        return list(next(iter(dom.values()))) if dom else None

    def expected_trials(self) -> int:
        """How many trials the search runs: the grid's size times num_samples (num_samples for random)."""
        n = self.num_samples
        if self.search == "grid":
            for dom in self.space.values():
                kind, values = next(iter(dom.items()))
                n *= len(values) if kind == "grid" else 1
        return n


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


class Whole(dict):
    """A mapping given whole (`--set tune.space={...}`): laid over a config it replaces, not merges."""


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with the nested mapping `extra` laid over it, section by section (a `Whole` replaces)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Whole):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


class RunConfig(Section):
    """The whole recipe."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    gates: GateConfig = Field(default_factory=GateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prune: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_steps=200))
    finetune: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_steps=100))
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tune: TuneConfig | None = None

    @model_validator(mode="after")
    def _gate_preset(self) -> RunConfig:
        if self.model.variant is not None:
            apply_preset(self.gates, "gates", GATE_PRESETS[self.model.variant], self.model.variant)
        return self

    @model_validator(mode="after")
    def _across(self) -> RunConfig:
        if msg := conflict(self):  # crosschecks.py: optimizer x ZeRO stage, schedule
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _batch(self) -> RunConfig:
        per = self.scaling.num_workers * self.deepspeed.grad_accum_steps
        if self.train.batch_size % per:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be divisible by "
                f"scaling.num_workers x deepspeed.grad_accum_steps ({per})"
            )
        return self

    @model_validator(mode="after")
    def _searched_keys(self) -> RunConfig:
        """Every searched key is a real config key, and both ends of its domain make a valid config."""
        if self.tune is None:
            return self
        base = self.to_dict(tune=False)
        for key in self.tune.space:
            section, _, leaf = key.partition(".")
            if not isinstance(base.get(section), dict) or leaf not in base[section]:
                raise ValueError(f"tune.space.{key}: no such config key (see docs/configuration.md)")
        for sample in self.tune.samples():
            try:
                RunConfig.model_validate(merged(base, nested(sample)))
            except ValidationError as e:
                raise ValueError(first_problem(e).within("tune.space")) from None
        return self

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // (self.scaling.num_workers * self.deepspeed.grad_accum_steps)

    def to_dict(self, tune: bool = True) -> dict[str, Any]:
        """The config as plain JSON-able data (what run.yaml holds)."""
        return self.model_dump(mode="json", exclude=None if tune else {"tune"})

    def with_values(self, flat: dict[str, Any]) -> RunConfig:
        """This config with dotted keys set (one trial's sampled values); validated as a whole."""
        return RunConfig.model_validate(merged(self.to_dict(), nested(flat)))
