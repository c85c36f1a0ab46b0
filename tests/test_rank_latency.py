"""`rank`'s latency columns: models timed on one device, the leaderboard's columns, the latency plot and
the `--latency-budget` pick (rank's report, and generate's one line when nothing meets it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allatt_dist.cli import main
from allatt_dist.config import ModelConfig
from allatt_dist.data.vocab import Vocab
from allatt_dist.infer.latency import GEN_TOKENS, time_models
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import save_model_dir
from allatt_dist.search.rank import write_outputs

CFG = ModelConfig(num_layers=2, hidden_dim=32, num_heads=4, num_persistent=8, seq_len=16, mem_len=16)
VOCAB = Vocab(["<eos>", "<unk>", *[f"w{i}" for i in range(60)]])


def _models() -> dict:
    torch.manual_seed(0)
    return {
        "dense": build_model(CFG, len(VOCAB)).eval(),
        "t50": build_model(CFG, len(VOCAB), None, [2, 2]).eval(),
        "t75": build_model(CFG, len(VOCAB), None, [1, 1]).eval(),
    }


def test_models_are_timed_on_one_device():
    tokens = np.random.default_rng(0).integers(0, len(VOCAB), 500)
    t = time_models(_models(), tokens, batch=4, device=torch.device("cpu"))
    assert set(t) == {"dense", "t50", "t75"}
    for row in t.values():
        assert row["latency_ms"] > 0 and row["gen_tokens_per_s"] > 0 and "thread" in row["latency_device"]
    assert GEN_TOKENS / t["dense"]["gen_tokens_per_s"] < 10  # seconds for the generated tokens: sane


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """An experiment ranked by write_outputs with latency columns (the scoring itself: test_rank_*.py)."""
    exp = tmp_path_factory.mktemp("lat") / "exp"
    (exp / ".rank-work").mkdir(parents=True)
    rows = []
    timing = {"dense": (9.0, 100.0), "t50": (5.0, 110.0), "t75": (3.0, 130.0)}  # latency_ms, test_ppl
    for name, model in _models().items():
        meta = save_model_dir(model, VOCAB, exp / ".rank-work" / name)
        ms, ppl = timing[name]
        rows.append(
            dict(
                name=name,
                status="reference" if name == "dense" else "finished",
                gated=name != "dense",
                architecture="all_attention",
                test_ppl=ppl,
                params=meta["params"],
                sparsity_target=name,
                heads_per_layer=meta["heads_per_layer"],
                work=exp / ".rank-work" / name,
                latency_ms=ms,
                gen_tokens_per_s=1000 / ms,
                latency_device="test cpu, 1 thread(s)",
            )
        )
    out = write_outputs(rows, exp, None, latency_budget=6.0)
    return exp, out


def test_latency_columns_plot_and_budget(ranked):
    exp, out = ranked
    assert out["latency_budget"] == {"ms": 6.0, "best": "t50", "fastest": "t75"}
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    assert {r["name"]: r["latency_ms"] for r in board} == {"dense": 9.0, "t50": 5.0, "t75": 3.0}
    assert all(r["latency_device"] == "test cpu, 1 thread(s)" for r in board)
    assert "latency_ms" in (exp / "leaderboard.csv").read_text().splitlines()[0]
    md = (exp / "leaderboard.md").read_text()
    assert "gen_tokens_per_s" in md.splitlines()[0] and "measured on test cpu, 1 thread(s)" in md
    assert (exp / "pareto_latency.png").stat().st_size > 0 and (exp / "pareto.png").is_file()


def test_generate_picks_by_latency_budget_or_names_the_fastest(ranked, capsys):
    exp, _ = ranked
    assert main(["generate", str(exp), "--latency-budget", "6", "--prompt", "w1", "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "t50"
    assert main(["generate", str(exp), "--latency-budget", "1", "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the fastest is t75 with 3 ms" in err, err
