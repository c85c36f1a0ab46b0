"""What each phase trains, and the DeepSpeed config, optimizer and schedule generated from the YAML.

No Ray here and no DeepSpeed import: this module only builds plain torch objects and the dict that
`deepspeed.initialize` takes, so it is unit-testable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from allatt_dist.config import GateConfig, RunConfig
from allatt_dist.errors import ConfigError
from allatt_dist.model.gates import SparsityObjective
from allatt_dist.model.transformer import LanguageModel

Phase = Literal["dense", "prune", "finetune"]
PHASES: tuple[Phase, ...] = ("dense", "prune", "finetune")


class TrainModule(nn.Module):
    """The module DeepSpeed wraps: the LM plus, in the prune phase, its sparsity objective."""

    def __init__(self, lm: LanguageModel, objective: SparsityObjective | None):
        super().__init__()
        self.lm, self.objective = lm, objective

    def forward(self, x: torch.Tensor, y: torch.Tensor, mems: list[torch.Tensor] | None, step: int):
        """x, y: (b,T) -> (total loss, LM loss, new mems, gate stats)."""
        lm_loss, mems = self.lm.loss(x, y, mems)
        if self.objective is None:
            return lm_loss, lm_loss.detach(), mems, {}
        reg, stats = self.objective(self.lm.gates, step)
        return lm_loss + reg, lm_loss.detach(), mems, stats


@dataclass(frozen=True)
class PhaseSpec:
    phase: Phase
    max_steps: int
    lr: float
    gates: GateConfig | None  # gated model and sparsity objective in the prune phase
    constant_lr: bool = False  # no warm-up, no decay (prune.constant_lr / finetune.constant_lr)


def phase_spec(cfg: RunConfig, phase: Phase) -> PhaseSpec:
    if phase == "dense":
        return PhaseSpec(phase, cfg.train.max_steps, cfg.train.lr, None)
    section = cfg.prune if phase == "prune" else cfg.finetune
    lr = section.lr or cfg.train.lr
    return PhaseSpec(phase, section.max_steps, lr, cfg.gates if phase == "prune" else None, section.constant_lr)


def param_groups(module: TrainModule, cfg: RunConfig, spec: PhaseSpec) -> list[dict[str, Any]]:
    """Weights (with weight decay) and, when gated, gate logits + Lagrange multipliers (own lr, no decay)."""
    gate_params, weights = [], []
    for name, p in module.named_parameters():
        (gate_params if name.endswith("log_alpha") or name.endswith("lambdas") else weights).append(p)
    groups = [{"params": weights, "lr": spec.lr, "weight_decay": cfg.train.weight_decay, "name": "weights"}]
    if gate_params:
        groups.append({"params": gate_params, "lr": cfg.gates.lr, "weight_decay": 0.0, "name": "gates"})
    return groups


def lr_multiplier(step: int, cfg: RunConfig, max_steps: int) -> float:
    """Linear warm-up over train.warmup_steps, then cosine decay to train.min_lr_ratio."""
    warm = cfg.train.warmup_steps
    if step < warm:
        return (step + 1) / warm
    span = max(1, max_steps - warm)
    progress = min(1.0, (step - warm) / span)
    floor = cfg.train.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(cfg: RunConfig, max_steps: int, constant: bool = False):
    """A callable for `deepspeed.initialize(lr_scheduler=...)`: torch's LambdaLR, gates kept constant
    (and the weights too with `constant`)."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        fns = [
            (lambda s: 1.0) if g.get("name") == "gates" or constant else (lambda s: lr_multiplier(s, cfg, max_steps))
            for g in optimizer.param_groups
        ]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)

    return build


def make_torch_optimizer(groups: list[dict[str, Any]], cfg: RunConfig) -> torch.optim.Optimizer:
    """CPU runs use torch's fused Adam/AdamW: one kernel per parameter group instead of a handful of
    element-wise passes per tensor (DeepSpeed's own CPU Adam is a C++ op built by JIT, ~1 min)."""
    kind = cfg.train.optimizer
    if kind == "lamb":
        raise ConfigError("train.optimizer: lamb needs a GPU (DeepSpeed FusedLamb); use adam or adamw on CPU")
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=groups[0]["lr"], betas=(0.9, 0.999), eps=1e-8, fused=True)


def deepspeed_config(cfg: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (the optimizer section only on GPU: FusedAdam/FusedLamb)."""
    ds = cfg.deepspeed
    if ds.precision == "fp16" and not on_gpu:
        raise ConfigError("deepspeed.precision: fp16 needs a GPU (scaling.use_gpu=true); use fp32 or bf16 on CPU")
    if cfg.train.optimizer == "lamb" and not on_gpu:
        raise ConfigError("train.optimizer: lamb needs a GPU (DeepSpeed FusedLamb); use adam or adamw on CPU")
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.train.batch_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    if on_gpu:
        name = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb"}[cfg.train.optimizer]
        params = {"lr": cfg.train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.train.weight_decay}
        out["optimizer"] = {"type": name, "params": params}
    return out
