"""Hard Concrete head gates, the L0 / target objectives and the paper's three methods (warm-up, proper
initialisation, attention output scaling), with short training runs on real WikiText-2 text."""

from __future__ import annotations

import math

import pytest
import torch

from allatt_dist.config import DataConfig, GateConfig, ModelConfig
from allatt_dist.data.corpus import Corpus, load_corpus
from allatt_dist.data.stream import LMStream
from allatt_dist.evaluate import evaluate
from allatt_dist.model.gates import HeadGate, SparsityObjective, warmup_factor
from allatt_dist.model.transformer import LanguageModel

TINY = ModelConfig(
    num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=16, mem_len=16, adaptive_cutoffs=[2000, 6000]
)


@pytest.fixture(scope="module")
def corpus(wt2_path) -> Corpus:
    return load_corpus(DataConfig(path=str(wt2_path)))


def record_stretch(gate: HeadGate) -> list[torch.Tensor]:
    """Keep every stretched sample s_bar the gate computes (the code's own values, not a re-derivation)."""
    seen: list[torch.Tensor] = []
    inner = gate._stretch

    def wrapped(s: torch.Tensor) -> torch.Tensor:
        out = inner(s)
        seen.append(out)
        return out

    gate._stretch = wrapped  # instance attribute shadows the method
    return seen


def set_log_alpha(gate: HeadGate, values) -> None:
    with torch.no_grad():
        gate.log_alpha.copy_(torch.as_tensor(values, dtype=gate.log_alpha.dtype))


# ---- HeadGate -------------------------------------------------------------------------------------


def test_train_samples_are_binary_with_straight_through_gradient():
    gate = HeadGate(256, GateConfig()).train()
    set_log_alpha(gate, torch.linspace(-2, 2, 256))
    soft = record_stretch(gate)
    torch.manual_seed(0)
    z = gate()
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0} and 0 < z.sum() < 256
    w = torch.randn(256)
    (z * w).sum().backward(retain_graph=True)
    # The gradient is that of the soft sample: d s_bar / d log_alpha, zero exactly where s_bar is clamped.
    expected = torch.autograd.grad((soft[0] * w).sum(), gate.log_alpha)[0]
    assert torch.allclose(gate.log_alpha.grad, expected)
    inside = (soft[0] > 0) & (soft[0] < 1)
    assert inside.any() and (gate.log_alpha.grad[inside] != 0).all()
    assert (gate.log_alpha.grad[~inside] == 0).all()


@pytest.mark.parametrize("gamma,zeta", [(-0.1, 1.1), (-0.2, 1.2), (-0.05, 1.05)])
def test_eval_gate_is_open_exactly_when_log_alpha_positive(gamma, zeta):
    values = [0.0, 1e-8, -1e-8, 1e-7, 0.05, 0.15, -0.05, 5.0, -5.0]
    gate = HeadGate(len(values), GateConfig(gamma=gamma, zeta=zeta)).eval()
    assert gate.threshold == 0.0  # a symmetric stretch
    set_log_alpha(gate, values)
    z = gate()
    assert torch.equal(z, (torch.tensor(values) > 0).float())
    assert torch.equal(z.bool(), gate.open_mask())  # what pruning keeps
    torch.manual_seed(1)
    assert torch.equal(gate(), z)  # deterministic


