"""Typed configuration: one pydantic model per component, loaded from YAML with `--set` overrides.

Every user-facing key is documented in docs/configuration.md; tests/test_config_doc.py checks that the
doc and these classes name the same keys. Errors are raised as `ConfigError` with one line that
names the file, the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from allatt_dist.errors import ConfigError
from allatt_dist.variants import GATE_PRESETS, MODEL_PRESETS, apply_preset


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        """YAML's true/false are not 1/0 here: `max_steps: true` is a mistake, not one step."""
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and ann is not bool and bool not in get_args(ann):
            raise ValueError(f"expected {_kind(ann)}, got {v!r}")
        return v


def _kind(ann: Any) -> str:
    args = get_args(ann)
    if ann is int or int in args:
        return "a whole number"
    if ann is float or float in args:
        return "a number"
    return "a value of the documented kind"


class ModelConfig(_Section):
    architecture: Literal["all_attention", "transformer_xl"] = "all_attention"
    variant: Literal["ours", "authors"] | None = None
    num_layers: int = Field(4, gt=0)
    hidden_dim: int = Field(256, gt=0)
    num_heads: int = Field(4, gt=0)
    num_persistent: int = Field(512, ge=0)
    ffn_dim: int = Field(1024, gt=0)  # Transformer-XL only
    seq_len: int = Field(64, gt=0)
    mem_len: int = Field(64, ge=0)
    same_length: bool = True
    adaptive_cutoffs: list[int] = Field(default_factory=list)
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

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.adaptive_proj is None:
            self.__dict__["adaptive_proj"] = bool(self.adaptive_cutoffs)
        if self.variant is not None:
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
        if self.architecture == "all_attention" and self.num_persistent <= 0:
            raise ValueError("model.num_persistent must be > 0 for architecture all_attention")
        cut = self.adaptive_cutoffs
        if any(c <= 0 for c in cut) or sorted(set(cut)) != cut:
            raise ValueError(f"model.adaptive_cutoffs must be strictly increasing positive ints, got {cut}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def position_rows(self) -> int:
        """Rows of the learned relative-position table (distances 0 .. rows-1)."""
        return self.position_len or self.seq_len + self.mem_len


class GateConfig(_Section):
    temperature: float = Field(1.0 / 3.0, gt=0.0)
    proper_init: bool = True
    init: float = Field(2.0, gt=0.0)
    l0_coefficient: float | None = Field(None, ge=0.0)
    sparsity_target: float | None = None
    warmup_start: int = Field(0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    output_scaling: bool = True
    open_at_threshold: bool = False
    lr: float = Field(0.05, gt=0.0)
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
        if self.l0_coefficient is not None and self.sparsity_target is not None:
            raise ValueError("set only one of gates.l0_coefficient and gates.sparsity_target")
        return self

    @property
    def mode(self) -> Literal["l0", "target", "none"]:
        if self.sparsity_target is not None:
            return "target"
        return "l0" if self.l0_coefficient else "none"


class DataConfig(_Section):
    source: Literal["auto", "local", "hub"] = "auto"
    path: str | None = None
    name: Literal["wikitext-2", "wikitext-103"] = "wikitext-2"
    raw: bool = False
    eval_batch_size: int = Field(8, gt=0)
    eval_max_segments: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.source == "hub" and self.path:
            raise ValueError("source is hub but path is set; drop data.path, or use source auto/local for a folder")
        return self


class PhaseConfig(_Section):
    max_steps: int = Field(200, gt=0)
    lr: float | None = Field(None, gt=0.0)
    constant_lr: bool = False


class TrainConfig(_Section):
    max_steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    optimizer: Literal["adam", "adamw", "lamb"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(0.25, ge=0.0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0


class ScalingConfig(_Section):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum_steps: int = Field(1, gt=0)


class RunConfig(_Section):
    """The whole recipe. The `tune` section is kept raw here and validated by `search/space.py`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    gates: GateConfig = Field(default_factory=GateConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prune: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_steps=200))
    finetune: PhaseConfig = Field(default_factory=lambda: PhaseConfig(max_steps=100))
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tune: dict[str, Any] | None = None  # validated by allatt_dist.search.space

    @model_validator(mode="after")
    def _gate_preset(self) -> RunConfig:
        if self.model.variant is not None:
            apply_preset(self.gates, "gates", GATE_PRESETS[self.model.variant], self.model.variant)
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

    @property
    def micro_batch(self) -> int:
        return self.train.batch_size // (self.scaling.num_workers * self.deepspeed.grad_accum_steps)


def _format_error(err: ValidationError, origin: str, set_tree: dict[str, Any] | None = None) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if set_tree and _given_in(set_tree, first["loc"]):
        origin = "--set"  # the bad value came from the command line, not from the file
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (see docs/configuration.md for the allowed keys)"
    elif "input" in first and first["type"] not in ("value_error",):
        msg = f"{msg} (got {first['input']!r})"
    where = f"{origin}: " if origin else ""
    return f"{where}{key}: {msg}" if key else f"{where}{msg}"


def add_override_arg(
    parser: Any, help: str = "override a config key (repeatable)", metavar: str = "SECTION.KEY=VALUE"
) -> None:
    """The `--set SECTION.KEY=VALUE` option every recipe-reading command takes (parsed by `parse_overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def _given_in(tree: dict[str, Any], loc: tuple) -> bool:
    """Whether the key at `loc` (or the section holding it) was set in the override tree."""
    node: Any = tree
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


class _Replace(dict):
    """A mapping given whole on the command line (`--set tune.space={...}`): it replaces, not merges."""


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ["a.b=1", "c.d=[1,2]"] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):
            value = _Replace(value)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value (an empty name in {key!r})")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return tree


def data_config(base: dict[str, Any] | None, overrides: list[str] | None, origin: str) -> DataConfig:
    """The data section of a saved run (`base`, e.g. from run.yaml) with `--set data.KEY=VALUE` applied.

    For the commands that read a finished model or experiment: only the data may change there.
    """
    tree = parse_overrides(overrides)
    other = sorted(k for k in tree if k != "data")
    if other:
        raise ConfigError(f"--set {other[0]}.*: only data.KEY=VALUE applies here (the model's config is fixed)")
    return build_config({"data": deep_merge(base or {}, tree.get("data", {}))}, origin, tree).data


def saved_config_diff(saved: Path, spec: dict[str, Any], sections: tuple[str, ...], fix: str) -> list[str]:
    """The `section.key`s in which the config saved at `saved` (YAML) differs from `spec`, sorted;
    a damaged file is one line that ends with `fix`."""
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise ConfigError(f"{saved}: damaged; {fix}") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{saved}: damaged (not a mapping); {fix}")
    return sorted(
        f"{s}.{k}"
        for s in sections
        for k in set(old.get(s) or {}) | set(spec.get(s) or {})
        if (old.get(s) or {}).get(k) != (spec.get(s) or {}).get(k)
    )


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and not isinstance(v, _Replace) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = dict(v) if isinstance(v, _Replace) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a folder; give a recipe YAML file (e.g. tune_configs/quickstart.yaml)")
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (a recipe is UTF-8 YAML)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections (model, gates, data, ...)")
    return data


def build_config(data: dict[str, Any], origin: str = "", set_tree: dict[str, Any] | None = None) -> RunConfig:
    """Validate a whole recipe; `set_tree` (the parsed `--set` items) lets an error name `--set` as its origin."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin, set_tree)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    tree = parse_overrides(overrides)
    return build_config(deep_merge(data, tree), str(path) if path is not None else "--set", tree)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
