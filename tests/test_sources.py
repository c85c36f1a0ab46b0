"""The user's own corpus (sources.py): JSONL, Parquet, gzip, globs of split files, `data.text_field`; bad input
as one line; the token cache keyed by how the text is read. No Ray: all of it happens before a run starts."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data import build, sources
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines, resolve_data
from allatt_dist.errors import DataError
from tests.clirun import REPO, run_cli

SPLITS = ("train", "valid", "test")


def _records(lines: list[str], field: str = "text", per: int = 40) -> list[dict]:
    """Records of `per` lines each; a record's text reads back as those lines (a final newline adds none)."""
    return [{"id": i, field: "".join(line + "\n" for line in lines[i : i + per])} for i in range(0, len(lines), per)]


def _jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _parquet(path: Path, records: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope="module")
def wt2_lines(wt2_path: Path) -> dict[str, list[str]]:
    return {s: read_lines(wt2_path / f"{s}.txt") for s in SPLITS}


@pytest.fixture(scope="module")
def reference(wt2_path: Path, tmp_path_factory):
    clear_cache()
    return load_corpus(DataConfig(path=str(wt2_path), cache_dir=str(tmp_path_factory.mktemp("c"))))


def _same(corpus, reference) -> None:
    assert corpus.vocab.itos == reference.vocab.itos
    for s in SPLITS:
        assert np.array_equal(np.asarray(corpus.tokens(s)), np.asarray(reference.tokens(s))), s


def test_a_folder_of_jsonl_gz_parquet_with_a_text_field_equals_the_text_folder(tmp_path, wt2_lines, reference):
    folder = tmp_path / "own"
    folder.mkdir()
    _jsonl(folder / "train.jsonl.gz", _records(wt2_lines["train"], "body"))
    _parquet(folder / "valid.parquet", _records(wt2_lines["valid"], "body"))
    _jsonl(folder / "test.jsonl", _records(wt2_lines["test"], "body"))
    cfg = resolve_data(DataConfig(path=str(folder), text_field="body", cache_dir=str(tmp_path / "c")))
    clear_cache()
    _same(load_corpus(cfg), reference)
    (entry,) = (tmp_path / "c").iterdir()
    assert len(list(entry.glob("*.npy"))) == 3


def test_a_glob_of_shards_equals_the_text_folder(tmp_path, wt2_path, wt2_lines, reference):
    half = len(wt2_lines["train"]) // 2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _jsonl(tmp_path / "a" / "train-00000.jsonl", _records(wt2_lines["train"][:half]))
    _jsonl(tmp_path / "b" / "train-00001.jsonl", _records(wt2_lines["train"][half:]))
    (tmp_path / "a" / "valid.txt").write_text((wt2_path / "valid.txt").read_text())
    _parquet(tmp_path / "b" / "test.parquet", _records(wt2_lines["test"]))
    files = sources.split_files(str(tmp_path / "*" / "*"), SPLITS, raw=False)
    assert [p.name for p in files["train"]] == ["train-00000.jsonl", "train-00001.jsonl"]
    cfg = resolve_data(DataConfig(path=str(tmp_path / "*" / "*"), cache_dir=str(tmp_path / "c")))
    assert cfg.path == str(tmp_path / "*" / "*") and cfg.source == "local"
    clear_cache()
    _same(load_corpus(cfg), reference)


def test_the_cache_is_keyed_by_the_text_field_and_reused(tmp_path, monkeypatch):
    folder = tmp_path / "own"
    folder.mkdir()
    for s in SPLITS:
        _jsonl(folder / f"{s}.jsonl", [{"text": "a b c", "title": "t u"}, {"text": "b c", "title": "u"}])
    cache = tmp_path / "c"
    first = load_corpus(DataConfig(path=str(folder), cache_dir=str(cache)))
    reads: list[str] = []
    real = build.file_units  # the streamed reader of the cache build
    monkeypatch.setattr(build, "file_units", lambda p, f=None: reads.append(p.name) or real(p, f))
    clear_cache()
    again = load_corpus(DataConfig(path=str(folder), cache_dir=str(cache)))
    assert reads == [] and again.vocab.itos == first.vocab.itos  # from the cache, no file read
    clear_cache()
    titles = load_corpus(DataConfig(path=str(folder), cache_dir=str(cache), text_field="title"))
    assert sorted(set(reads)) == sorted(f"{s}.jsonl" for s in SPLITS)  # another field: read and cached anew
    assert set(titles.vocab.itos) == {"t", "u", "<eos>", "<unk>"} and len(list(cache.iterdir())) == 2


