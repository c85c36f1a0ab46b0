"""Issue 25 item 4: a damaged token cache entry (flipped bytes in the ids, a truncated or edited vocabulary)
is found on load against the cache's own MANIFEST.json, rebuilt, and named in one warning line; the corpus
loaded is the undamaged one. No Ray: the cache is read in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import clear_cache, load_corpus

TEXT = {"train": " a b a c \n the b the the \n zz yy \n", "valid": " a zz \n the \n", "test": " b \n c the \n"}


@pytest.fixture()
def built(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, text in TEXT.items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"))
    clear_cache()
    good = load_corpus(cfg)
    return cfg, tmp_path / "cache", good.vocab.itos, {s: np.array(good.tokens(s)) for s in TEXT}


def _reload(cfg: DataConfig):
    clear_cache()  # a new process's view: only the disk cache is shared
    return load_corpus(cfg)


def test_flipped_id_is_found_and_rebuilt(built, capsys) -> None:
    cfg, cache, itos, ids = built
    (npy,) = cache.glob("*/train-*.npy")
    raw = bytearray(npy.read_bytes())
    raw[-4:] = (2**31).to_bytes(4, "little")  # an id far beyond the vocabulary, same size
    npy.write_bytes(bytes(raw))
    got = _reload(cfg)
    np.testing.assert_array_equal(got.tokens("train"), ids["train"])
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"{npy}: damaged" in err and "rebuilding" in err, err


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_damaged_vocab_is_found_and_rebuilt(built, capsys, damage: str) -> None:
    cfg, cache, itos, ids = built
    (vocab,) = cache.glob("*/vocab.txt")
    text = vocab.read_text()
    vocab.write_text(text[: len(text) // 2] if damage == "truncate" else text.replace("the", "teh"))
    got = _reload(cfg)
    assert got.vocab.itos == itos
    for s in TEXT:
        np.testing.assert_array_equal(got.tokens(s), ids[s])
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"{vocab}: damaged" in err, err


def test_intact_cache_loads_without_warning_or_rebuild(built, capsys) -> None:
    cfg, cache, _, _ = built
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and p.name != ".lock"}
    _reload(cfg)
    assert capsys.readouterr().err == ""
    assert before == {p: p.stat().st_mtime_ns for p in before}
