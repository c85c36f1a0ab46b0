"""data.path an s3:// prefix (issue 23): a Parquet copy of a slice of WikiText-2 mini read from the session's
S3 server (moto, loopback) through the run directories' pyarrow filesystem, cached locally. No Ray."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data import remote_source
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines, resolve_data
from allatt_dist.errors import DataError
from tests.clirun import REPO

WT2 = Path(os.environ.get("ALLATT_TEST_DATA", REPO.parent / "shared" / "data" / "wikitext-2-mini"))
SLICE = {"train": 3000, "valid": 400, "test": 400}  # lines of each split


def _parquet(split: str) -> bytes:
    lines = read_lines(WT2 / f"{split}.txt")[: SLICE[split]]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": lines, "id": list(range(len(lines)))}), buf)
    return buf.getvalue()


@pytest.fixture()
def bucket(s3, monkeypatch, tmp_path):
    if not (WT2 / "train.txt").is_file():
        pytest.skip(f"{WT2}: the WikiText-2 mini corpus is not on this machine")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    client = s3.client()
    local = tmp_path / "local"
    local.mkdir()
    for split in SLICE:
        data = _parquet(split)
        (local / f"{split}.parquet").write_bytes(data)
        client.put_object(Bucket="runs", Key=f"data23/wt2/{split}.parquet", Body=data)
    clear_cache()
    yield client, local
    clear_cache()


def test_a_parquet_corpus_in_a_bucket_reads_as_the_same_files_on_disk(bucket, tmp_path, monkeypatch):
    """The s3:// prefix gives the ids of the same Parquet files in a local folder; resolve_data keeps the URI
    (workers read the bucket themselves); a second load downloads nothing; a changed object is fetched again."""
    client, local = bucket
    uri = "s3://runs/data23/wt2"
    cfg = resolve_data(DataConfig(path=uri, cache_dir=str(tmp_path / "c")))
    assert cfg.path == uri
    got = load_corpus(cfg)
    want = load_corpus(DataConfig(path=str(local), cache_dir=str(tmp_path / "c2")))
    assert got.vocab.itos == want.vocab.itos
    for split in SLICE:
        np.testing.assert_array_equal(got.tokens(split), want.tokens(split))
    downloads: list[str] = []
    real = remote_source.storage.copy_down
    monkeypatch.setattr(remote_source.storage, "copy_down", lambda *a: downloads.append(a[1]) or real(*a))
    clear_cache()
    assert load_corpus(cfg).vocab.itos == got.vocab.itos and downloads == []
    client.put_object(Bucket="runs", Key="data23/wt2/test.parquet", Body=_parquet("valid"))
    clear_cache()
    again = load_corpus(cfg)
    assert downloads == ["runs/data23/wt2/test.parquet"]
    np.testing.assert_array_equal(again.tokens("test"), want.tokens("valid"))


def test_a_prefix_without_corpus_files_is_one_line(bucket, tmp_path):
    with pytest.raises(DataError, match=r"^data.path s3://runs/data23/none: no corpus file under it"):
        resolve_data(DataConfig(path="s3://runs/data23/none", cache_dir=str(tmp_path / "c")))
    with pytest.raises(DataError, match=r"^data.path ftp://x/y: no filesystem for ftp://"):
        resolve_data(DataConfig(path="ftp://x/y", cache_dir=str(tmp_path / "c")))
