"""The fast paths against the plain math, in fp32: forward values and gradients (inputs and parameters).

- `SplitAttention` / `SplitAttentionKernel` against one explicit softmax over [context; persistent];
- each attention implementation of a layer against `reference_attention`;
- `LinearCrossEntropy` against `linear` + `cross_entropy`;
- the whole language model (fast paths on) against the explicit reference (fast paths off and
  `reference=True`) on real WikiText-2 ids, ignored targets included;
- under bf16 autocast, no fp32 activation inside the attention layer (no fp32 round trips).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from allatt_dist.config import DataConfig, GateConfig, ModelConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.model.attention import IMPLS, RelPersistentAttention, attention_mask, reference_attention, sinusoid
from allatt_dist.model.fastattn import SplitAttention, SplitAttentionKernel
from allatt_dist.model.output import LinearCrossEntropy, linear_cross_entropy
from allatt_dist.model.pruning import prune_model
from allatt_dist.model.transformer import LanguageModel, use_fast_paths
from allatt_dist.recipe import build_config

ATOL = 1e-5


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= ATOL, f"{what}: max abs difference {err:.3g}"


def grads(out: torch.Tensor, wrt: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of `out`."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * w).sum(), wrt, allow_unused=True))


# ---- the split-softmax functions ----------------------------------------------------------------


def explicit_joint(qs, k, v, bias, pk, pv):
    """softmax([qs k^T + bias, qs pk^T]) @ [v; pv], heads first, (H,B,T,dh)."""
    b = qs.shape[1]
    s = torch.cat([qs @ k.transpose(-1, -2) + bias, qs @ pk.transpose(-1, -2)[:, None]], dim=-1)  # (H,B,T,K+N)
    values = torch.cat([v, pv[:, None].expand(-1, b, -1, -1)], dim=2)  # (H,B,K+N,dh)
    return torch.softmax(s, dim=-1) @ values


@pytest.mark.parametrize("fn", [SplitAttention, SplitAttentionKernel])
def test_split_functions_match_one_softmax(fn):
    torch.manual_seed(0)
    h, b, t, k, n, dh = 3, 2, 5, 9, 7, 4
    bias = torch.randn(h, b, t, k)
    bias[..., -2:] = float("-inf")  # masked keys
    bias[0, 1, 3] = float("-inf")  # a query with every context key masked: persistent keys only
    ins = [torch.randn(h, b, t, dh), torch.randn(h, b, k, dh), torch.randn(h, b, k, dh), bias]
    ins += [torch.randn(h, n, dh), torch.randn(h, n, dh)]
    ins = [x.requires_grad_() for x in ins]
    got, want = fn.apply(*ins), explicit_joint(*ins)
    assert_close(got, want, "output")
    names = ["qs", "k", "v", "bias", "pk", "pv"]
    for name, g, w in zip(names, grads(got, ins), grads(want, ins), strict=True):
        assert_close(torch.nan_to_num(g, neginf=0.0), torch.nan_to_num(w, neginf=0.0), f"d {name}")


# ---- one attention layer ------------------------------------------------------------------------


def make_layer(n: int, heads: int = 4, authors: bool = False) -> RelPersistentAttention:
    """`authors`: the authors' switches (output-projection bias, bare query on persistent keys)."""
    torch.manual_seed(1)
    layer = RelPersistentAttention(32, heads, 8, n, dropatt=0.0, out_bias=authors, persistent_content_bias=not authors)
    with torch.no_grad():
        for p in layer.parameters():  # u/v biases start at zero: make every tensor non-trivial
            p.add_(0.1 * torch.randn_like(p))
    return layer


def layer_inputs(m: int, same_length: bool, b: int = 3, t: int = 6):
    g = torch.Generator().manual_seed(2)
    cat = torch.randn(b, m + t, 32, generator=g).requires_grad_()
    pos = sinusoid(torch.arange(m + t - 1, -1, -1), 32).requires_grad_()
    mask = attention_mask(t, m, m, same_length, torch.device("cpu"))
    return cat, pos, mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [16, 0])  # All-attention, and no persistent vectors (Transformer-XL)
@pytest.mark.parametrize("m,same_length", [(0, True), (5, True), (5, False)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("authors", [False, True])
def test_layer_matches_reference(impl, n, m, same_length, gated, authors):
    layer = make_layer(n, heads=3 if gated else 4, authors=authors)
    layer.impl = impl
    cat, pos, mask = layer_inputs(m, same_length)
    x = cat[:, m:]
    gate = torch.tensor([1.0, 0.0, 1.0], requires_grad=True) if gated else None
    scale = torch.tensor(1.5) if gated else None
    wrt = [cat, pos] + ([gate] if gated else []) + list(layer.parameters())
    got = layer(x, cat, pos, mask, gate, scale)
    want = reference_attention(layer, x, cat, pos, mask, gate, scale)
    assert_close(got, want, "output")
    names = ["cat", "pos"] + (["gate"] if gated else []) + [k for k, _ in layer.named_parameters()]
    for name, g, w in zip(names, grads(got, wrt), grads(want, wrt), strict=True):
        assert_close(g, w, f"d {name}")


# ---- output layer -----------------------------------------------------------------------------


def test_linear_cross_entropy_matches_torch():
    torch.manual_seed(3)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    target = torch.randint(0, 50, (37,))
    target[:5] = 7  # repeated targets
    got = LinearCrossEntropy.apply(h, w, bias, target)
    want = F.cross_entropy(F.linear(h, w, bias), target, reduction="none")
    assert got.dtype == torch.float32
    assert_close(got, want, "nll")
    for name, g, r in zip("h w b".split(), grads(got, [h, w, bias]), grads(want, [h, w, bias]), strict=True):
        assert_close(g, r, f"d {name}")
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, w, bias, target), want.detach(), "nll without grad")


