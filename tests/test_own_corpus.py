"""End to end on the user's own corpus (issue 23's done-when): the real-text slice (`wt2_slice`) from three
sources, a byte-level BPE tokenizer trained by the run, and the quickstart's pipeline as a user runs it: one
`allatt-dist run` (dense -> search -> rank) in a fresh process joining the session's local Ray, then `evaluate`
of a leaderboard model in another fresh process, given only the data (the model brings its tokenizer), equal to
the leaderboard's test perplexity. The sources, one parametrized test sharing one tiny recipe:

* `jsonl`: a local folder of JSONL records (text in `body`), a 2-trial search;
* `s3-parquet`: a Parquet copy in the session's S3 server (loopback); `data.path` stays the bucket's URI, so the
  Ray workers read the bucket themselves (the session Ray's nodes have the server's AWS_*); its model is then
  evaluated, offline and with no bucket, on a `datasets` folder of the same text: the same ids from both; its
  token cache is built by Ray tasks (`data.build_workers: ray`, small chunks), after the CLI connected;
* `datasets`: a Hugging Face `datasets` save_to_disk folder, run and evaluated offline (HF_DATASETS_OFFLINE,
  HF_HUB_OFFLINE).

A tiny model and a few steps, a 1-trial search for the last two: the pipeline and the data path are tested, not
the model's quality."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.clirun import cli_cmd, run_cli

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.ray

RECIPE = {
    "model": {"num_layers": 1, "hidden_dim": 32, "num_heads": 4, "num_persistent": 8, "seq_len": 16, "mem_len": 16},
    "data": {"text_field": "body", "tokenizer": "bpe", "vocab_size": 300, "eval_batch_size": 8},
    "train": {"max_steps": 6, "batch_size": 4, "eval_every": 6, "checkpoint_every": 6, "log_every": 3},
    "prune": {"max_steps": 4},
    "gates": {"sparsity_target": 0.5, "warmup_steps": 2, "lr": 0.3},
    "scaling": {"num_workers": 1, "cpus_per_worker": 0.99},
    "deepspeed": {"zero_stage": 0},
    "tune": {"space": {"gates.sparsity_target": {"grid": [0.25, 0.5]}}, "scheduler": {"type": "fifo"}},
}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _records(src: Path, split: str, field: str, per: int = 20) -> list[dict]:
    """A split's lines as records of `per` lines, the text in `field` (and an id the reader ignores)."""
    lines = (src / f"{split}.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return [{"id": i, field: "".join(x + "\n" for x in lines[i : i + per])} for i in range(0, len(lines), per)]


def to_jsonl(src: Path, out: Path, field: str = "body", per: int = 20) -> Path:
    """Each split's lines as JSONL records of `per` lines, the text in `field` (and an id the reader ignores)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        records = _records(src, split, field, per)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def to_datasets_folder(src: Path, out: Path) -> Path:
    """The slice as a `DatasetDict.save_to_disk` folder (train, validation, test; the text in `text`)."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    parts = {s: datasets.Dataset.from_list(_records(src, s, "text")) for s in ("train", "valid", "test")}
    dsd = datasets.DatasetDict({"train": parts["train"], "validation": parts["valid"], "test": parts["test"]})
    dsd.save_to_disk(str(out))
    return out


def to_bucket(src: Path, s3, prefix: str) -> str:
    """The slice as Parquet files (the text in `text`) under `prefix` of the session's bucket; its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    client = s3.client()
    for split in ("train", "valid", "test"):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(_records(src, split, "text")), sink)
        client.put_object(Bucket="runs", Key=f"{prefix}/{split}.parquet", Body=sink.getvalue().to_pybytes())
    return f"s3://runs/{prefix}"


def _no_bucket() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def _source(name: str, wt2_slice: Path, s3, tmp_path: Path) -> tuple[dict, dict, str, dict]:
    """(the recipe's data keys, the run's environment, the data evaluate reads, evaluate's environment)."""
    if name == "jsonl":
        corpus = str(to_jsonl(wt2_slice, tmp_path / "corpus"))
        return {"path": corpus}, dict(os.environ), corpus, dict(os.environ)
    folder = str(to_datasets_folder(wt2_slice, tmp_path / "hf"))
    evaluate_env = _no_bucket() | OFFLINE  # no bucket, no hub
    data = {"text_field": "text"}
    if name == "s3-parquet":  # and the token cache built by Ray tasks (20 KB chunks), after the CLI connected
        data |= {"path": to_bucket(wt2_slice, s3, "own23/parquet"), "build_workers": "ray", "build_chunk_mb": 0.02}
        return data, os.environ | s3.env(), folder, evaluate_env
    return data | {"path": folder}, _no_bucket() | OFFLINE, folder, evaluate_env


@pytest.mark.parametrize("source", ["jsonl", "s3-parquet", "datasets"])
def test_own_corpus_runs_end_to_end_then_evaluate_equals_the_leaderboard(source, local_ray, s3, wt2_slice, tmp_path):
    data, run_env, evaluate_path, evaluate_env = _source(source, wt2_slice, s3, tmp_path)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"] |= data | {"cache_dir": str(tmp_path / "cache")}
    trials = 2 if source == "jsonl" else 1
    recipe["tune"]["space"]["gates.sparsity_target"]["grid"] = [0.25, 0.5][-trials:]
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(recipe))
    exp = tmp_path / "exp"
    cmd = cli_cmd("run", tmp_path / "own.yaml", "--out", exp, "--address", local_ray, "--no-progress")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (exp / "dense" / "model" / "tokenizer.json").is_file()
    assert yaml.safe_load((exp / "run.yaml").read_text())["data"]["path"] == data["path"]  # workers get the URI
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    assert len([m for m in board if m["sparsity_target"] is not None]) == trials, board
    best = next(m for m in board if m["model_dir"] and m["test_ppl"] is not None)
    assert math.isfinite(best["test_ppl"]) and (exp / best["model_dir"] / "tokenizer.json").is_file()
    sets = [f"data.path={evaluate_path}", f"data.text_field={recipe['data']['text_field']}"]
    sets.append(f"data.cache_dir={tmp_path / 'cache2'}")  # a fresh cache: evaluate tokenises the data itself
    batch = str(recipe["data"]["test_batch_size"] if "test_batch_size" in recipe["data"] else 8)
    e = run_cli(
        "evaluate", exp / best["model_dir"], "--batch-size", batch, *(f"--set={s}" for s in sets), env=evaluate_env
    )
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout)["ppl"] == pytest.approx(best["test_ppl"], rel=1e-5)
