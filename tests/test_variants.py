"""The model switches behind `model.variant` (ours / the authors' code), each on its own: what it
changes, the parameter formula of docs/model.md for every combination, the paper recipes' counts on
the meta device, and the one-line errors for contradicting or impossible settings.

Fast path = reference and exact pruning under the authors' variant: tests/test_fastpath.py and
tests/test_pruning.py (parametrised over it).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from clirun import run_cli

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.errors import ConfigError
from allatt_dist.model.attention import RelPersistentAttention, attention_mask, sinusoid
from allatt_dist.model.output import AdaptiveIO
from allatt_dist.model.pruning import per_head_params, prune_model
from allatt_dist.model.transformer import LanguageModel, count_params
from allatt_dist.recipe import build_config, load_config
from allatt_dist.train.setup import make_scheduler, phase_spec
from allatt_dist.variants import MODEL_PRESETS

ROOT = Path(__file__).resolve().parents[1]
V = 600
SMALL = dict(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, ffn_dim=48, seq_len=6, mem_len=6)


def small(**switches) -> ModelConfig:
    return ModelConfig(**(SMALL | switches))


def perturbed(cfg: ModelConfig, seed: int = 0, gates: GateConfig | None = None) -> LanguageModel:
    """A model whose every tensor is non-trivial (u/v biases, output biases, norms start at 0 or 1)."""
    torch.manual_seed(seed)
    model = LanguageModel(cfg, V, gates)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("log_alpha"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids(b: int = 2, t: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def copy_shared(dst: LanguageModel, src: LanguageModel) -> None:
    """Copy every tensor the two models both have (same name and shape)."""
    own = dst.state_dict()
    with torch.no_grad():
        for name, t in src.state_dict().items():
            if name in own and own[name].shape == t.shape:
                own[name].copy_(t)


# ---- the parameter formula (docs/model.md, "Parameters") ----------------------------------------


def formula(cfg: ModelConfig, vocab: int, heads: list[int] | None = None) -> int:
    d, dh = cfg.hidden_dim, cfg.head_dim
    heads = heads if heads is not None else [cfg.num_heads] * cfg.num_layers
    n = cfg.num_persistent if cfg.architecture == "all_attention" else 0
    total = sum(h * dh * (5 * d + 2 + 2 * n) for h in heads)  # per head
    total += cfg.num_layers * 2 * d  # each layer's norm
    total += cfg.num_layers * d * cfg.attn_out_bias  # output-projection bias (kept when a layer empties)
    if cfg.architecture == "transformer_xl":
        total += cfg.num_layers * (2 * d + d * cfg.ffn_dim + cfg.ffn_dim + cfg.ffn_dim * d + d)
    total += 2 * d * cfg.final_norm
    if cfg.positions == "learned":
        total += (cfg.position_len or cfg.seq_len + cfg.mem_len) * d
    cut = [c for c in cfg.adaptive_cutoffs if c < vocab]
    if not cut:
        return total + vocab * d + vocab  # tied embedding / softmax weight + softmax bias
    edges = cut + [vocab]
    total += (cut[0] + len(cut)) * (d + 1)  # head: shortlist + cluster logits, with bias
    for i in range(len(cut)):
        hsz = d // cfg.adaptive_div ** (i + 1)
        total += d * hsz + hsz * (edges[i + 1] - edges[i])  # tied down-projection and word matrix
    if cfg.adaptive_proj:
        total += 2 * d * d + (vocab - cut[0])  # shortlist projections (input, output) + tail biases
    return total


SWITCH_GRID = list(
    itertools.product(
        ["all_attention", "transformer_xl"],
        [True, False],  # final_norm
        [False, True],  # attn_out_bias
        ["sinusoid", "learned"],
        [([], False), ([100, 300], False), ([100, 300], True)],  # cutoffs, adaptive_proj
    )
)


@pytest.mark.parametrize("arch,final_norm,out_bias,positions,adaptive", SWITCH_GRID)
def test_param_count_equals_formula(arch, final_norm, out_bias, positions, adaptive):
    cutoffs, proj = adaptive
    cfg = small(
        architecture=arch,
        final_norm=final_norm,
        attn_out_bias=out_bias,
        positions=positions,
        position_len=20 if positions == "learned" else None,
        adaptive_cutoffs=cutoffs,
        adaptive_proj=proj,
    )
    with torch.device("meta"):
        dense = LanguageModel(cfg, V, GateConfig())
        pruned = LanguageModel(cfg, V, heads_per_layer=[0, 3])
    assert count_params(dense) == formula(cfg, V)
    assert count_params(dense, include_gates=True) == formula(cfg, V) + 2 * 4
    assert count_params(pruned) == formula(cfg, V, [0, 3]) == formula(cfg, V) - 5 * per_head_params(cfg)


def test_paper_recipe_builds_the_authors_parameter_count():
    """tune_configs/paper_wt103.yaml at the WikiText-103 vocabulary: the authors' model. Their count,
    74,170,642, is what their code builds from their own config on the meta device (its 512-row position
    table, max_len, and the 128 gate logits it always builds); our formula agrees with it."""
    cfg = load_config(ROOT / "tune_configs/paper_wt103.yaml")
    assert cfg.model.variant == "authors" and cfg.model.position_len == 512
    with torch.device("meta"):
        dense = LanguageModel(cfg.model, 267_735)
        gated = LanguageModel(cfg.model, 267_735, cfg.gates)
    assert count_params(gated, include_gates=True) == 74_170_642
    assert count_params(dense) == formula(cfg.model, 267_735) == 74_170_514
    drop = {*MODEL_PRESETS["ours"], "variant", "position_len"}
    fields = {k: v for k, v in cfg.model.model_dump().items() if k not in drop}
    ours = ModelConfig(**(fields | {"variant": "ours"}))  # the same shape, our switches
    plain = ModelConfig(**(fields | {"adaptive_proj": False}))  # ... without the shortlist projections
    with torch.device("meta"):
        assert count_params(LanguageModel(ours, 267_735)) == formula(ours, 267_735) == 73_901_202
        assert count_params(LanguageModel(plain, 267_735)) == 73_129_179


def test_constant_lr_phase_holds_the_rate():
    """The authors' gating stage: LAMB at 1e-4 with no warm-up and no decay (`prune.constant_lr`)."""
    cfg = load_config(ROOT / "tune_configs/paper_wt103.yaml")
    spec = phase_spec(cfg, "prune")
    assert spec.constant_lr and spec.lr == 1e-4 and not phase_spec(cfg, "dense").constant_lr
    w = torch.nn.Parameter(torch.zeros(1))
    for constant in (True, False):
        opt = torch.optim.SGD([{"params": [w], "lr": 1e-4, "name": "weights"}], lr=1e-4)
        sched = make_scheduler(cfg, spec.max_steps, constant)(opt)
        rates = []
        for _ in range(4):
            rates.append(opt.param_groups[0]["lr"] / 1e-4)
            opt.step()
            sched.step()
        assert rates == [1.0] * 4 if constant else rates[:3] == [1.0] * 3 and rates[3] < 1.0  # the cosine starts


