"""Physical head pruning on real WikiText-2 text: exact outputs, parameter accounting, model directories
(safetensors, no pickle) and their one-line errors, and the paper configuration's parameter count."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from allatt_dist.config import DataConfig, GateConfig, ModelConfig
from allatt_dist.data.corpus import Corpus, load_corpus
from allatt_dist.errors import CheckpointError
from allatt_dist.model.pruning import per_head_params, prune_model, sparsity
from allatt_dist.model.transformer import LanguageModel, count_params
from allatt_dist.modelio import load_model_dir, save_model_dir
from allatt_dist.recipe import build_config

B, T = 3, 8
H = 4
CUTOFFS = [500, 3000]
# Per layer: all closed, all open, mixed, one open (signs of log_alpha; magnitudes are random).
PATTERN = [[-1, -1, -1, -1], [1, 1, 1, 1], [1, -1, 1, -1], [-1, -1, 1, -1]]


@pytest.fixture(scope="module")
def corpus(wt2_path) -> Corpus:
    return load_corpus(DataConfig(path=str(wt2_path)))


@pytest.fixture(scope="module")
def segments(corpus: Corpus) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = 2 * T + 1
    rows = torch.from_numpy(np.array(corpus.tokens("test")[: B * n], dtype=np.int64).reshape(B, n))
    return [(rows[:, s * T : (s + 1) * T], rows[:, s * T + 1 : (s + 1) * T + 1]) for s in range(2)]


# Switch sets: ours (defaults), the authors' preset (no output scaling: an emptied layer keeps the
# output projection's bias), and that bias under output scaling (folded, and 0 for an emptied layer).
SWITCHES = {
    "ours": ({}, {}),
    "no_adaptive_proj": ({"adaptive_proj": False}, {}),  # torch's adaptive softmax as is
    "authors": ({"variant": "authors"}, {}),
    "bias_scaled": ({"attn_out_bias": True, "persistent_content_bias": False}, {"output_scaling": True}),
}


def model_cfg(arch: str, cutoffs: list[int], **switches) -> ModelConfig:
    return ModelConfig(
        **switches,
        architecture=arch,
        num_layers=len(PATTERN),
        hidden_dim=32,
        num_heads=H,
        num_persistent=8,
        ffn_dim=48,
        seq_len=T,
        mem_len=T,
        adaptive_cutoffs=cutoffs,
    )


def gated_model(corpus: Corpus, cfg: ModelConfig, seed: int = 0, gates: GateConfig | None = None) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(cfg, len(corpus.vocab), gates or GateConfig(output_scaling=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("log_alpha"):  # non-zero u/v biases etc., so a wrong slice shows
                p.add_(0.05 * torch.randn_like(p))
        for gate, signs in zip(model.gates, PATTERN, strict=True):
            gate.log_alpha.copy_(torch.tensor(signs, dtype=torch.float) * (0.1 + 2 * torch.rand(H)))
    return model.eval()


@torch.no_grad()
def outputs(model: LanguageModel, segs) -> list[torch.Tensor]:
    """log_probs and per-token nll of each segment, memory carried from one to the next."""
    got, mems = [], None
    for x, y in segs:
        out = model(x, mems)
        got += [out.log_probs, model(x, mems, y).nll]
        mems = out.mems
    return got


CASES = [("all_attention", []), ("all_attention", CUTOFFS), ("transformer_xl", []), ("transformer_xl", CUTOFFS)]


@pytest.mark.parametrize("switches", list(SWITCHES))
@pytest.mark.parametrize("arch,cutoffs", CASES)
def test_pruned_model_matches_gated_eval(corpus, segments, arch, cutoffs, switches):
    model_keys, gate_keys = SWITCHES[switches]
    run = build_config({"model": model_cfg(arch, cutoffs, **model_keys).model_dump(), "gates": gate_keys})
    cfg = run.model
    gated = gated_model(corpus, cfg, gates=run.gates)
    pruned = prune_model(gated)
    assert pruned.heads_per_layer == [0, 4, 2, 1] == [int(g.open_mask().sum()) for g in gated.gates]
    assert pruned.gates == [] and not any("log_alpha" in k for k in pruned.state_dict())
    assert pruned.layers[0].attn is None and sparsity(pruned.heads_per_layer, cfg) == pytest.approx(9 / 16)
    for a, b in zip(outputs(gated, segments), outputs(pruned, segments), strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()

    dense = LanguageModel(cfg, len(corpus.vocab))
    removed = len(PATTERN) * H - sum(pruned.heads_per_layer)
    assert count_params(gated) == count_params(dense)
    assert count_params(gated, include_gates=True) == count_params(dense) + len(PATTERN) * H
    assert count_params(pruned) == count_params(dense) - removed * per_head_params(cfg)


@pytest.mark.parametrize("arch", ["all_attention", "transformer_xl"])
def test_per_head_params_from_shapes(arch):
    cfg = model_cfg(arch, [])
    layer = LanguageModel(cfg, 50).layers[1]
    shapes = {name: tuple(p.shape) for name, p in layer.attn.named_parameters()}
    d, dh, n = cfg.hidden_dim, cfg.head_dim, cfg.num_persistent
    expected = {
        "q.weight": (H * dh, d),
        "kv.weight": (2 * H * dh, d),
        "r_proj.weight": (H * dh, d),
        "out.weight": (d, H * dh),
    }
    expected |= {"r_w_bias": (H, dh), "r_r_bias": (H, dh)}
    if arch == "all_attention":
        expected |= {"pk": (H, n, dh), "pv": (H, n, dh)}
    assert shapes == expected
    total = sum(math.prod(s) for s in shapes.values())
    assert total % H == 0 and total // H == per_head_params(cfg)
    # Nothing else in a block depends on the head count (layer norm, feed-forward).
    rest = {name: p.shape for name, p in layer.named_parameters() if not name.startswith("attn.")}
    smaller = LanguageModel(cfg, 50, heads_per_layer=[1] * cfg.num_layers).layers[1]
    assert rest == {name: p.shape for name, p in smaller.named_parameters() if not name.startswith("attn.")}


def test_prune_ungated_model_is_identity(corpus, segments):
    dense = LanguageModel(model_cfg("all_attention", []), len(corpus.vocab)).eval()
    pruned = prune_model(dense)
    assert pruned.heads_per_layer == [H] * len(PATTERN) and count_params(pruned) == count_params(dense)
    for a, b in zip(outputs(dense, segments), outputs(pruned, segments), strict=True):
        assert torch.equal(a, b)


# ---- model directories ----------------------------------------------------------------------------


@pytest.fixture
def saved(corpus, tmp_path):
    pruned = prune_model(gated_model(corpus, model_cfg("all_attention", CUTOFFS)))
    out = tmp_path / "pruned"
    meta = save_model_dir(pruned, corpus.vocab, out, extra={"note": "test"})
    return pruned, out, meta


def test_save_and_load_round_trip(corpus, segments, saved):
    pruned, out, meta = saved
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk == meta and on_disk["note"] == "test"
    assert on_disk["heads_per_layer"] == [0, 4, 2, 1] and on_disk["params"] == count_params(pruned)
    assert on_disk["architecture"] == "all_attention" and on_disk["vocab_size"] == len(corpus.vocab)
    assert on_disk["model"]["adaptive_cutoffs"] == CUTOFFS

    raw = (out / "model.safetensors").read_bytes()  # safetensors: u64 header length, JSON header, data
    assert not raw.startswith((b"PK", b"\x80"))  # neither a torch zip nor a pickle stream
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert set(header) - {"__metadata__"} == set(pruned.state_dict())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(pruned.state_dict())

    loaded, vocab, meta2 = load_model_dir(out)
    assert not loaded.training and loaded.heads_per_layer == pruned.heads_per_layer and meta2 == meta
    assert vocab.itos == corpus.vocab.itos
    for a, b in zip(outputs(pruned, segments), outputs(loaded, segments), strict=True):
        assert torch.equal(a, b)


def test_gated_model_round_trip(corpus, segments, tmp_path):
    gated = gated_model(corpus, model_cfg("transformer_xl", []))
    save_model_dir(gated, corpus.vocab, tmp_path / "g", gates=GateConfig(output_scaling=True))
    loaded, _, meta = load_model_dir(tmp_path / "g")
    assert meta["gates"]["output_scaling"] is True and len(loaded.gates) == len(PATTERN)
    for a, b in zip(outputs(gated, segments), outputs(loaded, segments), strict=True):
        assert torch.equal(a, b)


def _edit_config(out, fn):
    meta = json.loads((out / "config.json").read_text())
    fn(meta)
    (out / "config.json").write_text(json.dumps(meta))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _swap_vocab(out):
    words = (out / "vocab.txt").read_text().split("\n")
    words[5], words[6] = words[6], words[5]  # same size, different ids
    (out / "vocab.txt").write_text("\n".join(words))


BROKEN = {
    "missing_dir": (lambda out: out.rename(out.with_name("moved")), "pruned"),
    "missing_config": (lambda out: (out / "config.json").unlink(), "config.json"),
    "config_not_json": (lambda out: (out / "config.json").write_text("{not json"), "config.json"),
    "config_binary": (lambda out: (out / "config.json").write_bytes(b"\xff\xfe{"), "config.json"),
    "wrong_format": (lambda out: _edit_config(out, lambda m: m.update(format="other/thing")), "config.json"),
    "bad_heads": (lambda out: _edit_config(out, lambda m: m.update(heads_per_layer=[9])), "config.json"),
    "truncated": (lambda out: _truncate(out / "model.safetensors"), "model.safetensors"),
    "missing_weights": (lambda out: (out / "model.safetensors").unlink(), "model.safetensors"),
    "other_shape": (lambda out: _edit_config(out, lambda m: m["model"].update(hidden_dim=64)), "model.safetensors"),
    "other_vocab": (_swap_vocab, "vocab.txt"),
    "smaller_vocab": (lambda out: (out / "vocab.txt").write_text("<eos>\n<unk>\nthe\n"), "vocab.txt"),
    "missing_vocab": (lambda out: (out / "vocab.txt").unlink(), "vocab.txt"),
    "binary_vocab": (lambda out: (out / "vocab.txt").write_bytes(b"<eos>\n\xff\xfe\n"), "vocab.txt"),
    "bad_vocab": (lambda out: (out / "vocab.txt").write_text("<eos>\n<unk>\n<unk>\n"), "vocab.txt"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_model_dir_gives_one_line_error(saved, case):
    _, out, _ = saved
    breaker, names = BROKEN[case]
    breaker(out)
    with pytest.raises(CheckpointError) as err:
        load_model_dir(out)
    msg = str(err.value)
    assert "\n" not in msg and names in msg, msg


# ---- paper configuration --------------------------------------------------------------------------


def test_paper_config_param_count():
    cfg = ModelConfig(
        num_layers=16,
        hidden_dim=512,
        num_heads=8,
        num_persistent=2048,
        seq_len=192,
        mem_len=192,
        adaptive_cutoffs=[20000, 40000, 200000],
        adaptive_div=4,
        adaptive_proj=False,  # torch's adaptive softmax as is (the default adds 772,023: test_variants.py)
    )
    vocab = 267_735
    with torch.device("meta"):
        model = LanguageModel(cfg, vocab)
    assert all(p.device.type == "meta" for p in model.parameters())

    d, dh, n = 512, 64, 2048
    per_head = 3 * dh * d + dh * d + d * dh + 2 * dh + 2 * n * dh  # q,k,v + r + out + u,v + persistent
    assert per_head == per_head_params(cfg) == 426_112
    norms = 16 * 2 * d + 2 * d  # a LayerNorm (weight, bias) per layer + the final one
    head = d * (20000 + 3) + (20000 + 3)  # shortlist + 3 cluster logits, with bias
    tails = 0
    for i, (lo, hi) in enumerate([(20000, 40000), (40000, 200000), (200000, vocab)], start=1):
        h = d // 4**i  # 128, 32, 8
        tails += d * h + h * (hi - lo)  # down-projection + word matrix (tied with the adaptive input)
    expected = 128 * per_head + norms + head + tails
    got = count_params(model)
    print(f"paper config: {got:,} parameters ({128 * per_head:,} in heads, {head + tails:,} in input/output)")
    assert got == expected == 73_129_179
