"""Data pipeline on the real WikiText-2 mini corpus: vocabulary, loading, errors, streams."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from allatt_dist.config import DataConfig
from allatt_dist.data.corpus import Corpus, clear_cache, load_corpus, read_lines, resolve_data
from allatt_dist.data.stream import IGNORE_INDEX, LMStream, eval_segments, num_eval_segments
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

README_TOKENS = {"train": 217_646, "valid": 118_886, "test": 126_683}
README_TRAIN_TYPES = 13_777  # word types incl. <unk>, plus <eos>


@pytest.fixture(scope="module")
def corpus(wt2_path: Path) -> Corpus:
    return load_corpus(DataConfig(path=str(wt2_path)))


def _write_folder(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


TINY = {"train": " = A = \n\n a b a c \n", "valid": " a d \n", "test": " b \n\n"}


# ---- vocabulary -------------------------------------------------------------------------------


def test_vocab_matches_readme(corpus: Corpus, wt2_path: Path) -> None:
    vocab = corpus.vocab
    assert len(vocab) == README_TRAIN_TYPES
    words = {t for line in read_lines(wt2_path / "train.txt") for t in line.split()}
    assert Vocab.UNK in words and Vocab.EOS not in words  # <unk> is already in the data
    assert set(vocab.itos) == words | {Vocab.EOS}
    counts = Counter(vocab.decode(corpus.tokens("train")))
    freqs = [counts[t] for t in vocab.itos]
    assert freqs == sorted(freqs, reverse=True) and vocab.itos[0] == "the"


def test_split_token_counts_match_readme(corpus: Corpus, wt2_path: Path) -> None:
    for split, n in README_TOKENS.items():
        ids = corpus.tokens(split)
        assert ids.dtype == np.uint32 and ids.shape == (n,) and not ids.flags.writeable  # the token cache's
        lines = read_lines(wt2_path / f"{split}.txt")  # one <eos> per line, blank lines included
        assert int((ids == corpus.vocab.eos_id).sum()) == len(lines)


def test_unknown_words_map_to_unk(corpus: Corpus, wt2_path: Path) -> None:
    known = set(corpus.vocab.itos)
    for split in ("valid", "test"):
        words = [t for line in read_lines(wt2_path / f"{split}.txt") for t in line.split()]
        oov = [w for w in words if w not in known]
        assert oov, f"{split} should have words unseen in train"
        expected_unk = len(oov) + words.count(Vocab.UNK)
        assert int((corpus.tokens(split) == corpus.vocab.unk_id).sum()) == expected_unk


def test_vocab_order_is_frequency_then_first_appearance(tmp_path: Path) -> None:
    vocab = Vocab.build(["b a c", "c a", "d"])
    # counts: <eos>3 a2 c2 b1 d1; a appears before c, b before d
    assert vocab.itos == [Vocab.EOS, "a", "c", "b", "d", Vocab.UNK]
    ids = vocab.encode_lines(["a zz", ""])
    assert ids.tolist() == [vocab.stoi["a"], vocab.unk_id, vocab.eos_id, vocab.eos_id]
    path = tmp_path / "x.txt"
    path.write_text(" a \n\n b\n", encoding="utf-8")
    assert read_lines(path) == [" a ", "", " b"]  # blank lines kept, final newline adds none


def test_vocab_save_load_roundtrip(corpus: Corpus, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "vocab.txt"
    corpus.vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded.itos == corpus.vocab.itos
    assert loaded.fingerprint() == corpus.vocab.fingerprint()
    assert len(corpus.vocab.fingerprint()) == 16
    assert [p.name for p in path.parent.iterdir()] == ["vocab.txt"]  # no temp file left
    other = Vocab.build(["x y"])
    assert other.fingerprint() != corpus.vocab.fingerprint()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [(None, "not found"), ("", "empty"), ("<eos>\n<unk>\na\na\n", "duplicate"), ("<eos>\na\n", "<unk>")],
)
def test_vocab_load_errors(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "vocab.txt"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment) as err:
        Vocab.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- corpus loading ---------------------------------------------------------------------------


def test_repeated_loads_are_cached(corpus: Corpus, wt2_cfg: DataConfig) -> None:
    assert load_corpus(wt2_cfg) is corpus


def test_subset_of_splits_uses_train_vocab(corpus: Corpus, wt2_cfg: DataConfig) -> None:
    only_valid = load_corpus(wt2_cfg, splits=("valid",))
    assert list(only_valid.splits) == ["valid"]
    assert only_valid.vocab.itos == corpus.vocab.itos
    np.testing.assert_array_equal(only_valid.tokens("valid"), corpus.tokens("valid"))
    with pytest.raises(DataError, match="'test' not loaded"):
        only_valid.tokens("test")
    with pytest.raises(DataError, match="unknown split"):
        load_corpus(wt2_cfg, splits=("dev",))


def test_wiki_tokens_naming(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "wt", {f"wiki.{s}.tokens": t for s, t in TINY.items()})
    c = load_corpus(DataConfig(path=str(folder)))
    assert c.vocab.decode(c.tokens("train")) == ["=", "A", "=", "<eos>", "<eos>", "a", "b", "a", "c", "<eos>"]
    assert c.vocab.decode(c.tokens("valid")) == ["a", "<unk>", "<eos>"]
    assert c.vocab.decode(c.tokens("test")) == ["b", "<eos>", "<eos>"]


def test_env_var_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _write_folder(tmp_path / "env", {f"{s}.txt": t for s, t in TINY.items()})
    monkeypatch.setenv("ALLATT_DATA", str(folder))
    assert load_corpus(DataConfig(source="local")).tokens("test").shape == (3,)
    assert load_corpus(DataConfig()).origin == str(folder.resolve())


def test_local_source_without_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALLATT_DATA", raising=False)
    with pytest.raises(DataError, match="data.path"):
        load_corpus(DataConfig(source="local"))


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="data folder not found") as err:
        load_corpus(DataConfig(path=str(missing)))
    assert str(missing) in str(err.value)


def test_missing_split_file(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "wt", {"train.txt": TINY["train"], "valid.txt": TINY["valid"]})
    with pytest.raises(DataError, match="split file not found") as err:
        load_corpus(DataConfig(path=str(folder)))
    assert "test.txt" in str(err.value) and "wiki.test.tokens" in str(err.value)


def test_empty_split(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "wt", {**{f"{s}.txt": t for s, t in TINY.items()}, "valid.txt": "\n \n"})
    with pytest.raises(DataError, match="empty") as err:
        load_corpus(DataConfig(path=str(folder)))
    assert str(folder.resolve() / "valid.txt") in str(err.value)


def test_empty_split_is_found_before_training(tmp_path: Path) -> None:
    """resolve_data, which train/tune call before Ray starts, already refuses an empty split file."""
    folder = _write_folder(tmp_path / "wt", {**{f"{s}.txt": t for s, t in TINY.items()}, "train.txt": "\n\n"})
    with pytest.raises(DataError, match=r"train.txt: the train split is empty"):
        resolve_data(DataConfig(path=str(folder)), ("train", "valid"))


def test_not_utf8(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "wt", {f"{s}.txt": t for s, t in TINY.items()})
    (folder / "test.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_corpus(DataConfig(path=str(folder)))


def test_offline_hub_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    datasets_config = pytest.importorskip("datasets.config")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.delenv("ALLATT_DATA", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read these at import time; patch the live values too, and use an empty cache.
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "ds_cache")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    clear_cache()

    def _hang(signum: int, frame: object) -> None:
        raise TimeoutError("hub load did not fail fast")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(60)
    try:
        with pytest.raises(DataError, match="could not reach the Hugging Face hub") as err:
            load_corpus(DataConfig(source="hub", name="wikitext-103", raw=True))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    msg = str(err.value)
    assert "data.path" in msg and "wikitext-103-raw-v1" in msg and "\n" not in msg


# ---- training stream --------------------------------------------------------------------------


def _epoch(stream: LMStream) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    xs, ys, resets = [], [], []
    for _ in range(stream.segments_per_epoch):
        x, y, reset = stream.next_batch()
        xs.append(x)
        ys.append(y)
        resets.append(reset)
    return torch.cat(xs, dim=1), torch.cat(ys, dim=1), resets  # (b, S*T), (b, S*T)


def test_stream_sharding_partitions_rows(corpus: Corpus) -> None:
    tokens = corpus.tokens("train")
    full_x, full_y, _ = _epoch(LMStream(tokens, global_batch=8, seq_len=64))
    parts = [_epoch(LMStream(tokens, 8, 64, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    # with positions as token values, the ranks' tokens are disjoint
    positions = np.arange(tokens.shape[0], dtype=np.int64)
    seen = [set(_epoch(LMStream(positions, 8, 64, r, 2))[0].flatten().tolist()) for r in range(2)]
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == 4 * 64 * LMStream(positions, 8, 64).segments_per_epoch


def test_stream_targets_are_shifted_inputs(corpus: Corpus) -> None:
    tokens = corpus.tokens("valid")
    stream = LMStream(tokens, global_batch=4, seq_len=32)
    row_len = tokens.shape[0] // 4
    assert stream.segments_per_epoch == (row_len - 1) // 32
    x, y, _ = _epoch(stream)  # (4, S*T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    expected = torch.from_numpy(tokens[: 4 * row_len].reshape(4, row_len).astype(np.int64))  # (4, L)
    assert torch.equal(x, expected[:, : x.shape[1]])
    assert torch.equal(y, expected[:, 1 : x.shape[1] + 1])


def test_stream_reset_flag_and_wrap(corpus: Corpus) -> None:
    stream = LMStream(corpus.tokens("test"), global_batch=16, seq_len=128)
    first_x, _, first_resets = _epoch(stream)
    assert first_resets[0] and not any(first_resets[1:])
    x, _, reset = stream.next_batch()
    assert reset and stream.epoch == 1 and stream.state_dict() == {"epoch": 1, "pos": 1}
    assert torch.equal(x, first_x[:, :128])


def test_stream_resume(corpus: Corpus) -> None:
    tokens = corpus.tokens("valid")
    ref = LMStream(tokens, global_batch=4, seq_len=50, rank=1, world_size=2)
    steps = ref.segments_per_epoch + 3
    for _ in range(steps):
        ref.next_batch()
    state = ref.state_dict()
    resumed = LMStream(tokens, global_batch=4, seq_len=50, rank=1, world_size=2)
    resumed.load_state_dict(dict(state))
    for _ in range(ref.segments_per_epoch + 2):
        a, b = ref.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    with pytest.raises(DataError, match="does not fit"):
        resumed.load_state_dict({"epoch": 0, "pos": 10**9})


def test_stream_guards() -> None:
    tokens = np.arange(100, dtype=np.int64)
    with pytest.raises(DataError, match="too small for batch 8 x seq_len 16"):
        LMStream(tokens, global_batch=8, seq_len=16)
    with pytest.raises(ValueError, match="divisible"):
        LMStream(tokens, global_batch=3, seq_len=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        LMStream(tokens, global_batch=4, seq_len=4, rank=2, world_size=2)


# ---- evaluation segments ----------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "seq_len"), [(1, 64), (3, 50), (7, 128), (8, 64), (10, 1000)])
def test_eval_covers_every_target_once(corpus: Corpus, batch: int, seq_len: int) -> None:
    tokens = corpus.tokens("valid")
    n = tokens.shape[0]
    segs = list(eval_segments(tokens, batch, seq_len))
    assert len(segs) == num_eval_segments(n, batch, seq_len)
    assert all(x.shape == y.shape and x.shape[0] == batch and x.shape[1] <= seq_len for x, y in segs)
    assert all(x.shape[1] == seq_len for x, _ in segs[:-1])
    x = torch.cat([s[0] for s in segs], dim=1)  # (B, L)
    y = torch.cat([s[1] for s in segs], dim=1)  # (B, L)
    mask = y != IGNORE_INDEX
    assert int(mask.sum()) == n - 1
    assert torch.equal(y[mask], torch.from_numpy(tokens[1:].astype(np.int64)))  # row-major order = stream order
    assert torch.equal(x[mask], torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert int(x[~mask].abs().sum()) == 0


def test_eval_non_dividing_batch_pads_the_tail() -> None:
    tokens = np.arange(1, 12, dtype=np.int64)  # n=11, 10 targets
    segs = list(eval_segments(tokens, batch_size=4, seq_len=2))  # L=3
    x = torch.cat([s[0] for s in segs], dim=1)
    y = torch.cat([s[1] for s in segs], dim=1)
    assert x.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 0, 0]]
    assert y.tolist() == [[2, 3, 4], [5, 6, 7], [8, 9, 10], [11, -100, -100]]
    assert [s[0].shape[1] for s in segs] == [2, 1]


def test_eval_max_segments_and_determinism(corpus: Corpus) -> None:
    tokens = corpus.tokens("test")
    few = list(eval_segments(tokens, 8, 64, max_segments=3))
    assert len(few) == 3 == num_eval_segments(tokens.shape[0], 8, 64, 3)
    again = list(eval_segments(tokens, 8, 64))[:3]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(few, again, strict=True))
    assert few[0][0].dtype == torch.int64
    with pytest.raises(DataError, match="at least 2"):
        list(eval_segments(np.array([5], dtype=np.int64), 2, 4))
