"""Splits carved from one source by fraction with a fixed seed (data.split_fractions, data.split_seed;
build.Carve): a partition of the source's lines, reproducible whatever the chunking, keyed in the cache. No Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines, resolve_data
from tests.clirun import REPO

WT2 = Path(os.environ.get("ALLATT_TEST_DATA", REPO.parent / "shared" / "data" / "wikitext-2-mini"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder holding only WikiText-2 mini's train split: the one source to carve."""
    if not (WT2 / "train.txt").is_file():
        pytest.skip(f"{WT2}: the WikiText-2 mini corpus is not on this machine")
    folder = tmp_path_factory.mktemp("carve") / "one"
    folder.mkdir()
    (folder / "train.txt").write_bytes((WT2 / "train.txt").read_bytes())
    return folder


def _load(folder: Path, cache: Path, **kw):
    clear_cache()
    cfg = resolve_data(DataConfig(path=str(folder), cache_dir=str(cache), split_fractions=(0.1, 0.05), **kw))
    return load_corpus(cfg)


def test_carved_splits_partition_the_source_and_are_reproducible(source, tmp_path):
    lines = read_lines(source / "train.txt")
    first = _load(source, tmp_path / "c1")
    eos = first.vocab.eos_id
    n_lines = {s: int((first.tokens(s) == eos).sum()) for s in ("train", "valid", "test")}
    assert sum(n_lines.values()) == len(lines)  # every line in exactly one split
    assert abs(n_lines["valid"] / len(lines) - 0.1) < 0.02 and abs(n_lines["test"] / len(lines) - 0.05) < 0.02
    assert sum(int(first.tokens(s).shape[0]) for s in n_lines) == sum(len(x.split()) + 1 for x in lines)
    # another cache, other chunks and workers: the same carving, the same ids
    again = _load(source, tmp_path / "c2", build_chunk_mb=0.05, build_workers=1)
    assert again.vocab.itos == first.vocab.itos
    for split in n_lines:
        np.testing.assert_array_equal(again.tokens(split), first.tokens(split))
    # another seed: another carving, cached beside the first (the key holds fractions and seed)
    other = _load(source, tmp_path / "c1", split_seed=1)
    assert not np.array_equal(other.tokens("valid")[:1000], first.tokens("valid")[:1000])
    assert len(list((tmp_path / "c1").iterdir())) == 2


@pytest.mark.parametrize("fractions", [(0.6, 0.5), (0.0, 0.1), (0.1, 1.0)])
def test_fractions_outside_the_allowed_range_are_refused(fractions):
    with pytest.raises(ValidationError, match=r"split_fractions .*: \[valid, test\] must each be in \(0, 1\), sum < 1"):
        DataConfig(path="x", split_fractions=fractions)
    with pytest.raises(ValidationError, match="split_fractions: only for a local or bucket data.path"):
        DataConfig(source="hub", split_fractions=(0.1, 0.1))
