"""Attention on real WikiText-2 ids: the SDPA fast path against the explicit reference, the causal
and same-length masks, and the influence of the Transformer-XL memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.corpus import Corpus, load_corpus
from allatt_dist.model import attention as attention_module
from allatt_dist.model.attention import attention_mask
from allatt_dist.model.transformer import LanguageModel

B, T = 2, 8
ATOL = 1e-5
CUTOFFS = [500, 3000]
# Every fast implementation the attention module offers (one, "default", when it has no switch).
IMPLS = tuple(getattr(attention_module, "IMPLS", ("default",)))


def use_impl(model: LanguageModel, impl: str) -> LanguageModel:
    if impl != "default":
        attention_module.set_attention_impl(model, impl)
    return model


@pytest.fixture(scope="module")
def corpus(wt2_path) -> Corpus:
    from allatt_dist.config import DataConfig

    return load_corpus(DataConfig(path=str(wt2_path)))


@pytest.fixture(scope="module")
def segments(corpus: Corpus) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three consecutive (input, target) segments of B rows of real validation text."""
    n = 3 * T + 1
    ids = np.array(corpus.tokens("valid")[: B * n], dtype=np.int64).reshape(B, n)
    rows = torch.from_numpy(ids)
    return [(rows[:, s * T : (s + 1) * T], rows[:, s * T + 1 : (s + 1) * T + 1]) for s in range(3)]


def make_model(corpus: Corpus, arch: str, mem_len: int, same_length: bool, cutoffs: list[int], gated: bool):
    cfg = ModelConfig(
        architecture=arch,
        num_layers=2,
        hidden_dim=32,
        num_heads=4,
        num_persistent=8,
        ffn_dim=64,
        seq_len=T,
        mem_len=mem_len,
        same_length=same_length,
        adaptive_cutoffs=cutoffs,
    )
    torch.manual_seed(0)
    model = LanguageModel(cfg, len(corpus.vocab), GateConfig() if gated else None)
    with torch.no_grad():
        for name, p in model.named_parameters():  # make every tensor (u/v biases too) non-trivial
            if name.endswith("log_alpha"):
                p.copy_(torch.tensor([-1.5, 0.7, -0.2, 2.0])[torch.randperm(4)])
            else:
                p.add_(0.05 * torch.randn_like(p))
    return model


def run(model: LanguageModel, segs, reference: bool, seed: int = 123):
    """log_probs and nll of each segment, memory carried; the RNG is reset before every call."""
    outs, mems = [], None
    for k, (x, y) in enumerate(segs):
        torch.manual_seed(seed + k)
        lp = model(x, mems, reference=reference)
        torch.manual_seed(seed + k)
        nl = model(x, mems, y, reference=reference)
        outs.append((lp.log_probs, nl.nll, lp.mems))
        mems = lp.mems
    return outs


GRID = list(
    itertools.product(
        ["all_attention", "transformer_xl"],
        [True, False],  # same_length
        [0, 12],  # mem_len: none, and one that fills over two segments (m = 0, 8, 12)
        ["full", "adaptive"],  # output layer
        ["none", "train", "eval"],  # gates
        IMPLS,
    )
)


@pytest.mark.parametrize("arch,same_length,mem_len,output,gates,impl", GRID)
def test_fast_path_matches_reference(corpus, segments, arch, same_length, mem_len, output, gates, impl):
    cutoffs = CUTOFFS if output == "adaptive" else []
    model = make_model(corpus, arch, mem_len, same_length, cutoffs, gated=gates != "none")
    use_impl(model, impl)
    model.train(gates == "train")  # dropout is 0, so train mode only changes the gate sampling
    with torch.no_grad():
        fast = run(model, segments, reference=False)
        ref = run(model, segments, reference=True)
    for (lp_f, nll_f, mem_f), (lp_r, nll_r, mem_r) in zip(fast, ref, strict=True):
        assert torch.allclose(lp_f, lp_r, atol=ATOL, rtol=0), (lp_f - lp_r).abs().max()
        assert torch.allclose(nll_f, nll_r, atol=ATOL, rtol=0)
        assert all(a.shape[1] == min(mem_len, a.shape[1]) for a in mem_f)
        for a, b in zip(mem_f, mem_r, strict=True):
            assert torch.allclose(a, b, atol=ATOL, rtol=0)
    if mem_len:
        assert [m[0].shape[1] for _, _, m in fast] == [8, 12, 12]


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference(corpus, segments, arch, impl):
    """Backward too: parameter and gate-logit gradients of a gated train-mode step, memory carried."""
    grads = []
    for reference in (False, True):
        model = use_impl(make_model(corpus, arch, 12, True, CUTOFFS, gated=True).train(), impl)
        with torch.no_grad():
            torch.manual_seed(5)
            mems = model(segments[0][0]).mems
        torch.manual_seed(6)
        x, y = segments[1]
        model(x, mems, y, reference=reference).nll.mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    fast, ref = grads
    assert fast.keys() == ref.keys() and any(n.endswith("log_alpha") for n in fast)
    for name in ref:
        assert torch.allclose(fast[name], ref[name], atol=1e-6, rtol=1e-4), name