@pytest.mark.parametrize("gamma,zeta,temperature", [(-0.1, 1.5, 2 / 3), (-0.5, 1.1, 2 / 3), (-0.2, 1.1, 1 / 3)])
def test_one_threshold_for_sampling_eval_pruning_and_the_objective(gamma, zeta, temperature):
    """With an asymmetric stretch the sampled gate opens with P = sigmoid(log_alpha - theta), theta =
    beta * logit((0.5 - gamma) / (zeta - gamma)); eval, pruning, P(z = 1) and the target objective all
    use that theta, so a head counted open in training statistics is the one pruning keeps."""
    cfg = GateConfig(gamma=gamma, zeta=zeta, temperature=temperature, sparsity_target=0.5)
    c = (0.5 - gamma) / (zeta - gamma)
    theta = temperature * math.log(c / (1 - c))
    levels = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 2.0]) + theta
    reps = 20_000
    gate = HeadGate(len(levels) * reps, cfg).train()
    assert gate.threshold == pytest.approx(theta, abs=1e-12) and abs(theta) > 0.05
    set_log_alpha(gate, levels.repeat_interleave(reps))
    torch.manual_seed(0)
    with torch.no_grad():
        freq = gate().view(len(levels), reps).mean(1)  # how often the sampled gate is open
    p_open = gate.probabilities().view(len(levels), reps)[:, 0]
    assert torch.allclose(freq, p_open, atol=0.015), (freq, p_open)
    assert torch.allclose(p_open, torch.sigmoid(levels - theta))
    small = HeadGate(len(levels), cfg).eval()
    set_log_alpha(small, levels.tolist())
    assert torch.equal(small().bool(), levels > theta) and torch.equal(small.open_mask(), levels > theta)
    assert torch.equal(small.open_mask(), small.probabilities() > 0.5)  # away from the boundary they agree
    _, stats = SparsityObjective(cfg)([small], step=0)
    assert stats["expected_sparsity"] == pytest.approx(float(1 - torch.sigmoid(levels - theta).mean()), rel=1e-6)


@pytest.mark.parametrize("temperature", [1 / 3, 2 / 3])
def test_open_frequency_matches_l0_formula(temperature):
    levels = torch.tensor([-3.0, -1.5, -0.5, 0.0, 0.5, 1.5])
    reps = 20_000
    cfg = GateConfig(temperature=temperature)
    gate = HeadGate(len(levels) * reps, cfg).train()
    set_log_alpha(gate, levels.repeat_interleave(reps))
    soft = record_stretch(gate)
    torch.manual_seed(0)
    with torch.no_grad():
        z = gate().view(len(levels), reps)
    nonzero = (soft[0] > 0).float().view(len(levels), reps).mean(1)
    formula = torch.sigmoid(levels - temperature * math.log(-cfg.gamma / cfg.zeta))
    assert torch.allclose(gate.open_probability().view(len(levels), reps)[:, 0], formula)
    # The L0 term (Louizos et al.) is P(s_bar != 0): compare with the frequency of non-zero s_bar.
    assert torch.allclose(nonzero, formula, atol=0.015), (nonzero, formula)
    # The hard 0/1 gate thresholds s_bar at 0.5: with gamma + zeta = 1 it opens with P = sigmoid(log_alpha),
    # less often than the L0 term counts.
    assert torch.allclose(z.mean(1), torch.sigmoid(levels), atol=0.015)
    assert torch.allclose(gate.probabilities().view(len(levels), reps)[:, 0], torch.sigmoid(levels))
    assert (z.mean(1) <= nonzero).all()


# ---- (a) warm-up ----------------------------------------------------------------------------------


def test_warmup_factor_ramp():
    cfg = GateConfig(warmup_start=10, warmup_steps=4)
    got = [warmup_factor(s, cfg) for s in (0, 9, 10, 11, 12, 13, 14, 1000)]
    assert got == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor(s, GateConfig(warmup_start=3)) for s in (2, 3, 50)] == [0.0, 1.0, 1.0]


def test_objective_follows_warmup():
    gates = [HeadGate(4, GateConfig()) for _ in range(2)]
    l0 = SparsityObjective(GateConfig(l0_coefficient=0.2, warmup_start=5, warmup_steps=10))
    n_open = float(sum(g.open_probability().detach().sum() for g in gates))
    for step in (0, 4, 5, 9, 14, 40):
        loss, stats = l0(gates, step)
        f = warmup_factor(step, l0.cfg)
        assert stats["l0_coefficient"] == pytest.approx(0.2 * f)
        assert float(loss.detach()) == pytest.approx(0.2 * f * n_open, rel=1e-6)
    tgt = SparsityObjective(GateConfig(sparsity_target=0.6, warmup_start=5, warmup_steps=10))
    targets = [tgt(gates, s)[1]["target"] for s in (0, 4, 5, 9, 14, 40)]
    assert targets == pytest.approx([0.0, 0.0, 0.06, 0.3, 0.6, 0.6])


