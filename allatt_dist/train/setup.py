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

from allatt_dist.config import DistillConfig, GateConfig, RunConfig
from allatt_dist.errors import ConfigError
from allatt_dist.model.gates import SparsityObjective
from allatt_dist.model.targets import heads_to_remove, training_gates
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.train.teacher import distilled_loss

Phase = Literal["dense", "prune", "finetune"]
PHASES: tuple[Phase, ...] = ("dense", "prune", "finetune")


class TrainModule(nn.Module):
    """The module DeepSpeed wraps: the LM plus, in the prune phase, its sparsity objective."""

    def __init__(
        self,
        lm: LanguageModel,
        objective: SparsityObjective | None,
        distill: DistillConfig | None = None,
        teacher_width: int | None = None,
    ):
        super().__init__()
        self.lm, self.objective, self.distill = lm, objective, distill
        self.hidden_map = None  # distill: a learned linear map per matched layer where the widths differ
        width = lm.cfg.hidden_dim
        if distill is not None and distill.hidden_weight > 0 and teacher_width not in (None, width):
            self.hidden_map = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in distill.hidden_layers)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mems: list[torch.Tensor] | None,
        step: int,
        teacher: tuple | None = None,
    ):
        """x, y: (b,T) -> (total loss, LM loss, new mems, stats: the gates', and `kl`/`hidden` when distilling).
        `teacher`: (log-probabilities (b,T,V), matched layers' outputs) of the teacher (train/teacher.py),
        given when the phase distils; the loss then adds the weighted distillation terms."""
        stats: dict = {}
        if teacher is None:
            lm_loss, mems = self.lm.loss(x, y, mems)
            loss = lm_loss
        else:
            lm_loss, terms, mems = distilled_loss(self.lm, x, y, mems, teacher, self.distill, self.hidden_map)
            weights = {"kl": self.distill.kl_weight, "hidden": self.distill.hidden_weight}
            loss = lm_loss + sum(weights[k] * v for k, v in terms.items())
            stats = {k: float(v.detach()) for k, v in terms.items()}
        if self.objective is None:
            return loss, lm_loss.detach(), mems, stats
        reg, gate_stats = self.objective(self.lm.gates, step)
        return loss + reg, lm_loss.detach(), mems, gate_stats | stats

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        """Gate logits and Lagrange multipliers, by their names in this module."""
        out = {f"lm.{k}": p for k, p in self.lm.gate_parameters().items()}
        if self.objective is not None:
            out.update({f"objective.{k}": p for k, p in self.objective.gate_parameters().items()})
        return out


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
    gates = training_gates(cfg.model, cfg.gates) if phase == "prune" else None
    return PhaseSpec(phase, section.max_steps, lr, gates, section.constant_lr)


def cut_size(cfg: RunConfig, spec: PhaseSpec) -> int | None:
    """Heads the final cut removes at the end of this phase; None when there is no cut (not the prune
    phase, L0 mode, or `gates.final_cut: false`: the paper's rule, keep what the eval gate opens)."""
    if spec.gates is None or not cfg.gates.final_cut:
        return None
    return heads_to_remove(cfg.model, cfg.gates)


def seed_step(seed: int, rank: int, index: int, device: torch.device, per_rank: bool = False) -> torch.Generator:
    """The randomness of micro-step `index`. Dropout draws from torch's global generator, seeded per rank,
    so every rank drops its own units; the gates draw from the returned generator, seeded alike on every
    rank, so all ranks train the same sampled architecture in a step (one sample per global batch, as a
    single device with the whole batch would: the gradients the ranks average belong to one sub-network).
    `per_rank` (gates.per_rank_samples, the authors' way): the gate generator is seeded per rank too, so
    every rank samples its own sub-network."""
    torch.manual_seed((seed * 1_000_003 + index) * 65_537 + rank + 1)
    gate_seed = seed * 1_000_003 + index
    return torch.Generator(device=device).manual_seed(gate_seed * 65_537 + rank + 1 if per_rank else gate_seed)


def row_shift_seed(cfg: RunConfig) -> int | None:
    """The seed of the training stream's per-epoch row offsets (train.row_shift); None: no offsets."""
    return cfg.train.seed if cfg.train.row_shift else None


