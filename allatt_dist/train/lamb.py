"""LAMB as the paper's authors define it, one optimizer for CPU and GPU (`train.optimizer: lamb`).

Per tensor w with gradient g (Adam moments m, v; no bias correction):

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) + eps) + wd w                      (the Adam step, decay added before the norms)
    r  = min(|w|, 10) / (|u| + eps), or 1 when |w| = 0 or |u| = 0       (the trust ratio, not clamped)
    w <- w - lr r u

with eps = 1e-8 and |.| the L2 norm of the whole tensor. This is the update of the authors' optimizer
as their config builds it (no debiasing, the weight norm clamped to [0, 10]; docs/reproduce.md); it is
not DeepSpeed's FusedLamb, which bias-corrects and clamps the ratio itself to [0.01, 10].

The trust ratio needs each tensor whole, so DeepSpeed gets this optimizer as its client optimizer at
ZeRO stage 0 only (its fp16/bf16 wrapper there, FP16_UnfusedOptimizer, keeps one fp32 master tensor per
parameter); ZeRO 1-3 flatten a parameter group into one tensor and would make the ratio one per group
(config.py refuses the combination). The moments and norms go through torch's `_foreach` kernels, a
handful of launches per (device, dtype) bucket instead of per tensor, and no host sync: the ratios stay
on the device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

WEIGHT_NORM_MAX = 10.0  # the authors' clamp of |w| (nnlib/optim/lamb.py)


class Lamb(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps <= 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: bad hyper-parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Lamb does not take sparse gradients")
                    buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._step_bucket(params, group)
        return loss

    def _step_bucket(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """One group's tensors of one device and dtype: moments, Adam step, per-tensor ratio, update."""
        beta1, beta2 = group["betas"]
        eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
        grads = [p.grad for p in params]
        m, v = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)  # the Adam step, per tensor
        if wd != 0.0:
            torch._foreach_add_(update, params, alpha=wd)
        acc = torch.promote_types(params[0].dtype, torch.float32)  # norms and ratios at least in fp32
        w_norm = torch.stack(torch._foreach_norm(params)).to(acc).clamp_(0.0, WEIGHT_NORM_MAX)  # (n,)
        u_norm = torch.stack(torch._foreach_norm(update)).to(acc)  # (n,)
        ratio = torch.where((w_norm == 0) | (u_norm == 0), torch.ones_like(w_norm), w_norm / (u_norm + eps))
        scale = (ratio * -lr).to(params[0].dtype)  # (n,) on the device: no host sync
        torch._foreach_mul_(update, list(scale.unbind(0)))
        torch._foreach_add_(params, update)