# ---- whole model on real text ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(wt2_path):
    return load_corpus(DataConfig(path=str(wt2_path)))


def model_cfg(
    arch: str = "all_attention", cutoffs: list[int] | None = None, variant: str | None = None, proj: bool | None = None
) -> ModelConfig:
    return ModelConfig(
        variant=variant,
        adaptive_proj=proj,
        architecture=arch,
        num_layers=2,
        hidden_dim=32,
        num_heads=4,
        num_persistent=8,
        ffn_dim=64,
        seq_len=8,
        mem_len=8,
        adaptive_cutoffs=cutoffs or [],
    )


def text_segments(corpus, b: int = 2, t: int = 8):
    ids = torch.from_numpy(np.array(corpus.tokens("valid")[: b * (2 * t + 1)], dtype=np.int64).reshape(b, -1))
    x0, y0 = ids[:, :t], ids[:, 1 : t + 1]
    x1, y1 = ids[:, t : 2 * t], ids[:, t + 1 : 2 * t + 1].clone()
    y1[1, -3:] = -100  # ignored targets (as in the padded tail of an eval split)
    return (x0, y0), (x1, y1)


@pytest.mark.parametrize("variant,proj", [(None, None), (None, False), ("authors", None)])
@pytest.mark.parametrize(
    "arch,cutoffs", [("all_attention", None), ("all_attention", [500, 3000]), ("transformer_xl", None)]
)
def test_model_loss_and_grads_match_reference(corpus, arch, cutoffs, variant, proj):
    torch.manual_seed(4)
    model = LanguageModel(model_cfg(arch, cutoffs, variant, proj), len(corpus.vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (x0, y0), (x1, y1) = text_segments(corpus)
    params = list(model.parameters())
    results = []
    for fast in (True, False):
        use_fast_paths(model, fast)
        mems = model(x0, None, y0, reference=not fast).mems
        out = model(x1, mems, y1, reference=not fast)
        loss = out.nll.sum() / (y1 != -100).sum()
        results.append((out.nll, torch.autograd.grad(loss, params)))
    (nll_f, g_f), (nll_r, g_r) = results
    assert (nll_f[y1 == -100] == 0).all()
    assert_close(nll_f, nll_r, "nll")
    for (name, _), a, b in zip(model.named_parameters(), g_f, g_r, strict=True):
        assert_close(a, b, f"d {name}")


def test_ignored_targets_match_scoring_only_the_kept_rows(corpus):
    torch.manual_seed(5)
    model = LanguageModel(model_cfg(), len(corpus.vocab))
    _, (x1, y1) = text_segments(corpus)
    out = model(x1, None, y1)
    h = {}
    model.final_norm.register_forward_hook(lambda mod, inp, o: h.setdefault("h", o))
    model(x1, None, y1)
    keep = y1.reshape(-1) != -100
    want = F.cross_entropy(F.linear(h["h"].reshape(-1, 32)[keep], model.io.weight, model.io.bias), y1.reshape(-1)[keep])
    assert_close(out.nll.reshape(-1)[keep].mean(), want, "mean nll")


@pytest.mark.parametrize("variant,cutoffs", [(None, None), ("authors", None), ("authors", [500, 3000])])
def test_pruned_fast_model_matches_gated_reference(corpus, variant, cutoffs):
    torch.manual_seed(6)
    cfg = build_config({"model": model_cfg(cutoffs=cutoffs, variant=variant).model_dump()})
    gated = LanguageModel(cfg.model, len(corpus.vocab), cfg.gates)
    with torch.no_grad():
        for p in gated.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for gate, la in zip(gated.gates, ([1.0, -1.0, 2.0, -0.5], [-1.0, -1.0, 0.5, -2.0]), strict=True):
            gate.log_alpha.copy_(torch.tensor(la))
    gated.eval()
    pruned = prune_model(gated)
    assert pruned.heads_per_layer == [2, 1]
    (x0, _), (x1, _) = text_segments(corpus)
    with torch.no_grad():
        want = gated(x1, gated(x0, reference=True).mems, reference=True).log_probs
        got = pruned(x1, pruned(x0).mems).log_probs
    assert_close(got, want, "log_probs")


# ---- bf16: no fp32 round trips inside attention -------------------------------------------------


class OutputDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.seen.append((str(func), o.dtype, tuple(o.shape)))
        return out


@pytest.mark.parametrize("impl", ["split", "dense_bias"])
def test_bf16_attention_keeps_activations_in_bf16(impl):
    torch.manual_seed(8)
    layer = RelPersistentAttention(32, 4, 8, 64, dropatt=0.0)
    layer.impl = impl
    b, t, m = 4, 16, 16
    cat = torch.randn(b, m + t, 32, dtype=torch.bfloat16, requires_grad=True)
    pos = sinusoid(torch.arange(m + t - 1, -1, -1), 32).to(torch.bfloat16)
    mask = attention_mask(t, m, m, True, torch.device("cpu"))
    param_shapes = {tuple(p.shape) for p in layer.parameters()}
    with OutputDtypes() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(cat[:, m:], cat, pos, mask)
        y.backward(torch.ones_like(y))
    assert y.dtype == torch.bfloat16
    big_fp32 = [s for s in rec.seen if s[1] == torch.float32 and np.prod(s[2]) >= 512 and s[2] not in param_shapes]
    if impl == "split":
        assert not big_fp32, big_fp32[:5]
    else:  # the first version does round-trip (SDPA's math path on CPU): the check does see it
        assert big_fp32


# ---- bf16 weights (DeepSpeed's bf16 mode casts the whole model) --------------------------------


@pytest.mark.parametrize("cutoffs", [None, [500, 3000]])
@pytest.mark.parametrize("gated", [False, True])
def test_model_with_bf16_weights_trains(corpus, cutoffs, gated):
    """With `deepspeed.precision: bf16` the engine casts every parameter to bf16 (no autocast): the
    position embeddings, memory and output layer must follow the weights' dtype. Loss and gradients
    land near the fp32 model's, within bf16 rounding."""
    torch.manual_seed(9)
    model = LanguageModel(model_cfg("all_attention", cutoffs), len(corpus.vocab), GateConfig() if gated else None)
    half = LanguageModel(model_cfg("all_attention", cutoffs), len(corpus.vocab), GateConfig() if gated else None)
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    (x0, y0), (x1, y1) = text_segments(corpus)
    losses = []
    for m in (model, half):
        torch.manual_seed(10)  # the same gate sample
        _, mems = m.loss(x0, y0)
        assert all(t.dtype == next(m.parameters()).dtype for t in mems)
        loss, _ = m.loss(x1, y1, mems)
        loss.backward()
        losses.append(loss.float())
    assert losses[1].dtype == torch.float32 and torch.isfinite(losses[1])
    assert abs(losses[1] - losses[0]) / losses[0] < 0.02, losses
    g32 = model.io.weight.grad if not cutoffs else model.io.asm.head.weight.grad
    g16 = half.io.weight.grad if not cutoffs else half.io.asm.head.weight.grad
    assert g16.dtype == torch.bfloat16
    cos = F.cosine_similarity(g32.flatten(), g16.float().flatten(), dim=0)
    assert cos > 0.99, float(cos)


# ---- adaptive softmax: torch's value, and the same graph for every batch ----------------------


def test_adaptive_nll_matches_torch_and_uses_every_cluster():
    from allatt_dist.model.output import AdaptiveIO

    torch.manual_seed(11)
    io = AdaptiveIO(1000, 32, [100, 400], 2)
    h = torch.randn(64, 32, requires_grad=True)
    target = torch.randint(0, 1000, (64,))
    target[:5] = torch.tensor([0, 99, 100, 399, 999])  # both edges of every cluster
    params = [h, *io.parameters()]
    got, want = io.nll(h, target), -io.asm(h, target).output
    assert_close(got, want, "nll")
    for a, b in zip(grads(got, params), grads(want, params), strict=True):
        assert_close(a, b, "grad")
    # A batch with no target in the last tail: that tail still takes part (a zero gradient), so the
    # backward graph, and with it DeepSpeed's gradient buckets, is the same for every batch.
    short = torch.randint(0, 400, (64,))
    g = torch.autograd.grad(io.nll(h, short).sum(), list(io.asm.tail[1].parameters()), allow_unused=True)
    assert all(x is not None and not x.any() for x in g)
    # bf16 weights: products in bf16, log-softmax in fp32
    io16 = AdaptiveIO(1000, 32, [100, 400], 2)
    io16.load_state_dict(io.state_dict())
    io16.to(torch.bfloat16)
    got16 = io16.nll(h.detach(), target)
    assert got16.dtype == torch.float32
    assert (got16 - want.detach()).abs().max() < 0.01  # torch's module in bf16: 0.074 here; this path: 0.0013


@pytest.mark.parametrize("cutoffs", [None, [500, 3000]])
def test_model_trains_under_bf16_autocast(corpus, cutoffs):
    """`allatt-dist bench --dtype bf16` (fp32 weights, bf16 autocast), with the full and the adaptive
    output layer: a training step runs and its loss is within bf16 rounding of fp32's."""
    torch.manual_seed(12)
    model = LanguageModel(model_cfg("all_attention", cutoffs), len(corpus.vocab))
    (x0, y0), (x1, y1) = text_segments(corpus)
    with torch.no_grad():
        want = model.loss(x1, y1, model(x0).mems)[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(x1, y1, model(x0).mems)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - want) / want < 0.02
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
