"""Pruning targets met exactly (a fraction or a parameter budget -> heads to remove -> the final cut),
and per-rank randomness (own dropout per rank, one gate sample per step on every rank)."""

from __future__ import annotations

import pytest
import torch

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.errors import ConfigError
from allatt_dist.model.pruning import per_head_params, prune_model
from allatt_dist.model.registry import build_model
from allatt_dist.model.targets import final_mask, heads_to_remove, non_embedding_params
from allatt_dist.model.transformer import count_params
from allatt_dist.recipe import build_config
from allatt_dist.train.setup import seed_step

MODEL = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=8, mem_len=8)


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
def test_non_embedding_count_is_the_model_without_its_word_matrices(arch):
    model = MODEL.model_copy(update={"architecture": arch, "ffn_dim": 64})
    lm = build_model(model, 500)
    io = sum(p.numel() for p in lm.io.parameters())
    assert non_embedding_params(model) == count_params(lm) - io


@pytest.mark.parametrize(("target", "removed"), [(0.0, 0), (0.1, 1), (0.25, 2), (0.5, 4), (0.8, 6), (0.99, 8)])
def test_a_fraction_rounds_to_the_nearest_head(target, removed):
    assert heads_to_remove(MODEL, GateConfig(sparsity_target=target)) == removed


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
def test_a_budget_removes_the_fewest_heads_that_fit(arch):
    model = MODEL.model_copy(update={"architecture": arch, "ffn_dim": 64})
    dense, head = non_embedding_params(model), per_head_params(model)
    for budget in (dense, dense - 1, dense - head, dense - head - 1, dense - 8 * head):
        k = heads_to_remove(model, GateConfig(param_budget=budget))
        assert dense - k * head <= budget < dense - (k - 1) * head  # at or under, and within one head


def test_bad_budgets_and_targets_are_one_line():
    base = {"model": MODEL.model_dump(), "gates": {"sparsity_target": None}}
    dense = non_embedding_params(MODEL)
    for gates, needle in [
        ({"param_budget": dense + 1}, "above the dense model"),
        ({"param_budget": 1}, "below the smallest pruned model"),
        ({"param_budget": dense, "sparsity_target": 0.5}, "set only one of"),
    ]:
        with pytest.raises(ConfigError, match=needle) as e:
            build_config({**base, "gates": gates}, "r.yaml")
        assert "\n" not in str(e.value)


def test_final_cut_keeps_the_most_open_heads_and_pruning_keeps_exactly_them():
    torch.manual_seed(0)
    lm = build_model(MODEL, 300, gates=GateConfig(sparsity_target=0.5)).eval()
    with torch.no_grad():
        for gate in lm.gates:
            gate.log_alpha.copy_(torch.randn(4))  # (H,) some open, some closed by the eval gate
    logits = torch.stack([g.log_alpha.detach() for g in lm.gates])  # (L, H)
    keep = final_mask(logits, 3)
    assert int((~keep).sum()) == 3 and logits[~keep].max() <= logits[keep].min()
    for gate, k in zip(lm.gates, keep, strict=True):
        gate.cut = k
    x = torch.randint(0, 300, (2, 8))  # (B, T)
    want = lm(x).log_probs  # (B, T, V) under the cut
    pruned = prune_model(lm)
    assert sum(pruned.heads_per_layer) == 5
    torch.testing.assert_close(pruned(x).log_probs, want, atol=1e-5, rtol=1e-5)


def test_an_exported_cut_comes_back_with_the_model(tmp_path):
    from allatt_dist.data.vocab import Vocab
    from allatt_dist.modelio import load_model_dir, save_model_dir

    lm = build_model(MODEL, 300, gates=GateConfig(sparsity_target=0.5)).eval()
    keep = torch.tensor([[True, False, True, False], [False, False, True, True]])  # (L, H)
    for gate, k in zip(lm.gates, keep, strict=True):
        gate.cut = k  # every log alpha is +2 (open): the cut alone decides
    vocab = Vocab.build([f"w{i}" for i in range(298)])
    meta = save_model_dir(lm, vocab, tmp_path / "m", gates=GateConfig(sparsity_target=0.5))
    assert meta["final_cut"] == keep.tolist()
    back, _, _ = load_model_dir(tmp_path / "m")
    assert prune_model(back).heads_per_layer == [2, 2]


def test_each_rank_drops_its_own_units_and_all_ranks_sample_the_same_gates():
    model = MODEL.model_copy(update={"dropout": 0.3})
    lm = build_model(model, 300, gates=GateConfig(sparsity_target=0.5, proper_init=False)).train()  # P(open) ~ 1/2

    def step(rank: int, index: int):
        noise = seed_step(7, rank, index, torch.device("cpu"))
        for gate in lm.gates:
            gate.noise = noise
        z = torch.cat([g() for g in lm.gates])  # (L*H,) the gate sample of this micro-step
        dropped = lm.drop(torch.ones(1000)) == 0  # (1000,) this rank's dropout mask
        return z, dropped

    z0, d0 = step(0, 5)
    z1, d1 = step(1, 5)
    assert torch.equal(z0, z1)  # one sampled architecture per step on every rank
    assert not torch.equal(d0, d1)  # but each rank its own dropout
    z0b, d0b = step(0, 5)
    assert torch.equal(z0, z0b) and torch.equal(d0, d0b)  # reproducible (resume: same step, same draws)