def test_txl_baseline_recipe_param_count():
    """The authors' Transformer-XL: one u and one v for all layers, so (L - 1) x 2d fewer than the formula."""
    cfg = load_config(ROOT / "tune_configs/paper_wt103_txl.yaml")
    assert cfg.model.architecture == "transformer_xl" and cfg.model.variant == "transformer_xl"
    with torch.device("meta"):
        model = LanguageModel(cfg.model, 267_735)
    d, layers = cfg.model.hidden_dim, cfg.model.num_layers
    assert count_params(model) == formula(cfg.model, 267_735) - (layers - 1) * 2 * d == 73_951_378


# ---- each switch's effect -----------------------------------------------------------------------


@torch.no_grad()
def test_zero_memory_start_equals_explicit_zero_memory():
    on = perturbed(small(zero_memory_start=True))
    off = LanguageModel(small(), V).eval()
    off.load_state_dict(on.state_dict())
    x = ids()
    zeros = [torch.zeros(2, 6, 32) for _ in range(2)]
    a, b = on(x), off(x, zeros)
    assert torch.equal(a.log_probs, b.log_probs)
    assert all(torch.equal(m, n) for m, n in zip(a.mems, b.mems, strict=True))
    assert not torch.allclose(a.log_probs, off(x).log_probs, atol=1e-3)  # an empty memory is another function
    # A memory given is used as is: the switch only fills a missing one.
    assert torch.equal(on(x, a.mems).log_probs, off(x, a.mems).log_probs)