def test_lagrange_multipliers_ascend():
    gates = [HeadGate(4, GateConfig()) for _ in range(3)]
    obj = SparsityObjective(GateConfig(sparsity_target=0.5))
    with torch.no_grad():
        obj.lambdas.copy_(torch.tensor([0.3, 0.7]))
    loss, stats = obj(gates, step=0)
    loss.backward()
    gap = stats["expected_sparsity"] - 0.5
    # The loss grows with gap * lambda_1; a flipped gradient makes a descent step *raise* lambda_1.
    assert obj.lambdas.grad.tolist() == pytest.approx([-gap, -gap * gap], rel=1e-5)
    assert gates[0].log_alpha.grad is not None and (gates[0].log_alpha.grad != 0).all()


# ---- (b) proper initialisation --------------------------------------------------------------------


def train_steps(model, corpus, steps, objective=None, gate_lr=None, seed=0, record=None):
    torch.manual_seed(seed)
    gate_params = [g.log_alpha for g in model.gates] + ([objective.lambdas] if objective is not None else [])
    ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": 1e-3}]
    if gate_params:
        groups.append({"params": gate_params, "lr": gate_lr})
    opt = torch.optim.Adam(groups)
    stream, mems = LMStream(corpus.tokens("train"), 8, model.cfg.seq_len), None
    model.train()
    for step in range(steps):
        x, y, reset = stream.next_batch()
        loss, mems = model.loss(x, y, None if reset else mems)
        if objective is not None:
            penalty, stats = objective(model.gates, step)
            loss = loss + penalty
            if record is not None:
                record.append(stats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_proper_init_keeps_trained_model_unchanged(corpus):
    torch.manual_seed(0)
    dense = train_steps(LanguageModel(TINY, len(corpus.vocab)), corpus, 30)
    valid = corpus.tokens("valid")
    base = evaluate(dense, valid, batch_size=4, max_segments=6).nll
    results = {}
    for proper in (True, False):
        cfg = GateConfig(proper_init=proper)
        torch.manual_seed(1)
        gated = LanguageModel(TINY, len(corpus.vocab), cfg)
        missing, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and missing and all(k.endswith("gate.log_alpha") for k in missing)
        results[proper] = (evaluate(gated, valid, batch_size=4, max_segments=6).nll, gated)
    nll_proper, gated = results[True]
    assert all(torch.equal(g.log_alpha, torch.full((4,), 2.0)) for g in gated.gates)
    assert nll_proper == base  # every gate open and scale H/H = 1: bit-identical
    assert abs(results[False][0] - base) > 1e-3


def test_improper_init_closes_about_half_the_heads():
    gate = HeadGate(20_000, GateConfig(proper_init=False)).eval()
    la = gate.log_alpha.detach()
    assert abs(float(la.mean())) < 1e-3 and float(la.std()) == pytest.approx(0.01, rel=0.05)
    assert float(gate().mean()) == pytest.approx(0.5, abs=0.02)
    proper = HeadGate(8, GateConfig(init=3.0))
    assert torch.equal(proper.log_alpha.detach(), torch.full((8,), 3.0))


# ---- (c) attention output scaling -----------------------------------------------------------------


def capture_attention(model: LanguageModel) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    model.layers[0].attn.register_forward_hook(lambda _m, _i, out: outs.append(out))
    return outs


def scaled_pair(corpus):
    torch.manual_seed(0)
    on = LanguageModel(TINY, len(corpus.vocab), GateConfig(output_scaling=True))
    off = LanguageModel(TINY, len(corpus.vocab), GateConfig(output_scaling=False))
    off.load_state_dict(on.state_dict())
    x = torch.tensor(corpus.tokens("valid")[: 2 * 16].reshape(2, 16), dtype=torch.long)
    return on, off, x


@pytest.mark.parametrize("pattern", [[1.0, -1.0, 1.0, -1.0], [0.5, 2.0, -0.3, 1.0], [-1.0, -1.0, 3.0, -2.0]])
def test_output_scaling_rescales_by_heads_over_open(corpus, pattern):
    on, off, x = scaled_pair(corpus)
    for m in (on, off):
        set_log_alpha(m.gates[0], pattern)
        m.eval()
    y_on, y_off = capture_attention(on), capture_attention(off)
    with torch.no_grad():
        on(x), off(x)
    factor = 4 / sum(v > 0 for v in pattern)
    assert torch.equal(y_on[0], y_off[0] * factor)
    assert float(y_on[0].norm() / y_off[0].norm()) == pytest.approx(factor, rel=1e-5)


def test_output_scale_is_detached(corpus):
    on, off, x = scaled_pair(corpus)
    blk = on.layers[0]
    blk.gate.train()
    z, scale = blk.gate_values()
    assert z.requires_grad and not scale.requires_grad and scale.grad_fn is None
    checked = 0
    for seed in range(8):  # same gate sample in both models; compare the gradients reaching log_alpha
        grads = []
        for m in (on, off):
            set_log_alpha(m.gates[0], [0.2, -0.3, 0.1, 0.4])
            m.train().zero_grad()
            outs = capture_attention(m)
            torch.manual_seed(seed)
            m(x)
            w = torch.randn_like(outs[0], generator=torch.Generator().manual_seed(7))
            (outs[0] * w).sum().backward()
            m.layers[0].attn._forward_hooks.clear()
            grads.append(m.gates[0].log_alpha.grad.clone())
        torch.manual_seed(seed)
        n_open = float(on.layers[0].gate().detach().sum())
        if n_open and grads[1].abs().sum() > 0:
            # A detached constant: the gradient is the unscaled one times H/open, nothing through n_open.
            assert torch.allclose(grads[0], grads[1] * (4 / n_open), rtol=1e-4, atol=1e-8)
            checked += 1
    assert checked >= 2


# ---- objectives in training -----------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_target_mode_reaches_expected_sparsity(corpus, target):
    cfg = GateConfig(sparsity_target=target, warmup_steps=50)
    torch.manual_seed(0)
    model = LanguageModel(TINY, len(corpus.vocab), cfg)
    objective = SparsityObjective(cfg)
    stats: list[dict] = []
    train_steps(model, corpus, 300, objective, gate_lr=cfg.lr, record=stats)
    traj = [s["expected_sparsity"] for s in stats]
    settled = next(i for i in range(len(traj)) if all(abs(v - target) <= 0.03 for v in traj[i:]))
    print(f"target {target}: within 0.03 from step {settled}, final expected sparsity {traj[-1]:.3f}")
    assert abs(traj[-1] - target) <= 0.03 and settled <= 270  # the last 30 steps all within 0.03
    assert stats[-1]["target"] == target
    assert stats[-1]["lambda_2"] > 0 and any(abs(s["lambda_1"]) > 0.1 for s in stats)  # multipliers moved


def test_l0_coefficient_controls_sparsity(corpus):
    result = {}
    for coef in (0.002, 0.05):
        cfg = GateConfig(l0_coefficient=coef)
        torch.manual_seed(0)
        model = LanguageModel(TINY, len(corpus.vocab), cfg)
        stats: list[dict] = []
        train_steps(model, corpus, 120, SparsityObjective(cfg), gate_lr=cfg.lr, record=stats)
        closed = sum(int((~g.open_mask()).sum()) for g in model.gates)
        result[coef] = (stats[-1]["expected_sparsity"], closed)
    (s_small, c_small), (s_large, c_large) = result[0.002], result[0.05]
    assert s_large > s_small + 0.3 and c_large > c_small, result
