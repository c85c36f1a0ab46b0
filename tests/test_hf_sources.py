"""A Hugging Face dataset by name (`data.path: hf://NAME[:CONFIG]`) through the real `datasets.load_dataset`, offline:
a dataset repository folder of JSONL files (what a hub dataset repository holds), loaded with HF_HUB_OFFLINE and the
`datasets` cache in a temp folder; it gives the ids of the same text as plain files. No Ray, no network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines, resolve_data
from allatt_dist.errors import DataError

datasets = pytest.importorskip("datasets")
SPLITS = ("train", "valid", "test")


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """The `datasets` cache in a temp folder, offline mode on (as the environment variables set it at import)."""
    import datasets.config as dc

    home = tmp_path / "hf-home"
    for k, v in {"HF_HOME": home, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(dc, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", True)
    clear_cache()
    yield home
    clear_cache()


def _repo(root: Path, source: Path, splits=(("train", "train"), ("valid", "validation"), ("test", "test"))) -> Path:
    """A dataset repository folder: data/{train,validation,test}.jsonl, 20 lines of `source`'s split a record."""
    (root / "data").mkdir(parents=True)
    for split, name in splits:
        lines = read_lines(source / f"{split}.txt")
        recs = [{"text": "".join(x + "\n" for x in lines[i : i + 20])} for i in range(0, len(lines), 20)]
        (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return root


def test_a_dataset_by_name_loads_offline_and_equals_the_text_files(offline, wt2_slice, tmp_path):
    repo = _repo(tmp_path / "repo", wt2_slice)
    cfg = resolve_data(DataConfig(path=f"hf://{repo}", cache_dir=str(tmp_path / "c")))
    assert cfg.path == f"hf://{repo}"  # workers load it from their node's datasets cache
    got = load_corpus(cfg)
    want = load_corpus(DataConfig(path=str(wt2_slice), cache_dir=str(tmp_path / "c2")))
    assert got.vocab.itos == want.vocab.itos
    for s in SPLITS:
        np.testing.assert_array_equal(np.asarray(got.tokens(s)), np.asarray(want.tokens(s)))
    assert list((offline / "datasets").iterdir())  # the datasets cache is the one configured, not ~/.cache


def test_a_dataset_with_only_train_is_refused_or_carved(offline, wt2_slice, tmp_path):
    repo = _repo(tmp_path / "repo", wt2_slice, splits=(("train", "train"),))
    with pytest.raises(
        DataError, match=r"the dataset has no validation or valid or dev split; it has: train; or carve"
    ):
        resolve_data(DataConfig(path=f"hf://{repo}", cache_dir=str(tmp_path / "c")))
    carved = DataConfig(path=f"hf://{repo}", cache_dir=str(tmp_path / "c"), split_fractions=(0.1, 0.1))
    corpus = load_corpus(resolve_data(carved))
    sizes = {s: int(corpus.tokens(s).shape[0]) for s in SPLITS}
    assert sizes["train"] > 4 * sizes["valid"] > 0 and sizes["test"] > 0, sizes


def test_a_dataset_not_in_the_offline_cache_is_one_line(offline, tmp_path):
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(path="hf://nobody/no-such-dataset", cache_dir=str(tmp_path / "c")))
    msg = str(e.value)
    assert msg.startswith("data.path hf://nobody/no-such-dataset: datasets.load_dataset failed (offline:"), msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"give hf://NAME or hf://NAME:CONFIG"):
        resolve_data(DataConfig(path="hf://", cache_dir=str(tmp_path / "c")))
