"""`allatt-dist bench`: a small CPU smoke run (fields present and sane, not the speed), the FLOPs
formula against torch's own FLOP counter, the peak table and the seeded head patterns."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from allatt_dist.bench import BenchOptions
from allatt_dist.cli import main, parse_args
from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.errors import UserError
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.perf import flops_per_token, head_patterns, peak_tflops

TINY = """\
model:
  num_layers: 2
  hidden_dim: 32
  num_heads: 4
  num_persistent: 16
  seq_len: 16
  mem_len: 16
data:
  path: {path}
  eval_batch_size: 4
train:
  batch_size: 4
"""


def test_bench_smoke_json(tmp_path, wt2_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(path=wt2_path))
    out = tmp_path / "res.json"
    args = ["bench", str(cfg), "--json", "--repeats", "2", "--warmup", "1", "--sparsities", "0.25,0.5,0.75"]
    rc = main([*args, "--baseline", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == res
    assert res["dtype"] == "fp32" and isinstance(res["device"], str) and res["device"]
    assert res["config"]["num_layers"] == 2 and res["config"]["vocab_size"] > 1000
    assert res["train_tokens_per_s"] > 0 and res["baseline"]["train_tokens_per_s"] > 0
    assert res["train_speedup"] == pytest.approx(res["train_tokens_per_s"] / res["baseline"]["train_tokens_per_s"])
    st = res["train_step_ms"]
    assert 0 < st["min"] <= st["median"] <= st["max"] and len(st["all"]) == 2
    mem = res["train_peak_mem_bytes"]
    assert mem is None or (isinstance(mem, int) and mem >= 0)
    assert res["train_state_bytes"] > 0
    model_cfg = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=16, seq_len=16, mem_len=16)
    vocab = res["config"]["vocab_size"]
    assert res["flops_per_token"] == pytest.approx(flops_per_token(model_cfg, vocab, batch=4))
    assert res["train_flops_per_token"] == pytest.approx(3 * res["flops_per_token"])
    assert res["train_tflops"] > 0 and res["peak_tflops"] is None and res["mfu"] is None  # CPU: no known peak
    keys = ["0.0", "0.25", "0.5", "0.75"]
    for field in ("infer_ms", "params", "infer_peak_mem_bytes", "heads_per_layer", "infer_flops_per_token"):
        assert list(res[field]) == keys, field
    assert all(res["infer_ms"][k] > 0 for k in keys)
    assert [sum(res["heads_per_layer"][k]) for k in keys] == [8, 6, 4, 2]
    params = [res["params"][k] for k in keys]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4
    flops = [res["infer_flops_per_token"][k] for k in keys]
    assert flops == sorted(flops, reverse=True)
    assert res["infer_check"]["0.0"]["latency_ratio"] == pytest.approx(1.0)
    assert res["baseline"]["infer_ms_dense"] > 0


def test_bench_table_bf16_random_ids(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(path=tmp_path / "no-such-corpus"))
    args = ["--dtype", "bf16", "--repeats", "1", "--warmup", "0", "--sparsities", "0.5", "--vocab-size", "500"]
    assert main(["bench", str(cfg), *args, "--baseline", "--baseline-dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "dtype bf16" in text and "V=500" in text and "tokens/s" in text and "0.50" in text
    assert "baseline (fp32):" in text


def test_bench_rejects_bad_sparsity(tmp_path, wt2_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(path=wt2_path))
    assert main(["bench", str(cfg), "--sparsities", "1.5"]) == 2
    assert "--sparsities" in capsys.readouterr().err


def test_bench_flags_become_one_options_object():
    argv = ["bench", "c.yaml", "--sparsities", "0.5, 0.25,", "--no-train", "--clock", "cpu", "--dtype", "bf16"]
    opts = BenchOptions.from_args(parse_args([*argv, "--compile", "--batch-size", "3", "--vocab-size", "7"]))
    assert opts.sparsities == (0.5, 0.25) and not opts.train and opts.cpu_clock and opts.compile
    assert (opts.dtype, opts.precision_of_baseline, opts.batch_size, opts.vocab_size) == ("bf16", "bf16", 3, 7)
    assert BenchOptions.from_args(parse_args(["bench", "c.yaml"])) == BenchOptions()  # the flags' defaults
    for bad in ({"sparsities": (1.0,)}, {"repeats": 0}, {"warmup": -1}, {"vocab_size": 1}):
        with pytest.raises(UserError):
            BenchOptions(**bad)
    with pytest.raises(UserError, match="comma list"):
        BenchOptions.from_args(parse_args(["bench", "c.yaml", "--sparsities", "half"]))


@pytest.mark.parametrize(
    "arch,heads",
    [("all_attention", None), ("all_attention", [3, 0, 1]), ("transformer_xl", None), ("transformer_xl", [2, 4, 0])],
)
def test_flops_formula_matches_torch_counter(arch, heads):
    """Forward: exact. Training: 3x forward, less the input-gradient GEMM of the position projection
    (the sinusoids need no gradient)."""
    cfg = ModelConfig(
        architecture=arch, num_layers=3, hidden_dim=32, num_heads=4, num_persistent=24, seq_len=8, mem_len=12
    )
    vocab, b = 300, 3
    torch.manual_seed(0)
    model = LanguageModel(cfg, vocab, heads_per_layer=heads)
    x = torch.randint(0, vocab, (b, cfg.seq_len))
    mems = [torch.randn(b, cfg.mem_len, cfg.hidden_dim) for _ in range(cfg.num_layers)]
    formula = flops_per_token(cfg, vocab, model.heads_per_layer, batch=b) * b * cfg.seq_len
    # torch's counter has no entry for the fused CPU SDPA kernel (used without persistent vectors)
    # nor for the in-place baddbmm_ (split attention accumulates the persistent part with it)
    extra = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        torch.ops.aten.baddbmm_: lambda c, a, b, *args, **kw: 2 * a[0] * a[1] * a[2] * b[2],
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as fwd:
        with torch.no_grad():
            model(x, mems, x)
    assert fwd.get_total_flops() == pytest.approx(formula, rel=1e-9)
    with FlopCounterMode(display=False, custom_mapping=extra) as train:
        model.loss(x, x, mems)[0].backward()
    k = cfg.mem_len + cfg.seq_len
    pos_input_grad = sum(2 * k * cfg.hidden_dim * h * cfg.head_dim for h in model.heads_per_layer)
    assert train.get_total_flops() == pytest.approx(3 * formula - pos_input_grad, rel=1e-9)


def test_flops_adaptive_head_and_tails():
    cfg = ModelConfig(
        num_layers=1, hidden_dim=64, num_heads=4, num_persistent=8, adaptive_cutoffs=[100, 200], adaptive_proj=False
    )
    dense = flops_per_token(cfg.model_copy(update={"adaptive_cutoffs": []}), 1000)
    body = dense - 2 * 64 * 1000
    head = 2 * 64 * (100 + 2)
    tails = 2 * (64 * 16 + 16 * 100) + 2 * (64 * 4 + 4 * 800)
    assert flops_per_token(cfg, 1000) == pytest.approx(body + head + tails)
    proj = cfg.model_copy(update={"adaptive_proj": True})  # + the two shortlist projections, d x d each
    assert flops_per_token(proj, 1000) == pytest.approx(body + head + tails + 2 * 2 * 64 * 64)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("AMD EPYC", "bf16") is None


def test_head_patterns_seeded_and_nested():
    a = head_patterns(4, 4, [0.25, 0.5, 0.75], seed=3)
    b = head_patterns(4, 4, [0.25, 0.5, 0.75], seed=3)
    assert all(torch.equal(x, y) for s in a for x, y in zip(a[s], b[s], strict=True))
    opened = {s: torch.stack(m) for s, m in a.items()}
    assert [int((~o).sum()) for o in opened.values()] == [4, 8, 12]
    assert ((opened[0.5] & ~opened[0.25]).sum()) == 0  # closing more heads keeps the earlier ones closed
    assert ((opened[0.75] & ~opened[0.5]).sum()) == 0
    assert not torch.equal(opened[0.5], torch.stack(head_patterns(4, 4, [0.5], seed=4)[0.5]))
    GateConfig()  # the pruned models are built from the config's gate section (smoke: default constructs)
