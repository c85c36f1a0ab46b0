"""The token cache (allatt_dist/data/cache.py): built once, reused, rebuilt when a corpus file changes,
safe when several processes build it at once, and equal to tokenising in memory."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data import build as build_mod
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

TEXT = {
    "train": " = A = \n\n a b a c \n the b the the \n",
    "valid": " a zz \n the \n",
    "test": " b \n\n c the \n",
}


def _folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in TEXT.items():
        (root / f"{split}.txt").write_text(text, encoding="utf-8")
    return root


def _cfg(folder: Path, cache: Path) -> DataConfig:
    return DataConfig(path=str(folder), cache_dir=str(cache))


class _Reads:
    """The corpus files read during a load (a file read = a tokenisation; the streamed build reads the train
    split twice for a word vocabulary, counting then encoding, and it is listed once)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: list[str] = []
        real = build_mod.file_units

        def counting(path, field):
            if Path(path).name not in self.files:
                self.files.append(Path(path).name)
            return real(path, field)

        monkeypatch.setattr(build_mod, "file_units", counting)


def _load(cfg: DataConfig, splits=("train", "valid", "test")):
    clear_cache()  # a new process's view: only the disk cache is shared
    return load_corpus(cfg, splits)


def test_cached_ids_equal_tokenising_in_memory(tmp_path, wt2_path):
    cached = _load(DataConfig(path=str(wt2_path), cache_dir=str(tmp_path / "c")))
    lines = {s: read_lines(wt2_path / f"{s}.txt") for s in ("train", "valid", "test")}
    vocab = Vocab.build(lines["train"])
    assert cached.vocab.itos == vocab.itos
    for split, split_lines in lines.items():
        ids = cached.tokens(split)
        assert ids.dtype == np.uint32 and isinstance(ids, np.memmap) and not ids.flags.writeable
        np.testing.assert_array_equal(ids, vocab.encode_lines(split_lines))


def test_second_load_reads_no_corpus_file_and_rank_needs_only_its_split(tmp_path, monkeypatch):
    folder, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    reads = _Reads(monkeypatch)
    first = _load(_cfg(folder, cache))
    assert sorted(reads.files) == ["test.txt", "train.txt", "valid.txt"]
    reads.files.clear()
    again = _load(_cfg(folder, cache))
    assert reads.files == [], "a warm cache tokenised again"
    for split in TEXT:
        np.testing.assert_array_equal(again.tokens(split), first.tokens(split))
    test_only = _load(_cfg(folder, cache), ("test",))  # what rank/evaluate ask for
    assert reads.files == [] and test_only.vocab.itos == first.vocab.itos
    assert not list(cache.rglob("*.tmp")), "a temporary file was left behind"


def test_a_changed_file_is_tokenised_anew_never_reused(tmp_path, monkeypatch):
    folder, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    before = _load(_cfg(folder, cache))
    # the same size, other bytes: only the content tells them apart
    (folder / "test.txt").write_text(TEXT["test"].replace("c the", "the c"), encoding="utf-8")
    reads = _Reads(monkeypatch)
    after = _load(_cfg(folder, cache))
    assert reads.files == ["test.txt"], reads.files  # vocabulary and other splits reused
    assert after.vocab.decode(after.tokens("test")) == ["b", "<eos>", "<eos>", "the", "c", "<eos>"]
    assert after.vocab.decode(before.tokens("test"))[3:5] == ["c", "the"]
    (folder / "train.txt").write_text(TEXT["train"] + " zz \n", encoding="utf-8")  # new vocabulary
    reads.files.clear()
    third = _load(_cfg(folder, cache))
    assert sorted(reads.files) == ["test.txt", "train.txt", "valid.txt"]
    assert "zz" in third.vocab.stoi and "zz" not in before.vocab.stoi
    assert third.vocab.decode(third.tokens("valid")) == ["a", "zz", "<eos>", "the", "<eos>"]


def _build_in_child(args) -> list:
    folder, cache = args
    c = load_corpus(DataConfig(path=folder, cache_dir=cache))
    return [c.vocab.itos, *(np.asarray(c.tokens(s)).tolist() for s in TEXT)]


def test_concurrent_builders_agree_and_leave_whole_files(tmp_path):
    folder, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.map(_build_in_child, [(str(folder), str(cache))] * 4)
    assert all(r == results[0] for r in results)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and sorted(p.name.split("-")[0] for p in entries[0].glob("*.npy")) == sorted(TEXT)
    assert not list(cache.rglob("*.tmp"))


def test_a_damaged_entry_is_rebuilt(tmp_path):
    folder, cache = _folder(tmp_path / "data"), tmp_path / "cache"
    good = _load(_cfg(folder, cache)).tokens("valid").copy()
    (npy,) = cache.glob("*/valid-*.npy")
    npy.write_bytes(npy.read_bytes()[:20])  # cut short, as a crashed writer without rename would
    np.testing.assert_array_equal(_load(_cfg(folder, cache)).tokens("valid"), good)


def test_an_unwritable_cache_folder_is_one_line(tmp_path):
    folder = _folder(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="token cache not usable") as err:
        _load(_cfg(folder, blocker / "cache"))
    assert "data.cache_dir" in str(err.value) and "\n" not in str(err.value)
