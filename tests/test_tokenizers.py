"""Subword tokenizers (data.tokenizer): byte-level BPE trained on the train split, a tokenizers JSON file; the
tokenizer saved with a model directory and used to read text and corpora again; a model refused on data
tokenised differently. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from allatt_dist.cli import main
from allatt_dist.config import DataConfig, ModelConfig
from allatt_dist.data.corpus import clear_cache, load_corpus, read_lines, resolve_data
from allatt_dist.errors import DataError
from allatt_dist.infer.text import prompt_ids, words
from allatt_dist.model.registry import build_model
from allatt_dist.modelio import load_model_dir, save_model_dir

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe(wt2_path: Path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("c")
    clear_cache()
    cfg = DataConfig(path=str(wt2_path), tokenizer="bpe", vocab_size=600, cache_dir=str(cache))
    return load_corpus(cfg, ("train", "valid")), cfg


def test_bpe_is_byte_level_at_the_size_asked_and_reads_text_back(bpe):
    corpus, _ = bpe
    vocab = corpus.vocab
    assert len(vocab) == 600 and vocab.tokenizer is not None
    text = "The naïve café (2026) — 東京 \tx"  # nothing unknown: bytes it never saw in training too
    ids = prompt_ids(vocab, text)
    assert vocab.unk_id not in ids and words(vocab, ids[1:]) == text
    valid = np.asarray(corpus.tokens("valid"))
    assert valid.max() < 600 and (valid == vocab.eos_id).sum() > 100


def test_the_cached_tokenizer_and_ids_are_reused_and_equal(bpe, monkeypatch):
    corpus, cfg = bpe
    from allatt_dist.data import tokenizer

    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a: pytest.fail("trained again"))
    clear_cache()
    again = load_corpus(cfg, ("train", "valid"))
    assert again.vocab.fingerprint() == corpus.vocab.fingerprint()
    assert np.array_equal(np.asarray(again.tokens("valid")), np.asarray(corpus.tokens("valid")))


def test_a_model_directory_carries_its_tokenizer_and_evaluate_uses_it(bpe, tmp_path, wt2_path, capsys):
    corpus, cfg = bpe
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_layers=1, hidden_dim=16, num_heads=2, seq_len=8, mem_len=8), 600).eval()
    save_model_dir(model, corpus.vocab, tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    _, vocab, _ = load_model_dir(tmp_path / "m")
    assert vocab.tokenizer is not None and vocab.fingerprint() == corpus.vocab.fingerprint()
    small = tmp_path / "small"  # a short valid split: the evaluation is not the point
    small.mkdir()
    lines = read_lines(wt2_path / "valid.txt")[:300]
    (small / "valid.txt").write_text("".join(line + "\n" for line in lines))
    (small / "train.txt").write_text("x\n")
    clear_cache()
    argv = ["evaluate", str(tmp_path / "m"), "--split", "valid", "--set", f"data.path={small}"]
    assert main([*argv, "--set", f"data.cache_dir={tmp_path / 'c'}"]) == 0  # no data.tokenizer: the model's own
    assert json.loads(capsys.readouterr().out)["tokens"] == len(corpus.vocab.encode_lines(lines)) - 1
    clear_cache()
    assert main([*argv, "--set", "data.tokenizer=word"]) == 2  # the same text, tokenised otherwise: refused
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(600 types, tokenizer tok-" in err and "types, words)" in err, err


def test_a_tokenizer_file(bpe, tmp_path, wt2_path):
    corpus, _ = bpe
    path = tmp_path / "tok.json"
    path.write_text(corpus.vocab.tokenizer.to_str())
    cfg = resolve_data(DataConfig(path=str(wt2_path), tokenizer=str(path), cache_dir=str(tmp_path / "c")))
    clear_cache()
    other = load_corpus(cfg, ("valid",))
    assert other.vocab.fingerprint() == corpus.vocab.fingerprint()
    assert np.array_equal(np.asarray(other.tokens("valid")), np.asarray(corpus.tokens("valid")))


def test_a_pretrained_tokenizer_by_name_from_the_offline_hub_cache(bpe, tmp_path, wt2_path, monkeypatch):
    """`hf:ORG/NAME`: the tokenizer.json of a hub-layout cache (models--org--name/snapshots/<rev>, refs/main) in a
    temp folder, offline; the same ids and cache entry as the file; it travels with a model directory."""
    from huggingface_hub import constants

    corpus, _ = bpe
    hub = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--acme--tiny-bpe" / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text(corpus.vocab.tokenizer.to_str())
    (hub / "models--acme--tiny-bpe" / "refs").mkdir()
    (hub / "models--acme--tiny-bpe" / "refs" / "main").write_text(rev)
    for k, v in {"HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # as they read the environment at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = resolve_data(DataConfig(path=str(wt2_path), tokenizer="hf:acme/tiny-bpe", cache_dir=str(tmp_path / "c")))
    assert cfg.tokenizer == "hf:acme/tiny-bpe"  # workers resolve it from their node's cache
    clear_cache()
    got = load_corpus(cfg, ("valid",))
    assert got.vocab.fingerprint() == corpus.vocab.fingerprint()
    assert np.array_equal(np.asarray(got.tokens("valid")), np.asarray(corpus.tokens("valid")))
    model = build_model(ModelConfig(num_layers=1, hidden_dim=16, num_heads=2, seq_len=8, mem_len=8), len(got.vocab))
    save_model_dir(model, got.vocab, tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").read_text() == (snap / "tokenizer.json").read_text()
    with pytest.raises(DataError) as e:
        resolve_data(DataConfig(path=str(wt2_path), tokenizer="hf:acme/other"))
    assert str(e.value).startswith(
        f"data.tokenizer hf:acme/other: no tokenizer.json (offline: only one already in {hub}"
    )
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size 100: too small for byte-level BPE"),
        ({"tokenizer": "nope.json"}, "data.tokenizer nope.json: no such file; give word, bpe, hf:ORG/NAME or a"),
        ({"tokenizer": "BAD"}, "not a tokenizers JSON file"),
        ({"vocab_size": 1000}, "data.vocab_size: only for data.tokenizer bpe"),
    ],
)
def test_bad_tokenizer_settings_are_one_line_before_a_run(tmp_path, wt2_path, monkeypatch, settings, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text("{not json")
    with pytest.raises(DataError, match=message):
        resolve_data(DataConfig(path=str(wt2_path), **settings))


def test_adaptive_cutoffs_as_fractions_of_the_vocabulary():
    """One recipe for any vocabulary size: fractions become ids when the model is built."""
    cfg = ModelConfig(num_layers=1, hidden_dim=16, num_heads=2, seq_len=8, mem_len=8, adaptive_cutoffs=[0.05, 0.3])
    assert build_model(cfg, 600).io.cutoffs == [30, 180, 600]
    assert build_model(cfg, 8000).io.cutoffs == [400, 2400, 8000]
    with pytest.raises(ValueError, match="fractions of the vocabulary strictly between 0 and 1"):
        ModelConfig(adaptive_cutoffs=[0.5, 1.5])
    with pytest.raises(ValueError, match="give no distinct clusters for a vocabulary of 10"):
        build_model(cfg.model_copy(update={"adaptive_cutoffs": [0.01, 0.02]}), 10)


def test_adaptive_cutoffs_auto_by_frequency_for_any_vocabulary(bpe, tmp_path, wt2_path):
    """`auto`: the ids covering 80% and 95% of the train tokens, resolved when the run is planned (so saved configs
    and model directories hold ids), for the BPE vocabulary as for the word one, and for a vocabulary of 2."""
    import numpy as np

    from allatt_dist.model.output import auto_cutoffs
    from allatt_dist.plan import make_plan
    from tests.tiny import tiny_config

    assert auto_cutoffs(np.array([90, 6, 3, 1])) == [1, 2]
    assert auto_cutoffs(np.array([1, 1])) == [1] and auto_cutoffs(np.array([0, 5, 0])) == [2]
    corpus, cfg = bpe
    plan = make_plan(tiny_config(wt2_path, data=cfg.model_dump(), model={"adaptive_cutoffs": "auto"}), tmp_path / "r")
    counts = np.bincount(np.asarray(corpus.tokens("train")), minlength=600)
    cut = plan.cfg.model.adaptive_cutoffs
    assert cut == auto_cutoffs(counts) and len(cut) == 2 and 0 < cut[0] < cut[1] < 600
    assert counts[: cut[0]].sum() >= 0.8 * counts.sum() > counts[: cut[0] - 1].sum()
    assert build_model(plan.cfg.model, 600).io.cutoffs == [*cut, 600]
    with pytest.raises(ValueError, match="auto is resolved from the train split when a run starts"):
        build_model(plan.cfg.model.model_copy(update={"adaptive_cutoffs": "auto"}), 600)
