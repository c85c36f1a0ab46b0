"""The switches that make the paper recipes the authors' runs (issue 20), each on its own: per-rank gate
samples, the per-epoch row offsets of the training stream, the double output dropout, the shared u/v of
their Transformer-XL; the Transformer-XL recipe's switches against their memory_transformer.py; and the
one-line refusals (an optimizer a ZeRO stage cannot run, for every optimizer; contradicting switches;
the CLI's exit for them: tests/test_train.py's bad-input cases)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.crosschecks import OPTIMIZER_ZERO_STAGES
from allatt_dist.data.stream import LMStream
from allatt_dist.errors import ConfigError
from allatt_dist.model.pruning import prune_model
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.recipe import load_config
from allatt_dist.train.setup import seed_step

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "tune_configs/quickstart.yaml"
SMALL = dict(num_layers=3, hidden_dim=32, num_heads=4, num_persistent=8, ffn_dim=48, seq_len=6, mem_len=6)


def test_gate_samples_per_rank_or_shared():
    draw = lambda rank, per_rank: torch.rand(8, generator=seed_step(3, rank, 5, torch.device("cpu"), per_rank))  # noqa: E731
    assert torch.equal(draw(0, False), draw(1, False))  # ours: one sub-network per step for all ranks
    assert not torch.equal(draw(0, True), draw(1, True))  # theirs: each rank its own
    assert torch.equal(draw(1, True), draw(1, True))  # ... reproducibly (a resumed run draws the same)
    assert load_config(ROOT / "tune_configs/paper_wt103.yaml").gates.per_rank_samples
    assert not load_config(QUICK).gates.per_rank_samples


def test_row_offsets_rotate_each_row_per_epoch_for_any_world_size():
    tokens = np.arange(4 * 50, dtype=np.int64)
    whole = LMStream(tokens, 4, 7, row_shift_seed=11)
    halves = [LMStream(tokens, 4, 7, rank=r, world_size=2, row_shift_seed=11) for r in range(2)]
    plain = LMStream(tokens, 4, 7)
    per_epoch = whole.segments_per_epoch
    firsts = []
    for epoch in range(2):
        for i in range(per_epoch):
            x, y, reset = whole.next_batch()
            parts = [h.next_batch() for h in halves]
            assert torch.equal(x, torch.cat([p[0] for p in parts])) and reset == (i == 0)
            assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the next tokens of the rotated rows
            if i == 0:
                firsts.append(x[:, 0].clone())
        offsets = whole.row_offsets(epoch)
        assert ((offsets >= 1) & (offsets < 49)).all()
        rows = tokens.reshape(4, 50)
        want = np.stack([np.roll(rows[r], offsets[r]) for r in range(4)])[:, :7]  # as np.roll, the authors' way
        assert np.array_equal(firsts[-1].numpy(), want[:, 0])
    assert not torch.equal(firsts[0], firsts[1])  # a new offset every epoch
    assert torch.equal(plain.next_batch()[0][:, 0], torch.tensor([0, 50, 100, 150]))  # off: rows as cut
    resumed = LMStream(tokens, 4, 7, row_shift_seed=11)
    resumed.load_state_dict({"epoch": 1, "pos": 0})
    assert torch.equal(resumed.next_batch()[0][:, 0], firsts[1])


def test_output_dropout_twice_drops_the_last_hidden_state_again():
    cfg = ModelConfig(**SMALL, dropout=0.5)
    twice = ModelConfig(**SMALL, dropout=0.5, output_dropout_twice=True)
    x = torch.randint(0, 50, (2, 6))
    outs = []
    for c in (cfg, twice):
        torch.manual_seed(0)
        model = LanguageModel(c, 50).train()
        calls = []
        model.drop.register_forward_hook(lambda mod, inp, out, seen=calls: seen.append(out))
        torch.manual_seed(1)
        model(x, target=x)
        outs.append(calls)
    once, two = outs
    assert len(two) == len(once) + 1  # one more pass through the output dropout
    kept = two[-2] != 0
    assert torch.allclose(two[-1][kept & (two[-1] != 0)], 2 * two[-2][kept & (two[-1] != 0)])  # 1/(1-p) again
    with torch.no_grad():  # evaluation: dropout is the identity, the switch changes nothing
        torch.manual_seed(0)
        a = LanguageModel(cfg, 50).eval()(x).log_probs
        torch.manual_seed(0)
        b = LanguageModel(twice, 50).eval()(x).log_probs
    assert torch.equal(a, b)


def test_txl_recipe_switches_are_their_memory_transformer():
    """nnlib/models/transformer_xl/memory_transformer.py: SinusoidalPositionalEncoding, out_norm (pre_norm),
    one query_key_bias / query_pos_bias for all layers, zero memories when none are given, biased output
    projections (ProjectionResidual), shortlist projections (div_value 4), drop_o once."""
    cfg = load_config(ROOT / "tune_configs/paper_wt103_txl.yaml")
    m = cfg.model
    assert (m.architecture, m.variant, m.positions, m.position_len) == (
        "transformer_xl",
        "transformer_xl",
        "sinusoid",
        None,
    )
    assert m.final_norm and m.shared_rel_bias and m.zero_memory_start and m.attn_out_bias and m.adaptive_proj
    assert not m.output_dropout_twice
    assert (m.num_layers, m.hidden_dim, m.num_heads, m.ffn_dim, m.seq_len, m.mem_len) == (16, 512, 8, 2048, 192, 192)
    assert (cfg.train.optimizer, cfg.deepspeed.zero_stage, cfg.gates.lr_scale) == ("lamb", 0, 10)


def test_shared_u_v_is_one_tensor_trained_by_every_layer_and_prunes_exactly():
    cfg = ModelConfig(**SMALL, architecture="transformer_xl", variant="transformer_xl")
    model = LanguageModel(cfg, 50, GateConfig(open_at_threshold=True, output_scaling=False))
    assert all(layer.attn.r_w_bias is model.rel_u and layer.attn.r_r_bias is model.rel_v for layer in model.layers)
    names = [n for n, _ in model.named_parameters()]
    assert names.count("rel_u") == 1 and not any(n.endswith("r_w_bias") for n in names)
    x = torch.randint(0, 50, (2, 6))
    grads = []
    for keep in range(3):  # only layer `keep` open: each layer alone moves the shared u
        with torch.no_grad():
            for i, g in enumerate(model.gates):
                g.log_alpha.fill_(5.0 if i == keep else -5.0)
        model.zero_grad()
        model.eval()(x, target=x).nll.sum().backward()
        grads.append(model.rel_u.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads) and not torch.equal(grads[0], grads[1])
    with torch.no_grad():
        model.rel_u.normal_()
        model.rel_v.normal_()
        for g, row in zip(model.gates, ([5, -5, 5, 5], [5, 5, 5, 5], [-5, 5, -5, 5]), strict=True):
            g.log_alpha.copy_(torch.tensor(row, dtype=torch.float))
        pruned = prune_model(model.eval())
        assert pruned.heads_per_layer == [3, 4, 2]
        torch.testing.assert_close(pruned(x).log_probs, model(x).log_probs, rtol=1e-5, atol=1e-5)


BAD = {
    "contradicting TXL switch": (["model.variant=authors", "model.output_dropout_twice=false"], "output_dropout_twice"),
    "TXL variant on All-attention": (["model.variant=transformer_xl"], "needs model.architecture: transformer_xl"),
    "cosine ends before it starts": (["train.hold_steps=30", "train.cosine_end=40"], "train.cosine_end (40)"),
    "shared u/v at ZeRO-3": (["model.shared_rel_bias=true", "deepspeed.zero_stage=3"], "shared_rel_bias cannot run"),
}
BAD.update(
    {
        f"{opt} at ZeRO-{stage}": ([f"train.optimizer={opt}", f"deepspeed.zero_stage={stage}"], "cannot run at")
        for opt, ok in OPTIMIZER_ZERO_STAGES.items()
        for stage in range(4)
        if stage not in ok
    }
)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case):
    sets, needle = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_config(QUICK, sets)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg, msg
    if "ZeRO-" in case and "u/v" not in case:  # both keys named
        assert "train.optimizer" in msg and "deepspeed.zero_stage" in msg, msg


def test_every_optimizer_runs_at_its_listed_stages():
    for opt, stages in OPTIMIZER_ZERO_STAGES.items():
        for stage in stages:
            cfg = load_config(QUICK, [f"train.optimizer={opt}", f"deepspeed.zero_stage={stage}"])
            assert (cfg.train.optimizer, cfg.deepspeed.zero_stage) == (opt, stage)
