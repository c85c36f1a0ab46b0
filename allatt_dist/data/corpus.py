"""Load a WikiText corpus (word level) as int64 token ids, from a local folder or the Hugging Face hub.

Resolution order: `data.path`, else the `ALLATT_DATA` environment variable (unless data.source is
`hub`), else the hub (`datasets.load_dataset("wikitext", ...)`). A local folder holds either
`wiki.{train,valid,test}.tokens` or `{train,valid,test}.txt`. The vocabulary always comes from the
train split. A local corpus is tokenised once and kept on disk as memory-mapped uint32 ids (`cache.py`),
shared by every process on the node; loads are also cached in-process, so repeated calls are free.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from allatt_dist.config import DataConfig
from allatt_dist.data.cache import DTYPE, TokenCache, cache_root
from allatt_dist.data.cache import ENV_VAR as CACHE_ENV
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

SPLITS = ("train", "valid", "test")
ENV_VAR = "ALLATT_DATA"
_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
_FIX = "--set data.path=DIR (or ALLATT_DATA=DIR), a folder with {train,valid,test}.txt or wiki.*.tokens"


@dataclass
class Corpus:
    vocab: Vocab
    splits: dict[str, np.ndarray]  # split -> (n,) token ids (uint32 memory-mapped, or int64), read-only
    origin: str = field(default="", compare=False)  # where it was read from, for logs

    def tokens(self, split: str) -> np.ndarray:
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"split {split!r} not loaded (loaded: {have}; known: {', '.join(SPLITS)})")
        return self.splits[split]


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, without their newlines (a final newline adds no line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def load_corpus(cfg: DataConfig, splits: Iterable[str] = SPLITS) -> Corpus:
    """Token ids of `splits` (train is always read, to build the vocabulary)."""
    wanted = tuple(dict.fromkeys(splits))
    for s in wanted:
        if s not in SPLITS:
            raise DataError(f"unknown split {s!r}; known: {', '.join(SPLITS)}")
    folder = _local_folder(cfg)
    if folder is not None:
        return _load_local(folder, cfg.raw, wanted, cfg.cache_dir)
    return _load_hub(cfg.name, cfg.raw, wanted)


def resolve_data(cfg: DataConfig, splits: Iterable[str] = SPLITS) -> DataConfig:
    """Check a local folder and its split files now, and pin it as an absolute path (for workers that
    run in another directory or on another node). Hub configs are returned unchanged."""
    folder = _local_folder(cfg)
    if folder is None:
        return cfg
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; {_FIX}")
    for split in dict.fromkeys(("train", *splits)):
        f = _split_file(folder, split, cfg.raw)
        with f.open("rb") as fh:
            if not fh.read(1 << 16).strip():
                raise DataError(f"{f}: the {split} split is empty")
    update = {"path": str(folder.resolve()), "source": "local"}
    if cfg.cache_dir:
        update["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    return cfg.model_copy(update=update)


def check_segments(cfg: DataConfig, sizes: Iterable[tuple[int, int]]) -> None:
    """Before any cluster starts: a local corpus (resolved) decodes and its train split gives each of
    `batch_size` rows one training segment of `seq_len` (+1 target) for every (batch_size, seq_len) in `sizes`
    (the recipe and the ends of a search's domains). Loading it here also fills the token cache the workers
    read. Hub corpora are checked by the workers (nothing is downloaded twice)."""
    folder = _local_folder(cfg)
    if folder is None:
        return
    n = int(load_corpus(cfg, ("train", "valid")).tokens("train").shape[0])
    for batch, seq_len in sizes:
        if n // batch < seq_len + 1:
            raise DataError(
                f"{_split_file(folder, 'train', cfg.raw)}: the train split has {n} tokens; train.batch_size "
                f"({batch}) rows of model.seq_len ({seq_len}) + 1 tokens need at least {batch * (seq_len + 1)}"
            )


def clear_cache() -> None:
    _local_cached.cache_clear()
    _load_hub.cache_clear()


def _local_folder(cfg: DataConfig) -> Path | None:
    if cfg.path:
        return Path(cfg.path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env and cfg.source != "hub":
        return Path(env).expanduser()
    if cfg.source == "local":
        raise DataError(f"data.source is local but no folder is given: {_FIX}")
    return None


def _split_file(folder: Path, split: str, raw: bool) -> Path:
    names = [f"wiki.{split}.tokens", f"{split}.txt"]
    if raw:
        names.insert(0, f"wiki.{split}.raw")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    others = " or ".join(names[1:])
    raise DataError(f"{folder / names[0]}: split file not found (also tried {others})")


def _load_local(folder: Path, raw: bool, wanted: tuple[str, ...], cache_dir: str | None) -> Corpus:
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; {_FIX}")
    files = []
    for split in dict.fromkeys(("train", *wanted)):
        path = _split_file(folder, split, raw).resolve()
        st = path.stat()
        files.append((split, str(path), st.st_mtime_ns, st.st_size))
    return _local_cached(tuple(files), wanted, str(folder.resolve()), cache_dir)


@lru_cache(maxsize=8)
def _local_cached(
    files: tuple[tuple[str, str, int, int], ...], wanted: tuple[str, ...], origin: str, cache_dir: str | None
) -> Corpus:
    where = {split: path for split, path, _, _ in files}
    root, chosen = cache_root(cache_dir)
    try:
        return _from_token_cache(TokenCache(root, Path(where["train"])), where, wanted, origin)
    except OSError as e:
        if chosen:
            raise DataError(
                f"{root}: token cache not usable ({e.strerror or e}); set data.cache_dir (or {CACHE_ENV}) "
                "to a writable folder"
            ) from None
    lines = {split: read_lines(path) for split, path in where.items()}  # no usable default cache: in memory
    return _make_corpus(lines, where, wanted, origin)


def _from_token_cache(cache: TokenCache, where: dict[str, str], wanted: tuple[str, ...], origin: str) -> Corpus:
    """Vocabulary and ids from the disk cache; a file is read and tokenised only when its entry is missing."""
    read: dict[str, list[str]] = {}

    def lines(split: str) -> list[str]:
        if split not in read:
            read[split] = read_lines(where[split])
            if not any(line.strip() for line in read[split]):
                raise DataError(f"{where[split]}: split {split!r} is empty (no tokens)")
        return read[split]

    vocab = cache.vocab(lambda: Vocab.build(lines("train")))
    arrays = {}
    for split in wanted:
        arrays[split] = cache.ids(split, Path(where[split]), lambda s=split: vocab.encode_lines(lines(s), DTYPE))
    return Corpus(vocab=vocab, splits=arrays, origin=origin)


@lru_cache(maxsize=4)
def _load_hub(name: str, raw: bool, wanted: tuple[str, ...]) -> Corpus:
    config = f"{name}-{'raw-' if raw else ''}v1"
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", config)
        needed = dict.fromkeys(("train", *wanted))
        lines = {s: [row.removesuffix("\n") for row in ds[_HUB_SPLIT[s]]["text"]] for s in needed}
    except Exception as e:  # any failure here means no usable hub copy
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(
            f"could not reach the Hugging Face hub for wikitext/{config} ({reason}); use a local copy: {_FIX}"
        ) from None
    where = {s: f"hub wikitext/{config} split {_HUB_SPLIT[s]}" for s in lines}
    return _make_corpus(lines, where, wanted, f"hub:wikitext/{config}")


def _make_corpus(lines: dict[str, list[str]], where: dict[str, str], wanted: tuple[str, ...], origin: str) -> Corpus:
    for split, split_lines in lines.items():
        if not any(line.strip() for line in split_lines):
            raise DataError(f"{where[split]}: split {split!r} is empty (no tokens)")
    vocab = Vocab.build(lines["train"])
    arrays = {}
    for split in wanted:
        ids = vocab.encode_lines(lines[split])  # (n,) int64
        ids.setflags(write=False)  # shared through the cache
        arrays[split] = ids
    return Corpus(vocab=vocab, splits=arrays, origin=origin)
