"""The streamed, sharded token-cache build (data/build.py): one builder among racing processes, the same ids
as the in-memory reference, and peak memory bounded by the chunk size rather than the corpus size.

Every test runs plain processes (no Ray): the build is a process pool of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allatt_dist.data.corpus import read_lines
from allatt_dist.data.vocab import Vocab
from tests.clirun import REPO

WT2 = Path(os.environ.get("ALLATT_TEST_DATA", REPO.parent / "shared" / "data" / "wikitext-2-mini"))

_RACER = r"""
import hashlib, json, sys, time
from pathlib import Path
from allatt_dist.config import DataConfig
from allatt_dist.data import build
from allatt_dist.data.corpus import load_corpus

built = []
for name in ("count_words", "write_ids"):
    real = getattr(build, name)
    def wrap(*a, _real=real, _name=name, **k):
        built.append(_name)
        return _real(*a, **k)
    setattr(build, name, wrap)
go = float(sys.argv[3])
while time.time() < go:  # all racers start loading at the same instant
    time.sleep(0.005)
cfg = DataConfig(path=sys.argv[1], cache_dir=sys.argv[2], build_workers=2, build_chunk_mb=0.1)
corpus = load_corpus(cfg)
digests = {s: hashlib.sha256(corpus.tokens(s).tobytes()).hexdigest() for s in corpus.splits}
print(json.dumps({"built": built, "ids": digests, "vocab": corpus.vocab.fingerprint()}))
"""


@pytest.fixture(scope="module")
def wt2(tmp_path_factory) -> Path:
    if not (WT2 / "train.txt").is_file():
        pytest.skip(f"{WT2}: the WikiText-2 mini corpus is not on this machine")
    return WT2


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_racing_starts_build_the_cache_once_and_read_the_same_ids(wt2, tmp_path):
    """Three processes load one corpus into an empty cache at the same instant (2 build processes each,
    0.1 MB chunks: the builder runs a pool): each entry (vocabulary, the ids of each split) is built by one of
    them while the others wait on the lock and then read its file; all get the ids of the in-memory
    reference (Vocab.build + encode_lines)."""
    import time

    cache = tmp_path / "cache"
    go = f"{time.time() + 2.5:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(wt2), str(cache), go],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    built = sorted(step for r in results for step in r["built"])  # entry by entry: one racer may build valid
    assert built == ["count_words", "write_ids", "write_ids", "write_ids"], results  # each entry built once
    assert len({json.dumps(r["ids"], sort_keys=True) for r in results}) == 1
    lines = {s: read_lines(wt2 / f"{s}.txt") for s in ("train", "valid", "test")}
    vocab = Vocab.build(lines["train"])
    assert results[0]["vocab"] == vocab.fingerprint()
    import hashlib

    for split, text in lines.items():
        ref = vocab.encode_lines(text, np.uint32)
        assert results[0]["ids"][split] == hashlib.sha256(ref.tobytes()).hexdigest(), split
    entry = next(cache.iterdir())
    leftovers = [p.name for p in entry.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == [], leftovers  # shards and temporary files gone


_MEASURE = r"""
import json, resource, sys
from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import load_corpus
import pyarrow, tokenizers  # imported before the baseline: not the build's memory
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = DataConfig(path=sys.argv[1], cache_dir=sys.argv[2], build_workers=int(sys.argv[3]), build_chunk_mb=0.5)
corpus = load_corpus(cfg, ("train",))
print(json.dumps({
    "base_kb": base,
    "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "n": int(corpus.tokens("train").shape[0]),
    "vocab": corpus.vocab.itos,
}))
"""

LIMIT_MB = 16  # the build's memory above the interpreter's, in this process and in each build process


def _synthetic(folder: Path, mb: int) -> tuple[list[str], int]:
    """A corpus of `mb` MB: lines of 12 random words from a 5,000-word Zipf-like vocabulary; (the train
    split's first 1,000 lines, its number of ids: 13 a line with the <eos>)."""
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)])
    folder.mkdir()
    first: list[str] = []
    n = 0
    with open(folder / "train.txt", "w") as f:
        while f.tell() < mb << 20:
            ids = np.minimum(rng.zipf(1.3, size=(2000, 12)) - 1, 4999)
            block = [" ".join(row) for row in words[ids]]
            first += block[: 1000 - len(first)]
            f.write("\n".join(block) + "\n")
            n += 13 * len(block)
    for split in ("valid", "test"):
        (folder / f"{split}.txt").write_text("w1 w2\n")
    return first, n


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, list[str], int]:
    folder = tmp_path_factory.mktemp("big") / "corpus"
    return (folder, *_synthetic(folder, 24))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_corpus_larger_than_the_limit_builds_under_it(big, tmp_path, workers):
    """A 24 MB train split (0.5 MB chunks) is counted and encoded with the peak resident memory of the loading
    process, and of every build process, less than LIMIT_MB (16 MB) above the interpreter's after its imports
    (measured on 32 MB: 5-10 MB; the same split as one chunk, i.e. read whole: 130 MB). The ids are right:
    the count matches the words, and the first lines' ids match an in-memory encoding."""
    folder, first, n = big
    cache = tmp_path / "cache"
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), str(cache), str(workers)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew_mb = (r["peak_kb"] - r["base_kb"]) / 1024
    assert grew_mb < LIMIT_MB, f"the build took {grew_mb:.0f} MB above the interpreter's"
    if workers > 1:
        assert 0 < r["children_kb"] < (r["base_kb"] >> 10) * 1024 + LIMIT_MB * 1024, r["children_kb"]
    vocab = Vocab(r["vocab"])
    entry = next(cache.iterdir())
    ids = np.load(next(entry.glob("train-*.npy")), mmap_mode="r")
    assert r["n"] == ids.shape[0] == n
    ref = vocab.encode_lines(first, np.uint32)
    np.testing.assert_array_equal(ids[: ref.shape[0]], ref)
