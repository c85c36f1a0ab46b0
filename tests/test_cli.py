"""`allatt-dist prune` and `evaluate` as a user runs them: JSON on stdout, one error line on stderr."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run_cli as cli

from allatt_dist.config import GateConfig, ModelConfig
from allatt_dist.data.corpus import load_corpus
from allatt_dist.data.vocab import Vocab
from allatt_dist.evaluate import evaluate
from allatt_dist.model.pruning import per_head_params
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.modelio import save_model_dir

CFG = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=16, mem_len=16)


@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory, wt2_cfg):
    corpus = load_corpus(wt2_cfg, splits=("train", "test"))
    torch.manual_seed(0)
    model = LanguageModel(CFG, len(corpus.vocab), gates=GateConfig())
    with torch.no_grad():
        model.layers[0].gate.log_alpha.copy_(torch.tensor([1.0, -1.0, 2.0, -3.0]))  # 2 of 4 open
        model.layers[1].gate.log_alpha.copy_(torch.tensor([-1.0, -1.0, -1.0, -1.0]))  # layer emptied
    out = tmp_path_factory.mktemp("cli") / "gated"
    save_model_dir(model, corpus.vocab, out, gates=GateConfig())
    return out, model.eval(), corpus


def test_prune_then_evaluate(gated_dir, tmp_path, wt2_path):
    src, gated, corpus = gated_dir
    p = cli("prune", str(src), "--out", str(tmp_path / "pruned"))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["heads_per_layer"] == [2, 0]
    assert res["sparsity"] == pytest.approx(6 / 8)
    assert res["params_before"] - res["params_after"] == 6 * per_head_params(CFG)

    p = cli(
        "evaluate", str(tmp_path / "pruned"), "--split", "test", "--batch-size", "32", "--set", f"data.path={wt2_path}"
    )
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev["tokens"] == len(corpus.tokens("test")) - 1
    assert ev["params"] == res["params_after"] and ev["heads_per_layer"] == [2, 0]
    assert ev["ppl"] == pytest.approx(evaluate(gated, corpus.tokens("test"), 32).ppl, rel=1e-4)

    # --out onto the model just written: refused unless --force, which replaces it as a whole
    again = cli("prune", str(src), "--out", str(tmp_path / "pruned"))
    assert again.returncode == 2 and "a model directory already exists there" in again.stderr, again.stderr
    assert cli("prune", str(src), "--out", str(tmp_path / "pruned"), "--force").returncode == 0


def test_prune_never_overwrites_what_is_not_its_own_output(gated_dir, tmp_path):
    src, _, _ = gated_dir
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    cases = {
        str(keep): "exists and is not a model directory",
        str(tmp_path / "afile"): "exists and is not a model directory",
        str(tmp_path / "afile" / "sub"): "is a file, not a folder",
        str(src): "would replace the input model",
        str(src.parent): "would replace the input model",
    }
    for out, needle in cases.items():
        p = cli("prune", str(src), "--out", out, "--force")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, (out, p.stderr)
    assert (keep / "notes.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "x"
    assert (src / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["evaluate", "m", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got 0"),
        (["rank", "e", "--budget", "-5"], "argument --budget: expected a whole number >= 1, got -5"),
        (["bench", "c.yaml", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["bench", "c.yaml", "--threads", "0"], "argument --threads: expected a whole number >= 1"),
        (["train"], "the following arguments are required: config"),
        (["train", "c.yaml", "--", "--phase", "dense"], "train takes no arguments after '--'"),
    ],
)
def test_usage_errors_are_one_line(args, needle):
    p = cli(*args)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr


def test_bench_out_onto_a_folder_fails_before_measuring(tmp_path):
    p = cli("bench", "docs/bench/small.yaml", "--out", str(tmp_path), "--vocab-size", "50")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is a folder; give a file path" in p.stderr


def test_evaluate_refuses_a_model_of_another_vocabulary(tmp_path, wt2_path):
    vocab = Vocab.build(["a b c"])
    save_model_dir(LanguageModel(CFG, len(vocab)), vocab, tmp_path / "m")
    p = cli("evaluate", str(tmp_path / "m"), "--set", f"data.path={wt2_path}")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "vocabulary" in p.stderr and str(tmp_path / "m") in p.stderr


def test_prune_refuses_an_ungated_model_and_a_missing_dir(tmp_path):
    vocab = Vocab.build(["a b c"])
    save_model_dir(LanguageModel(CFG, len(vocab)), vocab, tmp_path / "dense")
    p = cli("prune", str(tmp_path / "dense"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "ungated" in p.stderr and not (tmp_path / "x").exists()
    p = cli("prune", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not found" in p.stderr


def test_missing_data_folder_is_one_line(gated_dir, tmp_path):
    src, _, _ = gated_dir
    p = cli("evaluate", str(src), "--set", f"data.path={tmp_path / 'missing'}")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "data folder not found" in p.stderr


@pytest.mark.parametrize(
    "item, needle",
    [("model.num_heads=2", "only data.KEY=VALUE applies here"), ("data.pth=/x", "data.pth: unknown key")],
)
def test_evaluate_takes_only_known_data_keys(gated_dir, item, needle):
    src, _, _ = gated_dir
    p = cli("evaluate", str(src), "--set", item)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and needle in p.stderr, p.stderr


@pytest.mark.parametrize(
    "device, needle",
    [("tpu", "--device 'tpu': give auto, cpu, cuda or cuda:N"), ("cuda:7", "--device cuda:7: no such CUDA device")],
)
def test_evaluate_device_is_checked_in_one_line(gated_dir, wt2_path, device, needle):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that device")
    p = cli("evaluate", str(gated_dir[0]), "--device", device, "--set", f"data.path={wt2_path}")
    assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
