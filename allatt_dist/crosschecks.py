"""Checks across config sections, run by config.py's validators before anything starts: what DeepSpeed
(0.19.8, as pinned) can run, and a schedule whose cosine ends before it starts.

No torch, DeepSpeed or model import here (config validation stays light).
"""

from __future__ import annotations

from typing import Any

# The ZeRO stages at which DeepSpeed runs each `train.optimizer` as this project hands it over.
# Adam/AdamW (torch's on CPU, FusedAdam on GPU) are in ZERO_SUPPORTED_OPTIMIZERS (runtime/zero/utils.py).
# LAMB (train/lamb.py, a client optimizer) is not: engine._do_optimizer_sanity_check refuses it at
# stages 1-3, and even allowed there ZeRO flattens each parameter group into one tensor, so the per-tensor
# trust ratio would become one per group. At stage 0 its fp16/bf16 wrapper (FP16_UnfusedOptimizer) keeps
# one fp32 tensor per parameter.
OPTIMIZER_ZERO_STAGES: dict[str, tuple[int, ...]] = {"adam": (0, 1, 2, 3), "adamw": (0, 1, 2, 3), "lamb": (0,)}
_WHY = {"lamb": " (ZeRO 1-3 flatten each parameter group; LAMB's trust ratio is per tensor)"}


def conflict(cfg: Any) -> str | None:
    """One line naming the keys of the first contradiction in the RunConfig `cfg`; None when there is none."""
    train = cfg.train
    start = train.warmup_steps + train.hold_steps
    if train.cosine_end is not None and train.cosine_end <= start:
        return f"train.cosine_end ({train.cosine_end}) must be after train.warmup_steps + train.hold_steps ({start})"
    return engine_conflict(train.optimizer, cfg.deepspeed.zero_stage, cfg.model.shared_rel_bias) or distill_conflict(
        cfg
    )


def distill_conflict(cfg: Any) -> str | None:
    """Hidden-state distillation needs layers, and layers the student has (the teacher's: train/teacher.py)."""
    d, n = cfg.distill, cfg.model.num_layers
    if d.hidden_weight > 0 and not d.hidden_layers:
        return "distill.hidden_weight needs distill.hidden_layers (the layers whose outputs are matched)"
    bad = [i for i in d.hidden_layers if not 0 <= i < n]
    if bad:
        return f"distill.hidden_layers: layer {bad[0]} does not exist (model.num_layers is {n}: layers 0 to {n - 1})"
    return None


def engine_conflict(optimizer: str, zero_stage: int, shared_rel_bias: bool) -> str | None:
    """One line naming both keys when DeepSpeed cannot run this combination; None when it can."""
    allowed = OPTIMIZER_ZERO_STAGES[optimizer]
    if zero_stage not in allowed:
        return (
            f"train.optimizer {optimizer} cannot run at deepspeed.zero_stage {zero_stage}: allowed zero_stage "
            f"{', '.join(map(str, allowed))}{_WHY.get(optimizer, '')}"
        )
    if shared_rel_bias and zero_stage == 3:
        return (
            "model.shared_rel_bias cannot run at deepspeed.zero_stage 3 (every layer reads the shared u/v, "
            "which ZeRO-3 gathers only around the module owning them); use zero_stage 0-2"
        )
    return None


def search_conflict(cfg: Any) -> str | None:
    """What a search (`tune`, `run`) needs beyond a valid recipe; None when nothing is missing. Checked by
    the search commands only: `train` of a recipe with a `tune:` section runs no search.

    Every report to Tune carries valid_ppl (the scheduler's metric): the first checkpoint, where the first
    report is made, must come at or after the first evaluation, for the base recipe and both ends of every
    searched domain."""
    base = {"train.checkpoint_every": cfg.train.checkpoint_every, "train.eval_every": cfg.train.eval_every}
    for sample in cfg.tune.samples() if cfg.tune is not None else [{}]:
        values = {**base, **{k: v for k, v in sample.items() if k in base}}
        ckpt, every = values["train.checkpoint_every"], values["train.eval_every"]
        if ckpt < every:
            return (
                f"train.checkpoint_every ({ckpt}) must be at least train.eval_every ({every}) in a search: "
                "each report to Tune needs a validation perplexity"
            )
    return None