@torch.no_grad()
def test_learned_table_holding_the_sinusoid_equals_the_sinusoid():
    learned = perturbed(small(positions="learned", position_len=15))
    plain = LanguageModel(small(), V).eval()
    copy_shared(plain, learned)
    learned.pos_table.copy_(sinusoid(torch.arange(14, -1, -1), 32))  # row r: distance 14 - r
    x = ids()
    a, b = learned(x, None), plain(x, None)
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-5)
    a2, b2 = learned(x, a.mems), plain(x, b.mems)  # 12 context positions: the last 12 rows
    assert torch.allclose(a2.log_probs, b2.log_probs, atol=1e-5)
    learned.pos_table[:3].add_(1.0)  # rows for distances 12..14, beyond this context: unused
    assert torch.equal(learned(x, a.mems).log_probs, a2.log_probs)


@torch.no_grad()
def test_final_norm_off_feeds_the_last_layer_to_the_softmax():
    model = perturbed(small(final_norm=False))
    assert not any("final_norm" in k for k in model.state_dict())
    seen = {}
    model.layers[-1].register_forward_hook(lambda mod, inp, out: seen.update(h=out))
    out = model(ids())
    assert torch.equal(out.log_probs, model.io.log_probs(seen["h"]))


def _layer(pu: bool, out_bias: bool) -> RelPersistentAttention:
    torch.manual_seed(3)
    layer = RelPersistentAttention(32, 4, 8, 8, 0.0, out_bias=out_bias, persistent_content_bias=pu)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.eval()


def _layer_inputs(m: int = 4, t: int = 5):
    cat = torch.randn(2, m + t, 32, generator=torch.Generator().manual_seed(4))  # (B,M+T,D)
    pos = sinusoid(torch.arange(m + t - 1, -1, -1), 32)  # (K,D)
    return cat[:, m:], cat, pos, attention_mask(t, m, m, True, torch.device("cpu"))


@torch.no_grad()
def test_persistent_content_bias_adds_u_to_the_persistent_scores_only():
    x, cat, pos, mask = _layer_inputs()
    with_u, bare = _layer(True, False), _layer(False, False)
    # By hand, one head: the persistent scores of `bare` are q·p, the context ones (q + u)·k + (q + v)·r.
    q, k, v, r = bare.project(x, cat, pos)  # (B,H,T,dh), (B,H,K,dh) x2, (H,K,dh)
    pk, pv = bare.persistent(q.dtype)  # (H,N,dh)
    ctx = bare.position_bias(q, r, mask) + (q + bare.r_w_bias[None, :, None]) @ k.transpose(-1, -2) / 8**0.5
    scores = torch.cat([ctx, q @ pk.transpose(-1, -2)[None] / 8**0.5], dim=-1)  # (B,H,T,K+N)
    o = torch.softmax(scores, -1) @ torch.cat([v, pv[None].expand(2, -1, -1, -1)], dim=2)  # (B,H,T,dh)
    for impl in ("split", "dense_bias"):
        bare.impl = impl
        assert torch.allclose(bare(x, cat, pos, mask), bare.merge_heads(o, None, None), atol=1e-5), impl
    assert not torch.allclose(with_u(x, cat, pos, mask), bare(x, cat, pos, mask), atol=1e-3)
    with_u.r_w_bias.zero_()
    bare.r_w_bias.zero_()
    assert torch.allclose(with_u(x, cat, pos, mask), bare(x, cat, pos, mask), atol=1e-6)


@torch.no_grad()
def test_attention_output_bias_is_added_to_the_layer_output():
    x, cat, pos, mask = _layer_inputs()
    biased, plain = _layer(True, True), _layer(True, False)
    plain.load_state_dict({k: t for k, t in biased.state_dict().items() if k != "out.bias"})
    assert torch.allclose(biased(x, cat, pos, mask) - plain(x, cat, pos, mask), biased.out.bias.expand(2, 5, 32))


@torch.no_grad()
def test_adaptive_projections_at_identity_and_zero_tail_bias_equal_the_plain_adaptive_io():
    torch.manual_seed(5)
    plain, proj = AdaptiveIO(V, 32, [100, 300], 4), AdaptiveIO(V, 32, [100, 300], 4, proj=True)
    proj.load_state_dict(plain.state_dict(), strict=False)
    proj.short_in.weight.copy_(torch.eye(32))
    proj.short_out.weight.copy_(torch.eye(32))
    h, x = torch.randn(40, 32), torch.randint(0, V, (40,))
    x[:3] = torch.tensor([5, 150, 450])  # one word per cluster at least
    assert torch.allclose(proj.embed(x[None]), plain.embed(x[None]), atol=1e-6)
    assert torch.allclose(proj.log_probs(h[None]), plain.log_probs(h[None]), atol=1e-5)
    assert torch.allclose(proj.nll(h, x), plain.nll(h, x), atol=1e-5)
    # With real projections and tail biases: a normalised distribution whose NLL is what nll() returns.
    for p in [proj.short_in.weight, proj.short_out.weight, *proj.tail_bias]:
        p.copy_(torch.randn_like(p))
    lp = proj.log_probs(h[None])[0]  # (40,V)
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(40), atol=1e-5)
    assert torch.allclose(proj.nll(h, x), -lp.gather(1, x[:, None]).squeeze(1), atol=1e-5)
    assert not torch.allclose(proj.nll(h, x), plain.nll(h, x), atol=1e-3)
    assert not torch.allclose(proj.embed(x[None]), plain.embed(x[None]), atol=1e-3)


