"""End to end on the user's own corpus: a folder of JSONL (WikiText-2 mini slices as records), a byte-level BPE
tokenizer trained by the run, a dense phase on the session's local Ray; then `evaluate` in a fresh process,
given only the folder (the model brings its tokenizer), equals the phase's own validation perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from allatt_dist.plan import make_plan
from allatt_dist.train.trainer import train
from tests.clirun import run_cli
from tests.tiny import tiny_config

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def jsonl_corpus(wt2_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own-jsonl")
    for split, n in (("train", 800), ("valid", 200), ("test", 200)):
        lines = (wt2_path / f"{split}.txt").read_text(encoding="utf-8").split("\n")[:n]
        records = [{"id": i, "body": "\n".join(lines[i : i + 20]) + "\n"} for i in range(0, n, 20)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def test_jsonl_and_bpe_train_then_evaluate_in_a_fresh_process(local_ray, jsonl_corpus, tmp_path):
    data = {"path": str(jsonl_corpus), "text_field": "body", "tokenizer": "bpe", "vocab_size": 400}
    data |= {"cache_dir": str(tmp_path / "cache"), "eval_batch_size": 8}
    cfg = tiny_config(jsonl_corpus, data=data, train={"max_steps": 10}, scaling={"num_workers": 1})
    plan = make_plan(cfg, tmp_path / "run", progress=False)
    dense = train(plan, ["dense"])["dense"]
    assert dense["step"] == 10 and math.isfinite(dense["valid_ppl"]), dense
    model = tmp_path / "run" / "dense" / "model"
    assert (model / "tokenizer.json").is_file()
    sets = [f"data.path={jsonl_corpus}", "data.text_field=body", f"data.cache_dir={tmp_path / 'cache'}"]
    r = run_cli("evaluate", model, "--split", "valid", "--batch-size", "8", *(f"--set={s}" for s in sets), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["ppl"] == pytest.approx(dense["valid_ppl"], rel=1e-4)