def tb_step_offset(cfg: RunConfig, phase: Phase) -> int:
    """Steps of the phases before `phase` (TensorBoard continues their count: dense, then prune, then
    finetune on one axis). Taken from the config: a trial's dense model is the recipe's dense phase."""
    before = PHASES[: PHASES.index(phase)]
    return sum(phase_spec(cfg, p).max_steps for p in before)


def param_groups(module: TrainModule, cfg: RunConfig, spec: PhaseSpec) -> list[dict[str, Any]]:
    """Weights (with weight decay) and, when gated, gate logits + Lagrange multipliers (own lr, no decay)."""
    gate_ids = {id(p) for p in module.gate_parameters().values()}
    gate_params, weights = [], []
    for p in module.parameters():  # in module order, as the optimizer state is saved and restored
        (gate_params if id(p) in gate_ids else weights).append(p)
    groups = [{"params": weights, "lr": spec.lr, "weight_decay": cfg.train.weight_decay, "name": "weights"}]
    if gate_params:
        gate_lr = spec.lr * cfg.gates.lr_scale if cfg.gates.lr_scale is not None else cfg.gates.lr
        groups.append({"params": gate_params, "lr": gate_lr, "weight_decay": 0.0, "name": "gates"})
    return groups


def lr_multiplier(step: int, cfg: RunConfig, max_steps: int) -> float:
    """The rate of update `step` (0-based) over the base rate: a linear warm-up over train.warmup_steps,
    the full rate for train.hold_steps, then a cosine down to train.min_lr_ratio reached at step
    train.cosine_end (default: max_steps) and held after it. The authors' HappyCosineLR as their train.py
    ran it is hold_steps 2, cosine_end 21 (docs/reproduce.md, "The schedule")."""
    t = cfg.train
    start = t.warmup_steps + t.hold_steps
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if step < start:
        return 1.0
    end = t.cosine_end if t.cosine_end is not None else max_steps
    progress = min(1.0, (step - start) / max(1, end - start))
    floor = t.min_lr_ratio
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


def client_optimizer(groups: list[dict[str, Any]], cfg: RunConfig) -> torch.optim.Optimizer | None:
    """The optimizer handed to `deepspeed.initialize`: LAMB (train/lamb.py) on CPU and GPU; None for Adam
    and AdamW on GPU (DeepSpeed's FusedAdam, from the config's optimizer section)."""
    if cfg.train.optimizer != "lamb":
        return None if cfg.scaling.use_gpu else make_torch_optimizer(groups, cfg)
    from allatt_dist.train.lamb import Lamb

    return Lamb(groups, lr=groups[0]["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.train.weight_decay)


def make_torch_optimizer(groups: list[dict[str, Any]], cfg: RunConfig) -> torch.optim.Optimizer:
    """CPU runs use torch's fused Adam/AdamW: one kernel per parameter group instead of a handful of
    element-wise passes per tensor (DeepSpeed's own CPU Adam is a C++ op built by JIT, ~1 min). LAMB is
    `client_optimizer`'s on CPU and GPU alike."""
    kind = cfg.train.optimizer
    if kind == "lamb":
        return client_optimizer(groups, cfg)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(groups, lr=groups[0]["lr"], betas=(0.9, 0.999), eps=1e-8, fused=True)


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run (the optimizer section only for Adam/AdamW on GPU: FusedAdam).
    Called once per plan (`plan.make_plan`); the workers receive the result."""
    ds, on_gpu = cfg.deepspeed, cfg.scaling.use_gpu
    if ds.precision == "fp16" and not on_gpu:
        raise ConfigError("deepspeed.precision: fp16 needs a GPU (scaling.use_gpu=true); use fp32 or bf16 on CPU")
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
    if on_gpu and cfg.train.optimizer != "lamb":  # LAMB is the client optimizer (client_optimizer)
        name = {"adam": "Adam", "adamw": "AdamW"}[cfg.train.optimizer]
        params = {"lr": cfg.train.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.train.weight_decay}
        out["optimizer"] = {"type": name, "params": params}
    return out
