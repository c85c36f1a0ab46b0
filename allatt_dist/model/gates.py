"""Hard Concrete head gates (Louizos et al. 2018) and the sparsity objectives of Shim et al. 2021.

One gate per head per layer, with a trainable logit `log_alpha`. In training a gate is sampled:

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    s_bar = clamp(s * (zeta - gamma) + gamma, 0, 1);  z = 1[s_bar > 0.5]   (straight-through)

The sampled gate opens when s > c = (0.5 - gamma) / (zeta - gamma), i.e. when the logistic noise
L = log u - log(1 - u) satisfies L + log_alpha > theta with theta = beta * logit(c). So a head is open in
training with probability sigmoid(log_alpha - theta), and one threshold serves everywhere: the eval gate
is open exactly when log_alpha > theta (the head is open more often than not), the Lagrangian counts a
head as kept with probability sigmoid(log_alpha - theta), and pruning keeps the heads with log_alpha >
theta. For the default stretch, gamma + zeta = 1, c = 1/2 and theta = 0. The eval test is made on
log_alpha itself, so it agrees bit for bit with `open_mask()` and physical pruning is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from allatt_dist.config import GateConfig

GATE_PARAM = "log_alpha"  # the name of a gate's trainable logits (HeadGate's one parameter)


class HeadGate(nn.Module):
    """Gates of the heads of one layer: `forward()` returns z (H,) in {0, 1}."""

    def __init__(self, num_heads: int, cfg: GateConfig):
        super().__init__()
        self.beta, self.gamma, self.zeta = cfg.temperature, cfg.gamma, cfg.zeta
        self.threshold = open_threshold(cfg)  # theta: open when log_alpha + noise > theta
        self.inclusive = cfg.open_at_threshold  # open also at equality (>=), as the authors' code
        self.log_alpha = nn.Parameter(torch.empty(num_heads))  # (H,); named GATE_PARAM
        self.noise: torch.Generator | None = None  # training samples draw from it when set (one per step)
        self.cut: torch.Tensor | None = None  # (H,) bool: the final cut's decision, overriding the eval gate
        self.reset_parameters(cfg)

    def reset_parameters(self, cfg: GateConfig) -> None:
        with torch.no_grad():
            if cfg.proper_init:
                self.log_alpha.fill_(cfg.init)  # every head starts open, with margin
            else:  # Louizos et al.: centred near a keep-probability of 1/2
                self.log_alpha.normal_(0.0, 0.01)

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def probabilities(self, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """P(z = 1), the probability that the sampled gate is open, (H,); the eval gate is open where it
        is above 1/2 (decide that with `open_mask`, which does not round).
        `log_alpha`: other values of this gate's logits (e.g. the optimizer's fp32 master copy)."""
        return torch.sigmoid((self.log_alpha if log_alpha is None else log_alpha) - self.threshold)

    def forward(self) -> torch.Tensor:
        if not self.training:
            # Same decision as open_mask(): thresholding sigmoid(log_alpha - theta) in floating point
            # would close heads just above theta, so the pruned model would not match the gated one.
            return self.open_mask().to(self.log_alpha.dtype)  # (H,)
        eps = 1e-6
        la = self.log_alpha
        u = torch.rand(la.shape, generator=self.noise, device=la.device, dtype=la.dtype).clamp(eps, 1 - eps)  # (H,)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)  # (H,)
        soft = self._stretch(s)  # (H,)
        return _HardThreshold.apply(soft, self.inclusive)  # (H,) exactly 0/1, straight-through gradient

    def open_probability(self) -> torch.Tensor:
        """P(s_bar > 0) under the Hard Concrete distribution, (H,): the L0 term of one head.

        This is Louizos et al.'s expected L0 norm: the probability that the stretched sample is
        non-zero. The hard gate used in the forward pass thresholds s_bar at 0.5, so it is open less
        often (P = sigmoid(log_alpha - theta), `probabilities()`); the penalty counts a head until
        its stretched sample is clamped to exactly 0.
        """
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def open_mask(self, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Heads kept by pruning, (H,) bool: exactly those the eval gate leaves open (log_alpha > theta;
        >= with `gates.open_at_threshold`), or the final cut's decision once one is made (`cut`)."""
        if self.cut is not None:
            return self.cut.to(self.log_alpha.device)
        la = (self.log_alpha if log_alpha is None else log_alpha).detach()  # (H,)
        return la >= self.threshold if self.inclusive else la > self.threshold

    @torch.no_grad()
    def set_open(self, mask: torch.Tensor, margin: float = 3.0) -> None:
        """Set the logits so that exactly the heads in `mask` (H,) bool are open: theta +- margin."""
        m = mask.to(self.log_alpha.device)  # (H,)
        self.log_alpha.copy_(torch.where(m, self.threshold + margin, self.threshold - margin))  # (H,)


