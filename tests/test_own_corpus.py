"""End to end on the user's own corpus (issue 23's done-when): the real-text slice (`wt2_slice`) converted to JSONL
records, a byte-level BPE tokenizer trained by the run, and the quickstart's pipeline as a user runs it: one
`allatt-dist run` (dense -> a 2-trial search -> rank) in a fresh process joining the session's local Ray, then
`evaluate` of a leaderboard model in another fresh process, given only the folder (the model brings its
tokenizer), equal to the leaderboard's test perplexity. A tiny model and a few steps: the pipeline and the data
path are tested, not the model's quality."""

from __future__ import annotations

import json
import math
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


def to_jsonl(src: Path, out: Path, field: str = "body", per: int = 20) -> Path:
    """Each split's lines as JSONL records of `per` lines, the text in `field` (and an id the reader ignores)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = (src / f"{split}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        records = [{"id": i, field: "".join(x + "\n" for x in lines[i : i + per])} for i in range(0, len(lines), per)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def test_jsonl_and_bpe_run_end_to_end_then_evaluate_equals_the_leaderboard(local_ray, wt2_slice, tmp_path):
    corpus = to_jsonl(wt2_slice, tmp_path / "corpus")
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"] |= {"path": str(corpus), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(recipe))
    exp = tmp_path / "exp"
    import subprocess

    cmd = cli_cmd("run", tmp_path / "own.yaml", "--out", exp, "--address", local_ray, "--no-progress")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (exp / "dense" / "model" / "tokenizer.json").is_file()
    board = json.loads((exp / "leaderboard.json").read_text())["models"]
    assert len([m for m in board if m["sparsity_target"] is not None]) == 2, board
    best = next(m for m in board if m["model_dir"] and m["test_ppl"] is not None)
    assert math.isfinite(best["test_ppl"]) and (exp / best["model_dir"] / "tokenizer.json").is_file()
    sets = [f"data.path={corpus}", "data.text_field=body", f"data.cache_dir={tmp_path / 'cache'}"]
    batch = str(recipe["data"].get("test_batch_size", 8))
    e = run_cli("evaluate", exp / best["model_dir"], "--batch-size", batch, *(f"--set={s}" for s in sets))
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout)["ppl"] == pytest.approx(best["test_ppl"], rel=1e-5)


def test_a_parquet_copy_in_a_bucket_trains_through_ray_and_a_datasets_folder_evaluates_offline(
    local_ray, s3, wt2_slice, tmp_path, monkeypatch
):
    """The slice as a Parquet copy in the session's S3 server (loopback): a short dense phase on the local Ray, whose
    worker reads the bucket itself (data.path stays the URI); then the same text as a `datasets` save_to_disk
    folder, read offline in a fresh process (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE), gives that model the phase's
    validation perplexity: the same ids from a bucket's Parquet and a local `datasets` folder."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from allatt_dist.data.corpus import clear_cache
    from allatt_dist.plan import make_plan
    from allatt_dist.recipe import build_config
    from allatt_dist.train.trainer import train

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    client = s3.client()
    rows = {}
    for split in ("train", "valid", "test"):
        lines = (wt2_slice / f"{split}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        rows[split] = [{"text": "".join(x + "\n" for x in lines[i : i + 20])} for i in range(0, len(lines), 20)]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows[split]), sink)
        client.put_object(Bucket="runs", Key=f"own23/parquet/{split}.parquet", Body=sink.getvalue().to_pybytes())
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"] |= {"path": "s3://runs/own23/parquet", "text_field": "text", "cache_dir": str(tmp_path / "c")}
    clear_cache()
    plan = make_plan(build_config(recipe), tmp_path / "run", progress=False)
    dense = train(plan, ["dense"])["dense"]
    assert dense["step"] == 6 and math.isfinite(dense["valid_ppl"]), dense

    datasets.disable_progress_bars()
    parts = {s: datasets.Dataset.from_list(rows[s]) for s in rows}
    folder = tmp_path / "hf"
    datasets.DatasetDict({"train": parts["train"], "validation": parts["valid"], "test": parts["test"]}).save_to_disk(
        str(folder)
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("AWS_")}  # no bucket from here on
    env |= {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    sets = [f"data.path={folder}", f"data.cache_dir={tmp_path / 'c2'}"]
    model = tmp_path / "run" / "dense" / "model"
    e = run_cli("evaluate", model, "--split", "valid", *(f"--set={s}" for s in sets), env=env)
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout)["ppl"] == pytest.approx(dense["valid_ppl"], rel=1e-4)
