"""Load a corpus as token ids, from a local folder or glob, a bucket prefix (remote_source.py), a Hugging Face
dataset by name (hf_source.py), or WikiText from the hub.

Resolution order: `data.path`, else the `ALLATT_DATA` environment variable (unless data.source is
`hub`), else the hub (`datasets.load_dataset("wikitext", ...)`). A local corpus is a folder of
`wiki.{split}.tokens` or `{split}.{txt,jsonl,parquet}` (txt/jsonl also gzipped), or a glob of such files
named by split (`sources.py`, with `data.text_field` for JSONL/Parquet). The vocabulary always comes
from the train split. A local corpus is tokenised once and kept on disk as memory-mapped uint32 ids (`cache.py`),
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
from allatt_dist.data import build, hf_source, remote_source, sources, tokenizer
from allatt_dist.data.cache import ENV_VAR as CACHE_ENV
from allatt_dist.data.cache import TokenCache, cache_root
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

SPLITS = ("train", "valid", "test")
ENV_VAR = "ALLATT_DATA"
_HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
_FIX = (
    "--set data.path=DIR (or ALLATT_DATA=DIR), a folder with {train,valid,test}.{txt,jsonl,parquet} or wiki.*.tokens, "
    "or a glob of files named train*, valid*, test*, or hf://NAME[:CONFIG] (a Hugging Face dataset)"
)


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


def load_corpus(cfg: DataConfig, splits: Iterable[str] = SPLITS, *, on_ray: bool = False) -> Corpus:
    """Token ids of `splits` (train is always read, to build the vocabulary). `on_ray`: this process is the
    driver connected to Ray, which builds a missing cache entry with Ray tasks when `data.build_workers` is
    `ray` (ray_build.py); any other process builds it with its own processes."""
    wanted = tuple(dict.fromkeys(splits))
    for s in wanted:
        if s not in SPLITS:
            raise DataError(f"unknown split {s!r}; known: {', '.join(SPLITS)}")
    folder = _local_folder(cfg)
    if folder is not None:
        return _load_local(folder, cfg, wanted, on_ray)
    return _load_hub(cfg.name, cfg.raw, wanted, cfg.tokenizer, cfg.vocab_size)


def resolve_data(cfg: DataConfig, splits: Iterable[str] = SPLITS) -> DataConfig:
    """Check a local folder and its split files now, and pin it as an absolute path (for workers that
    run in another directory or on another node). Hub configs are returned unchanged."""
    tokenizer.check(cfg.tokenizer, cfg.vocab_size)
    if tokenizer.kind(cfg.tokenizer) == "file":  # pinned as an absolute path too
        cfg = cfg.model_copy(update={"tokenizer": str(Path(cfg.tokenizer).expanduser().resolve())})
    folder = _local_folder(cfg)
    if folder is None:
        return cfg
    if not sources.is_glob(str(folder)) and not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; {_FIX}")
    for split, files in _split_files(folder, tuple(dict.fromkeys(("train", *splits))), cfg).items():
        for f in files:
            try:
                sources.probe(f, cfg.text_field)
            except DataError as e:
                raise DataError(str(e).replace("empty (no text)", f"the {split} split is empty")) from None
    pinned = os.path.abspath(folder) if sources.is_glob(str(folder)) else str(folder.resolve())
    if remote_source.is_remote(cfg.path) or hf_source.is_hf(cfg.path):
        pinned = str(cfg.path)  # every node reads the bucket (loads the dataset) into its own cache
    update = {"path": pinned, "source": "local"}
    if cfg.cache_dir:
        update["cache_dir"] = str(Path(cfg.cache_dir).expanduser().resolve())
    return cfg.model_copy(update=update)


def check_segments(cfg: DataConfig, sizes: Iterable[tuple[int, int]], *, on_ray: bool = False) -> None:
    """Before any cluster starts: a local corpus (resolved) decodes and its train split gives each of
    `batch_size` rows one training segment of `seq_len` (+1 target) for every (batch_size, seq_len) in `sizes`
    (the recipe and the ends of a search's domains). Loading it here also fills the token cache the workers
    read (`on_ray`: with `data.build_workers: ray`, by Ray tasks, once the CLI connected: plan.py). Hub corpora
    are checked by the workers (nothing is downloaded twice)."""
    folder = _local_folder(cfg)
    if folder is None:
        return
    n = int(load_corpus(cfg, ("train", "valid"), on_ray=on_ray).tokens("train").shape[0])
    for batch, seq_len in sizes:
        if n // batch < seq_len + 1:
            train_files = _split_files(folder, ("train",), cfg)["train"]
            raise DataError(
                f"{_name(train_files)}: the train split has {n} tokens; train.batch_size "
                f"({batch}) rows of model.seq_len ({seq_len}) + 1 tokens need at least {batch * (seq_len + 1)}"
            )


def clear_cache() -> None:
    _local_cached.cache_clear()
    _load_hub.cache_clear()


def _local_folder(cfg: DataConfig) -> Path | None:
    if hf_source.is_hf(cfg.path):  # hf://NAME[:CONFIG]: datasets.load_dataset's Arrow files (hf_source.py)
        return hf_source.local_view(str(cfg.path), cfg.cache_dir, cfg.split_fractions is not None)
    if remote_source.is_remote(cfg.path):  # s3:// or gs://: its local copy (remote_source.py)
        return remote_source.local_copy(str(cfg.path), cfg.cache_dir)
    if cfg.path:
        return Path(cfg.path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env and cfg.source != "hub":
        return Path(env).expanduser()
    if cfg.source == "local":
        raise DataError(f"data.source is local but no folder is given: {_FIX}")
    return None


def _load_local(folder: Path, cfg: DataConfig, wanted: tuple[str, ...], on_ray: bool = False) -> Corpus:
    if not sources.is_glob(str(folder)) and not folder.is_dir():
        raise DataError(f"{folder}: data folder not found; {_FIX}")
    files = []
    for split, paths in _split_files(folder, tuple(dict.fromkeys(("train", *wanted))), cfg).items():
        stats = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
        files.append((split, stats))
    origin = os.path.abspath(folder) if sources.is_glob(str(folder)) else str(folder.resolve())
    tok = (cfg.tokenizer, cfg.vocab_size)
    opts = (cfg.build_workers, cfg.build_chunk_mb, on_ray)
    carve = (cfg.split_fractions, cfg.split_seed) if cfg.split_fractions else None
    return _local_cached(tuple(files), wanted, origin, cfg.cache_dir, cfg.text_field, tok, opts, carve)


def _split_files(folder: Path, splits: tuple[str, ...], cfg: DataConfig) -> dict[str, tuple[Path, ...]]:
    """Each split's files; carved splits (data.split_fractions) all read the one source: the train file of
    a folder, or every file a glob matches."""
    if cfg.split_fractions is None:
        return sources.split_files(folder, splits, cfg.raw)
    if sources.is_glob(str(folder)):
        files = sources.glob_all(str(folder))
    else:
        files = sources.split_files(folder, ("train",), cfg.raw)["train"]
    return {s: files for s in splits}


@lru_cache(maxsize=8)
def _local_cached(
    files: tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...],
    wanted: tuple[str, ...],
    origin: str,
    cache_dir: str | None,
    text_field: str | None = None,
    tok: tuple[str | None, int | None] = (None, None),
    opts: tuple[int | str | None, float | None, bool] = (None, None, False),
    carve: tuple[tuple[float, float], int] | None = None,
) -> Corpus:
    where = {split: tuple(Path(p) for p, _, _ in stats) for split, stats in files}
    # How the text is read is part of the cache key once a file is not plain text (the JSONL/Parquet field).
    plain = all(sources.kind_of(p) == "text" for paths in where.values() for p in paths)
    salt = ";".join(
        filter(None, ["" if plain else f"field={text_field or sources.DEFAULT_FIELD}", tokenizer.cache_salt(*tok)])
    )
    if carve:
        salt += f";carve={carve[0][0]!r},{carve[0][1]!r},seed={carve[1]}"
    cut = {s: build.Carve(s, *carve) if carve else None for s in where}
    plans = {s: build.Plan(p, text_field, opts[1], opts[0], cut[s], on_ray=opts[2]) for s, p in where.items()}
    root, chosen = cache_root(cache_dir)
    try:
        return _from_token_cache(TokenCache(root, where["train"], salt), plans, wanted, origin, tok)
    except OSError as e:
        if chosen:
            raise DataError(
                f"{root}: token cache not usable ({e.strerror or e}); set data.cache_dir (or {CACHE_ENV}) "
                "to a writable folder"
            ) from None
    lines = {split: list(build.lines(plan)) for split, plan in plans.items()}  # no usable cache: in memory
    return _make_corpus(lines, {s: _name(p) for s, p in where.items()}, wanted, origin, tok)


def _name(paths: tuple[Path, ...]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} more files)"


def _from_token_cache(
    cache: TokenCache,
    plans: dict[str, build.Plan],
    wanted: tuple[str, ...],
    origin: str,
    tok: tuple[str | None, int | None] = (None, None),
) -> Corpus:
    """Vocabulary and ids from the disk cache; a split is read (streamed, in chunks: build.py) and tokenised
    only when its entry is missing."""

    def make_vocab():
        if tokenizer.kind(tok[0]) == "word":
            return build.count_words(plans["train"])
        if tokenizer.kind(tok[0]) == "bpe":
            build.require_text(plans["train"], "train")
        return tokenizer.build(*tok, lambda: build.lines(plans["train"]))

    vocab = cache.vocab(make_vocab)
    arrays = {}
    for split in wanted:
        plan = plans[split]
        write = lambda out, s=split, p=plan: build.write_ids(p, s, vocab, cache.dir / "vocab.txt", out)  # noqa: E731
        arrays[split] = cache.ids(split, plan.files, write)
    return Corpus(vocab=vocab, splits=arrays, origin=origin)


@lru_cache(maxsize=4)
def _load_hub(
    name: str, raw: bool, wanted: tuple[str, ...], tok_name: str | None = None, vocab_size: int | None = None
) -> Corpus:
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
    return _make_corpus(lines, where, wanted, f"hub:wikitext/{config}", (tok_name, vocab_size))


def _make_corpus(
    lines: dict[str, list[str]],
    where: dict[str, str],
    wanted: tuple[str, ...],
    origin: str,
    tok: tuple[str | None, int | None] = (None, None),
) -> Corpus:
    for split, split_lines in lines.items():
        if not any(line.strip() for line in split_lines):
            raise DataError(f"{where[split]}: split {split!r} is empty (no tokens)")
    vocab = tokenizer.build(*tok, lambda: lines["train"])
    arrays = {}
    for split in wanted:
        ids = vocab.encode_lines(lines[split])  # (n,) int64
        ids.setflags(write=False)  # shared through the cache
        arrays[split] = ids
    return Corpus(vocab=vocab, splits=arrays, origin=origin)
