"""The token cache built by Ray tasks over the chunks (`data.build_workers: ray`, data/ray_build.py) on the
session's local Ray: the same files and ids as the process pool's build, each chunk one task; and a plan made
before Ray connects checks the files but builds nothing until `with_tokens` (the CLI calls it once connected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data import build, ray_build
from allatt_dist.data.corpus import clear_cache, load_corpus, resolve_data
from allatt_dist.errors import DataError


def _ray_jobs(monkeypatch) -> list[str]:
    """The names of the functions Ray tasks run from now on (a process pool starting fails the test)."""
    jobs: list[str] = []
    real = ray_build.RayTasks.submit
    spy = lambda self, fn, *a: jobs.append(fn.__name__) or real(self, fn, *a)  # noqa: E731
    monkeypatch.setattr(ray_build.RayTasks, "submit", spy)
    monkeypatch.setattr(build, "_pool", lambda *a: pytest.fail("a process pool started"))
    return jobs


def _entry_files(cache: Path) -> dict[str, bytes]:
    (entry,) = cache.glob("*-*")
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir()) if not p.name.startswith(".")}


@pytest.mark.ray
@pytest.mark.parametrize("tokenizer", ["word", "bpe"])
def test_ray_tasks_build_the_cache_the_process_pool_builds(local_ray, wt2_slice, tmp_path, monkeypatch, tokenizer):
    """20 KB chunks of the slice (a few per split): with `ray`, every chunk is counted (words) and encoded by a
    Ray task, no process pool starts, and the cache entry (vocabulary, ids of each split, manifest) is byte for
    byte the one 2 processes build; the BPE tokenizer travels to the tasks through the object store."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    extra = {"tokenizer": "bpe", "vocab_size": 300} if tokenizer == "bpe" else {}
    cfg = DataConfig(path=str(wt2_slice), build_chunk_mb=0.02, **extra)
    pooled = cfg.model_copy(update={"build_workers": 2, "cache_dir": str(tmp_path / "pool")})
    clear_cache()
    want = load_corpus(resolve_data(pooled))

    jobs = _ray_jobs(monkeypatch)
    on_ray = cfg.model_copy(update={"build_workers": "ray", "cache_dir": str(tmp_path / "ray")})
    clear_cache()
    got = load_corpus(resolve_data(on_ray), on_ray=True)
    plans = {s: build.Plan((wt2_slice / f"{s}.txt",), None, 0.02, 1) for s in want.splits}
    chunks = {s: sum(1 for _ in build.chunks(p)) for s, p in plans.items()}
    assert min(chunks.values()) >= 2, chunks
    counted = chunks["train"] if tokenizer == "word" else 0
    assert sorted(jobs) == sorted(["_count_text"] * counted + ["encode_text"] * sum(chunks.values())), jobs
    assert got.vocab.fingerprint() == want.vocab.fingerprint()
    for split in want.splits:
        assert (got.tokens(split) == want.tokens(split)).all(), split
    assert _entry_files(tmp_path / "ray") == _entry_files(tmp_path / "pool")
    clear_cache()


@pytest.mark.ray
def test_a_plan_made_before_ray_connects_builds_nothing_until_with_tokens(local_ray, wt2_slice, tmp_path, monkeypatch):
    """As the CLI runs it: `make_plan` before Ray connects checks the files (a missing JSONL field is still one
    line then) and writes nothing to the cache; `with_tokens`, once connected, builds it by Ray tasks, resolves
    `adaptive_cutoffs: auto` and checks the train split against the batch (one line when it is too short)."""
    import ray

    from allatt_dist.plan import make_plan
    from allatt_dist.recipe import build_config

    recipe = {
        "model": {"num_layers": 1, "hidden_dim": 32, "num_heads": 4, "seq_len": 16, "adaptive_cutoffs": "auto"},
        "data": {
            "path": str(wt2_slice),
            "cache_dir": str(tmp_path / "c"),
            "build_workers": "ray",
            "build_chunk_mb": 0.02,
        },
        "train": {"batch_size": 4},
    }
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "valid", "test"):
        (bad / f"{split}.jsonl").write_text(json.dumps({"body": "a b"}) + "\n")
    clear_cache()
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)  # as in the CLI before it connects
        plan = make_plan(build_config(recipe), tmp_path / "run", progress=False)
        with pytest.raises(DataError, match="no field 'text'"):
            make_plan(build_config(recipe | {"data": recipe["data"] | {"path": str(bad)}}), tmp_path / "r2")
    assert not plan.tokenised and plan.cfg.model.adaptive_cutoffs == "auto"
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("*-*"))
    jobs = _ray_jobs(monkeypatch)
    ready = plan.with_tokens()
    assert "_count_text" in jobs and "encode_text" in jobs, jobs
    assert ready.tokenised and isinstance(ready.cfg.model.adaptive_cutoffs, list), ready.cfg.model
    assert {"vocab.txt", "MANIFEST.json"} <= set(_entry_files(tmp_path / "c"))
    assert ready.with_tokens() is ready
    too_long = build_config(recipe | {"train": {"batch_size": 4096}})
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: False)
        deferred = make_plan(too_long, tmp_path / "r3", progress=False)
    with pytest.raises(DataError, match="the train split has"):
        deferred.with_tokens()
    clear_cache()


@pytest.mark.parametrize("value", ["rays", 0, True])
def test_build_workers_is_a_count_or_ray_in_one_line(value):
    from allatt_dist.errors import UserError
    from allatt_dist.recipe import build_config

    with pytest.raises(UserError) as e:
        build_config({"data": {"build_workers": value}})
    assert str(e.value) == (
        f"data.build_workers: expected a whole number > 0, or ray (Ray tasks over the cluster), got {value!r}"
    )