def test_train_mode_gate_samples_differ_between_seeds(corpus, segments):
    """Sanity for the seeding above: train-mode gates really are random."""
    model = make_model(corpus, "all_attention", 12, True, [], gated=True).train()
    with torch.no_grad():
        a = [run(model, segments[:1], False, seed=s)[0][0] for s in range(6)]
    assert any(not torch.equal(a[0], other) for other in a[1:])


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("impl", [*IMPLS, "reference"])
def test_causal_within_segment(corpus, segments, arch, same_length, impl):
    model = make_model(corpus, arch, 12, same_length, [], gated=False).eval()
    reference = impl == "reference"
    use_impl(model, IMPLS[0] if reference else impl)
    (x0, _), (x1, _) = segments[:2]
    with torch.no_grad():
        mems = model(x0).mems
        base = model(x1, mems, reference=reference).log_probs
        for p in (0, 3, T - 1):
            x = x1.clone()
            x[:, p] = (x[:, p] + 17) % model.vocab_size
            out = model(x, mems, reference=reference).log_probs
            assert torch.allclose(out[:, :p], base[:, :p], atol=1e-6, rtol=0)  # past untouched
            diff = (out[:, p:] - base[:, p:]).abs().amax(dim=(0, 2))  # (T-p,)
            assert diff[0] > 1e-4  # the changed position itself
            if p < T - 1:
                assert (diff[1:] > 1e-6).all()  # and every later one sees it


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
def test_first_segment_sees_whole_context_with_same_length(corpus, segments, arch):
    """With no memory yet, same_length must not cut a query off from earlier tokens of its segment."""
    for mem_len in (0, 2, 12):
        model = make_model(corpus, arch, mem_len, True, [], gated=False).eval()
        x = segments[0][0]
        with torch.no_grad():
            base = model(x).log_probs
            x2 = x.clone()
            x2[:, 0] = (x2[:, 0] + 17) % model.vocab_size
            diff = (model(x2).log_probs - base).abs().amax(dim=(0, 2))  # (T,)
        # One layer reaches mem_len back (no limit when mem_len is 0); two layers, twice that.
        reach = min(T, 2 * mem_len + 1) if mem_len else T
        assert (diff[:reach] > 1e-6).all(), (mem_len, diff)
        assert (diff[reach:] == 0).all(), (mem_len, diff)


def test_attention_mask_spans():
    # Full memory with same_length: every query sees exactly mem_len + 1 keys, itself last.
    m = attention_mask(4, 6, 6, True, torch.device("cpu"))
    assert m.shape == (4, 10) and ((~m).sum(1) == 7).all()
    assert all(not m[i, 6 + i] and m[i, 6 + i + 1 :].all() for i in range(4))
    # Filling memory (m < mem_len) and no memory: the whole causal context.
    for t, mm, mem_len in [(4, 2, 6), (4, 0, 6), (4, 0, 0), (4, 3, 3)]:
        for same in (True, False):
            got = attention_mask(t, mm, mem_len, same, torch.device("cpu"))
            causal = torch.ones(t, mm + t, dtype=torch.bool).triu(mm + 1)
            if same and mem_len and mm == mem_len:
                causal |= torch.ones(t, mm + t, dtype=torch.bool).tril(-1)
            assert torch.equal(got, causal), (t, mm, mem_len, same)


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
@pytest.mark.parametrize("same_length", [True, False])
def test_memory_changes_outputs(corpus, segments, arch, same_length):
    model = make_model(corpus, arch, 12, same_length, CUTOFFS, gated=False).eval()
    (x0, _), (x1, y1) = segments[:2]
    other = segments[2][0]
    with torch.no_grad():
        mems = model(x0).mems
        with_mem = model(x1, mems).log_probs
        other_mem = model(x1, model(other).mems).log_probs
        no_mem = model(x1).log_probs
    for alt in (other_mem, no_mem):
        per_pos = (with_mem - alt).abs().amax(dim=(0, 2))  # (T,)
        assert (per_pos > 1e-4).all(), per_pos  # every query attends some memory key
