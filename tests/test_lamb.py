"""The authors' optimizer and schedule as this project runs them: LAMB (train/lamb.py) against its
formula, the paper recipe's learning rates against the rates their HappyCosineLR gave when their
train.py ran it, and the gate logits' own rate. No Ray, no DeepSpeed: plain torch objects."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch

from allatt_dist.recipe import load_config
from allatt_dist.train.lamb import Lamb
from allatt_dist.train.setup import client_optimizer, lr_multiplier, make_scheduler, phase_spec

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "tune_configs/paper_wt103.yaml"


def lamb_reference(w, g, m, v, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """One update of one tensor, in float64, written from the formula (docs/reproduce.md): Adam moments
    without bias correction, the Adam step plus decay, the trust ratio min(|w|, 10) / (|step| + eps), 1
    when either norm is 0."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = m / (v.sqrt() + eps) + wd * w
    wn, sn = min(float(w.norm()), 10.0), float(step.norm())
    ratio = 1.0 if wn == 0.0 or sn == 0.0 else wn / (sn + eps)
    return w - lr * ratio * step, m, v, ratio


SHAPES = {
    "vector": (7,),
    "matrix": (5, 3),
    "3d": (2, 3, 4),
    "scalar-like": (1,),
    "large (|w| > 10, clamped)": (40, 40),
}


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_step_equals_the_formula(wd):
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    tensors["zero weights"] = torch.zeros(4, 4, dtype=torch.float64)  # |w| = 0: ratio 1
    tensors["zero gradient"] = torch.randn(6, generator=gen, dtype=torch.float64)  # |step| = 0 (wd 0): ratio 1
    assert float(tensors["large (|w| > 10, clamped)"].norm()) > 10
    params = {k: torch.nn.Parameter(t.clone()) for k, t in tensors.items()}
    lr = 0.01
    opt = Lamb([{"params": list(params.values()), "lr": lr, "weight_decay": wd}])
    ref = {k: (t.clone(), torch.zeros_like(t), torch.zeros_like(t)) for k, t in tensors.items()}
    ratios: list[dict[str, float]] = []
    for _ in range(3):  # three steps: the moments carry over
        ratios.append({})
        for k, p in params.items():
            p.grad = torch.zeros_like(p) if k == "zero gradient" else torch.randn(p.shape, generator=gen).double()
            w, m, v = ref[k]
            w2, m2, v2, ratios[-1][k] = lamb_reference(w, p.grad, m, v, lr, wd)
            ref[k] = (w2, m2, v2)
        opt.step()
        for k, p in params.items():
            torch.testing.assert_close(p.detach(), ref[k][0], rtol=1e-12, atol=1e-15, msg=k)
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref[k][1], rtol=1e-12, atol=1e-15)
    first = ratios[0]
    assert first["zero weights"] == 1.0 and ratios[1]["zero weights"] != 1.0  # |w| = 0 at the first step only
    # no gradient: the Adam step is 0 (ratio 1), or with decay wd w, whose ratio is 1/wd (|w| < 10)
    assert [r["zero gradient"] for r in ratios] == pytest.approx([1.0] * 3 if wd == 0.0 else [1 / wd] * 3, rel=1e-6)
    assert first["large (|w| > 10, clamped)"] < 10.0 / 39  # |w| = 40 clamped to 10; |step| ~ 40
    assert not math.isclose(first["vector"], first["matrix"])  # one ratio per tensor, not per group
    assert opt.state[params["vector"]]["step"] == 3


def test_lamb_does_not_clamp_the_ratio_and_buckets_dtypes():
    """A tiny update on a large weight gives a ratio far above FusedLamb's clamp of 10; tensors of
    different dtypes in one group each get their own (bucketed) step."""
    w32 = torch.nn.Parameter(torch.full((100,), 0.5))  # |w| = 5
    w16 = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    opt = Lamb([{"params": [w32]}, {"params": [w16], "lr": 0.1}], lr=1e-3)
    w32.grad = torch.full((100,), 1e-3)
    w16.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    # step = m/(sqrt(v)+eps) = 0.1 g / (sqrt(0.001) |g| + eps) per element: |step| = 10 * 0.1/sqrt(0.001) = 31.6
    # ratio = 5 / 31.6 = 0.158; each element moves by lr * ratio * 3.16 = 5e-4
    torch.testing.assert_close(w32.detach(), torch.full((100,), 0.5 - 5e-4), rtol=0, atol=1e-6)
    assert w16.dtype == torch.bfloat16 and float(w16.detach()[0]) < 1.0


def their_executed_rate(update: int, base: float, floor: float, keep: int, total: int) -> float:
    """The learning rate of optimizer update `update` (0-based) in the authors' train.py with their
    HappyCosineLR (config/wt103_all_16l_train.json: max_iterations `total` = 20, init_keep_iterations
    `keep` = 1, min_lr `floor` = 0.001, warm-up 0 since the key is misspelled). Their scheduler does not
    touch the rate when built (it counts from -1) and steps after every update, so update 0 runs at the
    optimizer's own rate and update u > 0 at the scheduler's iteration u - 1: the base rate for the first
    `keep` iterations, then a cosine from the base rate (its first point) to the floor at iteration
    `total`, then the floor."""
    if update == 0:
        return base
    it = update - 1
    if it < keep:
        return base
    if it >= total:
        return floor
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * (it - keep) / (total - keep)))