def test_word_dropout_drops_word_types_in_training_only():
    model = perturbed(small(word_dropout=0.5))
    x = torch.tensor([[1, 2, 1, 3, 2, 1]] * 8)  # repeated ids
    model.train()
    seen = {}

    def first_input(mod, inp, out) -> None:  # the first dropout call is on the embeddings
        seen.setdefault("e", inp[0])

    model.drop.register_forward_hook(first_input)
    torch.manual_seed(0)
    model(x, None, x)
    e, full = seen["e"], model.io.embed(x).detach()
    ratio = (e / full).mean(-1)  # (B,T): 0 or 1/(1-p) = 2 per token
    assert set(ratio.round(decimals=4).unique().tolist()) <= {0.0, 2.0}
    for word in (1, 2, 3):  # one draw per word type: all its occurrences alike
        assert ratio[x == word].unique().numel() == 1
    model.eval()
    assert torch.equal(model(x).log_probs, perturbed(small())(x).log_probs)


@pytest.mark.parametrize("inclusive", [False, True])
def test_eval_gate_boundary(inclusive):
    cfg = small()
    model = perturbed(cfg, gates=GateConfig(open_at_threshold=inclusive))
    with torch.no_grad():
        for gate in model.gates:
            gate.log_alpha.copy_(torch.tensor([0.0, 1.0, -1.0, 0.0]))  # theta = 0 for the default stretch
    assert model.gates[0]().tolist() == [float(inclusive), 1.0, 0.0, float(inclusive)]
    assert prune_model(model).heads_per_layer == [3 if inclusive else 1] * 2


# ---- presets and bad input ----------------------------------------------------------------------


def test_authors_preset_sets_every_switch_and_ours_is_the_default():
    run = build_config({"model": SMALL | {"variant": "authors", "adaptive_cutoffs": [100]}})
    m, g = run.model, run.gates
    assert (m.final_norm, m.persistent_content_bias, m.zero_memory_start) == (False, False, True)
    assert (m.positions, m.attn_out_bias, m.adaptive_proj) == ("learned", True, True)
    assert (g.open_at_threshold, g.output_scaling) == (True, False)
    again = build_config({"model": m.model_dump(), "gates": g.model_dump()})  # a saved run.yaml reloads
    assert again == run
    for cutoffs in ([], [100]):
        plain = build_config({"model": SMALL | {"adaptive_cutoffs": cutoffs}})
        ours = build_config({"model": SMALL | {"adaptive_cutoffs": cutoffs, "variant": "ours"}})
        assert plain.model == ours.model.model_copy(update={"variant": None})
        assert plain.model.adaptive_proj == bool(cutoffs)  # the default: projections wherever there are cutoffs


BAD = {
    "contradiction": (["model.variant=authors", "model.final_norm=true"], "contradicts model.variant authors"),
    "gate contradiction": (["model.variant=authors", "gates.output_scaling=true"], "gates.output_scaling"),
    "short table": (["model.positions=learned", "model.position_len=10"], "must be >= model.seq_len + model.mem_len"),
    "no cutoffs": (["model.adaptive_proj=true"], "model.adaptive_proj needs model.adaptive_cutoffs"),
    "table, sinusoid": (["model.position_len=200"], "applies only with model.positions: learned"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_switches_are_one_line(case):
    sets, needle = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "tune_configs/quickstart.yaml", sets)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and "--set" in msg, msg


def test_cli_refuses_a_contradicting_preset_in_one_line(tmp_path):
    sets = ["--set", "model.variant=authors", "--set", "model.zero_memory_start=false"]
    p = run_cli("train", ROOT / "tune_configs/quickstart.yaml", *sets, "--out", tmp_path / "r", timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "model.zero_memory_start" in p.stderr, p.stderr
