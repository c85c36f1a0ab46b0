"""The run config's plain sections: the base every section shares, and those that need nothing but their own
fields (data, training phases, scaling, DeepSpeed, distillation). `config.py` holds the sections with
presets and cross-section rules (model, gates, search) and the whole `RunConfig`, and re-exports these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        """YAML's true/false are not 1/0 here: `max_steps: true` is a mistake, not one step."""
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and ann is not bool and bool not in get_args(ann):
            raise ValueError(f"expected {kind_of(ann)}, got {v!r}")
        return v


def kind_of(ann: Any) -> str:
    args = get_args(ann)
    if ann is int or int in args:
        return "a whole number"
    if ann is float or float in args:
        return "a number"
    return "a value of the documented kind"


class DataConfig(Section):
    source: Literal["auto", "local", "hub"] = "auto"
    path: str | None = None
    name: Literal["wikitext-2", "wikitext-103"] = "wikitext-2"
    raw: bool = False
    eval_batch_size: int = Field(8, gt=0)
    test_batch_size: int = Field(8, gt=0)  # rows of the test split's evaluation in `rank` (the authors: 64)
    eval_max_segments: int | None = Field(None, gt=0)
    cache_dir: str | None = None
    text_field: str | None = Field(None, min_length=1)  # JSONL/Parquet: the field holding the text; None: "text"
    tokenizer: str | None = None  # word (None), bpe, or a tokenizers JSON file (data/tokenizer.py)
    vocab_size: int | None = Field(None, gt=0)  # bpe: the vocabulary size (None: 8000)
    # processes tokenising a split into the cache (None: all cores), or "ray": Ray tasks on the cluster (ray_build.py)
    build_workers: Annotated[int, Field(gt=0)] | Literal["ray"] | None = None
    build_chunk_mb: float = Field(16.0, gt=0.0)  # text per chunk (and shard) of the cache build, in MB
    split_fractions: tuple[float, float] | None = None  # (valid, test) carved from the train source (build.py)
    split_seed: int = 0  # the seed of that carving

    @field_validator("build_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v is None or v == "ray" or (type(v) is int and v > 0):
            return v
        raise ValueError(f"expected a whole number > 0, or ray (Ray tasks over the cluster), got {v!r}")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.source == "hub" and self.path:
            raise ValueError("source is hub but path is set; drop data.path, or use source auto/local for a folder")
        if self.split_fractions is not None:
            valid, test = self.split_fractions
            if not (0 < valid < 1 and 0 < test < 1 and valid + test < 1):
                raise ValueError(
                    f"split_fractions {list(self.split_fractions)}: [valid, test] must each be in (0, 1), sum < 1"
                )
            if self.source == "hub":
                raise ValueError("split_fractions: only for a local or bucket data.path (the hub has its splits)")
        return self


class PhaseConfig(Section):
    max_steps: int = Field(200, gt=0)
    lr: float | None = Field(None, gt=0.0)
    constant_lr: bool = False


class TrainConfig(Section):
    max_steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0.0)
    optimizer: Literal["adam", "adamw", "lamb"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    hold_steps: int = Field(0, ge=0)  # after the warm-up, steps at the full rate before the cosine
    cosine_end: int | None = Field(None, gt=0)  # step where the cosine reaches min_lr_ratio; None: max_steps
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = Field(0.25, ge=0.0)
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    row_shift: bool = False  # each epoch, every row of the stream starts at its own random offset


class ScalingConfig(Section):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, ge=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)
    wait_for_nodes_s: float = Field(600.0, ge=0.0)


class DeepSpeedConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum_steps: int = Field(1, gt=0)


class DistillConfig(Section):
    """Distillation from a teacher (default: the run's dense model) in the prune and finetune phases."""

    teacher: str | None = None  # a model directory (local or s3://); None: the run's dense model RUN/dense/model
    kl_weight: float = Field(0.0, ge=0.0)  # 0: off (the paper's training, unchanged)
    temperature: float = Field(2.0, gt=0.0)  # the measured setting (docs/results.md, distillation)
    hidden_weight: float = Field(0.0, ge=0.0)  # hidden states matched (MSE; a learned map where widths differ)
    hidden_layers: list[int] = Field(default_factory=list)  # the layers (0-based) whose outputs are matched
    phases: list[Literal["prune", "finetune"]] = Field(default_factory=lambda: ["prune", "finetune"])

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("distill.teacher: give a model directory (local or s3://), or leave it out")
        return v

    def applies(self, phase: str) -> bool:
        """Whether `phase` trains with the teacher."""
        return (self.kl_weight > 0 or self.hidden_weight > 0) and phase in self.phases