def test_paper_schedule_equals_their_executed_rates():
    cfg = load_config(PAPER)
    spec = phase_spec(cfg, "dense")
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": spec.lr, "name": "weights"}], lr=spec.lr)
    sched = make_scheduler(cfg, spec.max_steps, spec.constant_lr)(opt)  # what DeepSpeed gets
    ours = []
    for _ in range(1001):
        ours.append(opt.param_groups[0]["lr"])  # the rate this update uses
        opt.step()
        sched.step()
    theirs = [their_executed_rate(u, 0.01, 0.001, keep=1, total=20) for u in range(1001)]
    for u in (0, 1, 10, 20, 1000):
        assert ours[u] == pytest.approx(theirs[u], rel=1e-12, abs=0), u
    assert ours == pytest.approx(theirs, rel=1e-12)  # every update, not only the five
    assert ours[:3] == [0.01] * 3 and ours[3] < 0.01 and ours[21:] == pytest.approx([0.001] * 980, rel=1e-12)


def test_the_other_reading_cosine_over_the_whole_run():
    """docs/reproduce.md's one-line alternative: a 1-epoch warm-up and a cosine over all 56,000 steps."""
    sets = ["train.warmup_steps=2800", "train.hold_steps=0", "train.cosine_end=null"]
    cfg = load_config(PAPER, sets)
    m = [lr_multiplier(s, cfg, cfg.train.max_steps) for s in (0, 2799, 2800, 29400, 55999, 56000)]
    assert m[0] == pytest.approx(1 / 2800) and m[1] == m[2] == 1.0
    assert m[3] == pytest.approx(0.1 + 0.9 * 0.5) and m[4] == pytest.approx(0.1, abs=1e-8) and m[5] == 0.1


def test_gate_logits_train_ten_times_faster_in_the_prune_phase():
    """train_gating.py puts the gate parameters in their own group at lr x 10 (1e-3 next to 1e-4), both constant."""
    from allatt_dist.model.gates import SparsityObjective
    from allatt_dist.model.transformer import LanguageModel
    from allatt_dist.train.setup import TrainModule, param_groups

    cfg = load_config(PAPER, ["model.num_layers=2", "model.hidden_dim=32", "model.num_persistent=4"])
    cfg = cfg.with_values({"model.adaptive_cutoffs": [40], "model.seq_len": 8, "model.mem_len": 8})
    spec = phase_spec(cfg, "prune")
    module = TrainModule(LanguageModel(cfg.model, 50, spec.gates), SparsityObjective(spec.gates))
    groups = param_groups(module, cfg, spec)
    assert [g["name"] for g in groups] == ["weights", "gates"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == pytest.approx(1e-3, rel=1e-12)
    opt = client_optimizer(groups, cfg)
    assert isinstance(opt, Lamb) and opt.defaults["eps"] == 1e-8
    sched = make_scheduler(cfg, spec.max_steps, spec.constant_lr)(opt)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3], rel=1e-12)


def test_deepspeed_keeps_lamb_per_tensor_at_zero_0(monkeypatch):
    """The engine the workers build (client optimizer, ZeRO 0, bf16 as the CPU stand-in for fp16): its
    precision wrapper hands LAMB one fp32 master tensor per parameter, of the parameter's shape, and the
    first update equals LAMB on those masters (the trust ratio per tensor, not per flattened group)."""
    import deepspeed
    import torch.distributed as dist

    from allatt_dist.train.setup import deepspeed_config

    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(PAPER, ["scaling.num_workers=1", "train.batch_size=2", "scaling.use_gpu=false"])
    cfg = cfg.with_values({"deepspeed.precision": "bf16"})
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    groups = [{"params": list(model.parameters()), "lr": 0.01, "weight_decay": 0.0, "name": "weights"}]
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=client_optimizer(groups, cfg),
            config=deepspeed_config(cfg),
            dist_init_required=False,
        )
        wrapper, lamb = engine.optimizer, engine.basic_optimizer
        assert type(wrapper).__name__ == "FP16_UnfusedOptimizer" and isinstance(lamb, Lamb)
        masters = lamb.param_groups[0]["params"]
        assert [m.shape for m in masters] == [p.shape for p in model.parameters()]  # per tensor, not flat
        before = [m.detach().clone() for m in masters]
        x = torch.randn(2, 6).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        grads = [p.grad.float().clone() if p.grad is not None else None for p in model.parameters()]
        engine.step()
        assert all(g is not None for g in grads)
        for w0, m in zip(before, masters, strict=True):
            g = lamb.state[m]["exp_avg"] / 0.1  # the first step's moment is 0.1 g (after clipping)
            want, *_ = lamb_reference(
                w0.double(), g.double(), torch.zeros_like(w0).double(), torch.zeros_like(w0).double(), 0.01, 0.0
            )
            torch.testing.assert_close(m.detach().double(), want, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()