class GatedModule(nn.Module):
    """The gate accessors of a model whose layers may hold `HeadGate`s (LanguageModel, and any other
    registered family's model): training, pruning, export and parameter counts use only these."""

    @property
    def gates(self) -> list[HeadGate]:
        """Every head gate, in module order (one per gated layer); [] for an ungated model."""
        return [m for m in self.modules() if isinstance(m, HeadGate)]

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        """The gate logits by their names in `named_parameters()` / `state_dict()`."""
        return {
            f"{name}.{GATE_PARAM}" if name else GATE_PARAM: getattr(m, GATE_PARAM)
            for name, m in self.named_modules()
            if isinstance(m, HeadGate)
        }

    def weight_state_dict(self) -> dict[str, torch.Tensor]:
        """The state without the gates: what a gated model shares with its dense or pruned relatives."""
        gate_names = self.gate_parameters()
        return {k: v for k, v in self.state_dict().items() if k not in gate_names}


def open_threshold(cfg: GateConfig) -> float:
    """theta = beta * logit((0.5 - gamma) / (zeta - gamma)): the sampled gate is open when the logistic
    noise plus log_alpha exceeds it. Exactly 0 for a symmetric stretch (gamma + zeta = 1)."""
    if math.isclose(cfg.gamma + cfg.zeta, 1.0, rel_tol=0.0, abs_tol=1e-12):
        return 0.0
    return cfg.temperature * (math.log(0.5 - cfg.gamma) - math.log(cfg.zeta - 0.5))


def expected_open(gates: list[HeadGate]) -> torch.Tensor:
    """The L0 penalty: expected number of open gates over all layers (scalar)."""
    return torch.stack([g.open_probability().sum() for g in gates]).sum()


def warmup_factor(step: int, cfg: GateConfig) -> float:
    """Sparsity-loss warm-up: 0 before `warmup_start`, then a linear ramp to 1 over `warmup_steps`."""
    if step < cfg.warmup_start:
        return 0.0
    if cfg.warmup_steps <= 0:
        return 1.0
    return min(1.0, (step - cfg.warmup_start + 1) / cfg.warmup_steps)


class _HardThreshold(torch.autograd.Function):
    """1[s_bar > 0.5] (or >= with `inclusive`) forward, identity backward (straight-through). Unlike
    `hard + soft - soft.detach()`, which rounds an open gate to 0.99999994 for some samples, the
    forward value is exactly 0 or 1."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
        return (soft >= 0.5 if inclusive else soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _FlipGrad(torch.autograd.Function):
    """Identity forward, negated gradient: lets one optimizer ascend the Lagrange multipliers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class SparsityObjective(nn.Module):
    """The sparsity term added to the LM loss.

    - `l0` mode: coefficient * warm-up(step) * expected_open (the paper's fixed lambda).
    - `target` mode: a Lagrangian l1 * (s - t) + l2 * (s - t)^2 with s the expected fraction of
      closed heads and t the target, ramped in over the warm-up; l1, l2 are trained by gradient
      ascent (their gradient is flipped, so the same optimizer step maximises over them).

    "Closed" means what pruning removes: the hard gate z = 0, i.e. the stretched sample <= 0.5,
    which has probability 1 - sigmoid(log_alpha - theta) (theta = 0 for the default stretch, at any
    temperature). (The L0 term's P(s_bar > 0)
    is larger, by a margin that grows with beta: driving *it* to t left the pruned models of hot
    gates far sparser than asked, 44% for a 25% target at beta = 0.66 in the quickstart.)
    """

    def __init__(self, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        self.lambdas = nn.Parameter(torch.zeros(2))  # (2,) l1, l2; unused in l0 mode

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        """The Lagrange multipliers by name: trained with the gate logits (gate lr, no weight decay)."""
        return {"lambdas": self.lambdas}

    def target_at(self, step: int) -> float:
        return (self.cfg.sparsity_target or 0.0) * warmup_factor(step, self.cfg)

    def forward(self, gates: list[HeadGate], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        n_open = expected_open(gates)  # scalar, the L0 penalty
        keep = torch.cat([g.probabilities() for g in gates])  # (L*H,) P(z = 1)
        sparsity = 1.0 - keep.mean()  # scalar, expected fraction of heads pruning removes
        stats = {"l0_penalty": float(n_open.detach()), "expected_sparsity": float(sparsity.detach())}
        if self.cfg.mode == "target":
            t = self.target_at(step)
            gap = sparsity - t
            lam = _FlipGrad.apply(self.lambdas)  # (2,)
            loss = lam[0] * gap + lam[1] * gap * gap
            stats.update(target=t, lambda_1=float(self.lambdas[0].detach()), lambda_2=float(self.lambdas[1].detach()))
            return loss, stats
        coef = (self.cfg.l0_coefficient or 0.0) * warmup_factor(step, self.cfg)
        stats["l0_coefficient"] = coef
        return coef * n_open + 0.0 * self.lambdas.sum(), stats