def _folder(tmp_path: Path, **files: bytes | str) -> Path:
    folder = tmp_path / "own"
    folder.mkdir(exist_ok=True)
    for s in SPLITS:
        (folder / f"{s}.txt").write_text("a b\n")
    for name, content in files.items():
        name = name.replace("_", ".")
        (folder / f"{name.split('.')[0]}.txt").unlink(missing_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def test_a_missing_text_field_names_the_fields_there_are(tmp_path):
    folder = _folder(tmp_path, valid_jsonl='{"body": "a", "id": 1}\n')
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(path=str(folder)))  # before any run starts
    assert (
        str(e.value)
        == f"{folder.resolve()}/valid.jsonl: line 1: no field 'text' (data.text_field); its fields: body, id"
    )
    (folder / "valid.jsonl").rename(folder / "valid.jsonl.off")
    (folder / "valid.txt").write_text("a\n")
    _parquet(folder / "test.parquet", [{"body": "a"}])
    (folder / "test.txt").unlink()
    with pytest.raises(DataError, match=r"test.parquet: no column 'body2' \(data.text_field\); its columns: body"):
        resolve_data(DataConfig(path=str(folder), text_field="body2"))


def test_a_corrupt_or_truncated_gz_names_the_file(tmp_path):
    whole = gzip.compress(b'{"text": "a b c"}\n' * 5000)
    folder = _folder(tmp_path, train_jsonl_gz=whole[: len(whole) // 2])  # truncated: found when read in full
    clear_cache()
    with pytest.raises(DataError, match=r"train.jsonl.gz: corrupt or truncated gzip file"):
        load_corpus(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))
    (folder / "train.jsonl.gz").write_bytes(b"not gzip at all")  # found before the run
    with pytest.raises(DataError, match=r"train.jsonl.gz: corrupt or truncated gzip file"):
        resolve_data(DataConfig(path=str(folder)))
    assert not list((tmp_path / "c").rglob("*.npy"))  # nothing cached half-written


def _zst(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def test_zstd_compressed_text_and_jsonl_equal_the_plain_files(tmp_path, wt2_lines):
    """`.zst` read through pyarrow's codec, streamed line by line like `.gz`: the same ids as the plain files."""
    lines = {s: wt2_lines[s][:400] for s in SPLITS}
    plain, packed = tmp_path / "plain", tmp_path / "zst"
    plain.mkdir()
    packed.mkdir()
    for s in SPLITS:
        (plain / f"{s}.txt").write_text("".join(x + "\n" for x in lines[s]), encoding="utf-8")
    (packed / "train.jsonl.zst").write_bytes(_zst(_jsonl(tmp_path / "t.jsonl", _records(lines["train"])).read_bytes()))
    (packed / "valid.txt.zst").write_bytes(_zst((plain / "valid.txt").read_bytes()))
    (packed / "test.txt.zst").write_bytes(_zst((plain / "test.txt").read_bytes()))
    assert [p.name for p in sources.split_files(packed, ("train",), raw=False)["train"]] == ["train.jsonl.zst"]
    clear_cache()
    want = load_corpus(DataConfig(path=str(plain), cache_dir=str(tmp_path / "c1")))
    got = load_corpus(resolve_data(DataConfig(path=str(packed), cache_dir=str(tmp_path / "c2"))))
    _same(got, want)
    glob_cfg = DataConfig(path=str(packed / "*.zst"), cache_dir=str(tmp_path / "c3"), build_chunk_mb=0.01)
    clear_cache()
    _same(load_corpus(resolve_data(glob_cfg.model_copy(update={"build_workers": 1}))), want)  # many chunks


def test_a_corrupt_or_truncated_zst_names_the_file(tmp_path):
    whole = _zst(b'{"text": "a b c"}\n' * 20000)
    folder = _folder(tmp_path, train_jsonl_zst=whole[: len(whole) // 2])  # truncated: found when read in full
    clear_cache()
    with pytest.raises(DataError, match=r"^\S*train.jsonl.zst: corrupt or truncated zstd file \(") as e:
        load_corpus(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))
    assert "\n" not in str(e.value)
    (folder / "train.jsonl.zst").write_bytes(b"not zstd at all")  # found before the run
    with pytest.raises(DataError, match=r"train.jsonl.zst: corrupt or truncated zstd file"):
        resolve_data(DataConfig(path=str(folder)))
    assert not list((tmp_path / "c").rglob("*.npy"))  # nothing cached half-written
    (folder / "train.jsonl.zst").unlink()
    (folder / "train.txt.gz").write_bytes(gzip.compress(b"a b\n" * 20000)[:-30])  # truncated .gz of text, too
    clear_cache()
    with pytest.raises(DataError, match=r"train.txt.gz: corrupt or truncated gzip file"):
        load_corpus(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))


@pytest.mark.parametrize(
    "pattern, make, message",
    [
        ("nothing/*.jsonl", {}, "data.path {root}/nothing/*.jsonl: no file matches"),
        ("own/*", {"notes.txt": "a"}, "notes.txt: matches data.path {root}/own/* but its name starts with none of"),
        ("own/*", {"train.csv": "a"}, "train.csv: not a corpus file; allowed: .txt, .tokens, .jsonl, .parquet"),
        ("own/t*", {}, "data.path {root}/own/t*: no valid file (names must start with valid)"),
    ],
)
def test_a_bad_glob_is_one_line(tmp_path, pattern, make, message):
    folder = _folder(tmp_path)
    for name, text in make.items():
        (folder / name).write_text(text)
    with pytest.raises(DataError, match=re.escape(message.format(root=tmp_path))):
        resolve_data(DataConfig(path=str(tmp_path / pattern)))


def test_an_empty_split_after_reading_the_records(tmp_path):
    folder = _folder(tmp_path, valid_jsonl='{"text": ""}\n{"text": "   "}\n')
    clear_cache()
    with pytest.raises(DataError, match=r"valid.jsonl: split 'valid' is empty"):
        load_corpus(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))


def test_the_cli_refuses_a_bad_source_in_one_line_before_ray(tmp_path):
    r = run_cli(
        "train", "tune_configs/quickstart.yaml", "--set", f"data.path={tmp_path}/*.jsonl",
        "--out", str(tmp_path / "run"), cwd=REPO, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"data.path {tmp_path}/*.jsonl: no file matches" in r.stderr and not (tmp_path / "run").exists()


def test_a_datasets_folder_saved_to_disk_is_read_offline(tmp_path, wt2_lines, reference):
    """A `DatasetDict.save_to_disk` folder (train / validation / test, two shards for train), read with pyarrow."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    parts = {s: datasets.Dataset.from_list(_records(wt2_lines[s], "body")) for s in SPLITS}
    folder = tmp_path / "hf"
    datasets.DatasetDict({"train": parts["train"], "validation": parts["valid"], "test": parts["test"]}).save_to_disk(
        str(folder), max_shard_size="500KB"
    )
    assert len(sources.split_files(folder, ("train",), raw=False)["train"]) > 1  # shards, in the listed order
    cfg = resolve_data(DataConfig(path=str(folder), text_field="body", cache_dir=str(tmp_path / "c")))
    clear_cache()
    _same(load_corpus(cfg), reference)
    with pytest.raises(DataError, match=r"no column 'text' \(data.text_field\); its columns: id, body"):
        resolve_data(DataConfig(path=str(folder)))
    datasets.DatasetDict({"train": parts["train"]}).save_to_disk(str(tmp_path / "hf1"))
    with pytest.raises(DataError, match="the datasets folder has no split valid or validation; it has: train"):
        resolve_data(DataConfig(path=str(tmp_path / "hf1"), text_field="body"))
