"""Tokenising a corpus larger than memory: streamed, in chunks, encoded by parallel processes.

A split's files are read in chunks of about `data.build_chunk_mb` MB of text (text and JSONL line by
line, Parquet and Arrow a record batch at a time), never whole. Each chunk is encoded by one of
`data.build_workers` processes (default: every core this process may use), which writes its ids as a
shard file in a private folder of the cache entry; the shards are then concatenated, in order, into the
split's `.npy` (written under a temporary name and renamed into place by cache.py). At most two chunks
per process are in flight, so the memory is bounded by the chunk size, not by the corpus. The word
vocabulary takes one counting pass the same way (a Counter per chunk, merged in order, so ties still go
by first appearance); byte-level BPE is trained from the same stream. A split of at most one chunk, or
one process, is encoded in this process (no pool to start). The ids are the same whatever the workers.
With `data.build_workers: ray` the CLI's driver has Ray tasks count and encode the chunks (ray_build.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import IO, Any

import numpy as np

from allatt_dist.data import sources
from allatt_dist.data.vocab import Vocab
from allatt_dist.errors import DataError

DTYPE = np.uint32
DEFAULT_CHUNK_MB = 16.0
_BATCH_ROWS = 1024  # Parquet/Arrow rows read at a time


def default_workers() -> int:
    """Every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Plan:
    """How one split is read and encoded: its files, the text field, chunk size (bytes) and processes."""

    def __init__(
        self,
        files: tuple[Path, ...],
        field: str | None,
        chunk_mb: float | None,
        workers: int | str | None,
        carve: Carve | None = None,
        on_ray: bool = False,
    ):
        self.files = files
        self.field = field
        self.carve = carve
        self.chunk_bytes = max(1, int((chunk_mb or DEFAULT_CHUNK_MB) * (1 << 20)))
        # "ray": Ray tasks when this process is the driver that connected (on_ray), else every core here
        self.ray = workers == "ray" and on_ray
        self.workers = workers if isinstance(workers, int) else default_workers()

    def parallel(self) -> bool:
        """Worth a pool: more than one chunk of input (on disk, compressed or not), and Ray tasks or several
        processes."""
        return (self.ray or self.workers > 1) and sum(f.stat().st_size for f in self.files) > self.chunk_bytes

    def name(self) -> str:
        f = self.files
        return str(f[0]) if len(f) == 1 else f"{f[0]} (+{len(f) - 1} more files)"


class Carve:
    """Splits carved from one source (`data.split_fractions`, `data.split_seed`): unit k of the source (a
    text line, or a JSONL record's / Parquet row's lines; numbered across its files in order) goes to valid
    when u(k) < valid, else to test when u(k) < valid + test, else to train, u(k) in [0, 1) a hash of the
    seed and k (splitmix64). So a split's share is its fraction up to sampling noise, and the carving
    depends only on the seed and the order of the units: the same whatever the chunking or workers."""

    def __init__(self, split: str, fractions: tuple[float, float], seed: int) -> None:
        self.split, (self.valid, self.test), self.seed = split, fractions, seed

    def keeps(self, k: int) -> bool:
        u = _splitmix64((self.seed * 0x9E3779B97F4A7C15 + k) & _MASK) / 2.0**64
        got = "valid" if u < self.valid else "test" if u < self.valid + self.test else "train"
        return got == self.split


_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def chunks(plan: Plan) -> Iterator[list[str]]:
    """The split's lines, in order, in lists of about `plan.chunk_bytes` characters (only the units its
    carving keeps, when carved)."""
    out: list[str] = []
    size = 0
    k = -1
    for path in plan.files:
        for unit in file_units(path, plan.field):
            k += 1
            if plan.carve is not None and not plan.carve.keeps(k):
                continue
            out += unit
            size += sum(len(line) + 1 for line in unit)
            if size >= plan.chunk_bytes:
                yield out
                out, size = [], 0
    if out:
        yield out


def file_lines(path: Path, field: str | None) -> Iterator[str]:
    """One corpus file's text lines, streamed (the rules of sources.read_lines, one line a time)."""
    for unit in file_units(path, field):
        yield from unit


def file_units(path: Path, field: str | None) -> Iterator[list[str]]:
    """One corpus file's units, streamed: a text line ([line]), a JSONL record's or a table row's lines."""
    kind = sources.kind_of(path)
    field = field or sources.DEFAULT_FIELD
    if kind in ("parquet", "arrow"):
        yield from _table_rows(path, field, kind)
        return
    with sources.open_bytes(path) as f:  # lines split at b"\n" only; a read error is one line naming the file
        offset = 0  # of this line in the (decompressed) file: a decoding error names its byte
        for n, raw in enumerate(f, start=1):
            line = _decoded(path, raw, offset).removesuffix("\n")
            offset += len(raw)
            if kind == "text":
                yield [line]
            elif line.strip():
                yield _jsonl_one(path, line, field, n)


def _decoded(path: Path, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {offset + e.start})") from None


def _jsonl_one(path: Path, line: str, field: str, n: int) -> list[str]:
    """One JSONL record's lines; errors name the line number `n` of the file."""
    try:
        return sources._jsonl_lines(path, line, field)
    except DataError as e:
        raise DataError(str(e).replace(f"{path}: line 1:", f"{path}: line {n}:", 1)) from None


def _table_rows(path: Path, field: str, kind: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources._table_schema(path, field, kind)
    try:
        if kind == "parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=[field])
        else:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))
        for batch in batches:
            column = batch.column(batch.schema.get_field_index(field))
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DataError(f"{path}: column {field!r} is {column.type}, not text")
            for value in column.to_pylist():
                yield sources._text_lines(value) if value else []
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {kind.title()} file ({str(e).splitlines()[0][:200]})") from None


# ---- workers (module level: run in spawned processes) ----

_VOCAB: Vocab | None = None


def _init_worker(vocab_path: str | None) -> None:
    global _VOCAB
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: the pool is the parallelism
    _VOCAB = Vocab.load(vocab_path) if vocab_path else None


def count_chunk(lines: list[str]) -> Counter[str]:
    """The word counts of one chunk, in first-appearance order (plus one `<eos>` per line)."""
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
        counts[Vocab.EOS] += 1
    return counts


def _count_text(text: str) -> Counter[str]:
    return count_chunk(text.split("\n"))


def _encode_text(text: str, shard: str) -> tuple[int, bool]:
    """A pool job: a chunk sent as one string (its lines joined by newlines, which no line holds: one
    string pickles many times faster than a list of lines)."""
    assert _VOCAB is not None
    return write_shard(_VOCAB, text.split("\n"), Path(shard))


def write_shard(vocab: Vocab, lines: list[str], shard: Path) -> tuple[int, bool]:
    """Encode a chunk into a raw uint32 file; (ids written, whether any line held text)."""
    ids = vocab.encode_lines(lines, DTYPE)
    ids.tofile(shard)
    return int(ids.shape[0]), any(line.strip() for line in lines)


def _pool(workers: int, vocab_path: Path | None) -> ProcessPoolExecutor:
    # spawn: a fresh interpreter, safe whatever threads (Ray, tokenizers) this process runs
    return ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(str(vocab_path or ""),)
    )


def _bounded(pool: Any, jobs: Iterable[tuple], fn: Callable, limit: int) -> Iterator:
    """Results of fn(*job) in job order, at most `limit` submitted ahead (inline when there is no pool)."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending: list[Future] = []
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= limit:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def count_words(plan: Plan) -> Vocab:
    """The word vocabulary of a split (vocab.Vocab.build's order), counted chunk by chunk."""
    counts: Counter[str] = Counter()
    with _maybe_pool(plan, None) as pool:
        jobs = (("\n".join(c),) if pool is not None else (c,) for c in chunks(plan))
        for part in _bounded(pool, jobs, _count_text if pool is not None else count_chunk, _limit(pool, plan)):
            counts.update(part)  # new keys appended in chunk order: first appearance kept
    if not any(tok != Vocab.EOS for tok in counts):
        raise DataError(f"{plan.name()}: split 'train' is empty (no tokens)")
    itos = sorted(counts, key=lambda tok: -counts[tok])
    itos += [s for s in (Vocab.EOS, Vocab.UNK) if s not in counts]
    return Vocab(itos)


def write_ids(plan: Plan, split: str, vocab: Vocab, vocab_path: Path, out: IO[bytes]) -> None:
    """Encode the split into `out` as one .npy file (uint32, 1-D), through shards in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix=".shards-", dir=vocab_path.parent) as tmp:
        shards: list[tuple[Path, int]] = []
        any_text = False
        with _maybe_pool(plan, vocab_path, vocab) as pool:
            for i, (n, text) in enumerate(_encoded(pool, plan, vocab, Path(tmp))):
                shards.append((Path(tmp) / f"{i:06d}.u32", n))
                any_text = any_text or text
        if not any_text:
            raise DataError(f"{plan.name()}: split {split!r} is empty (no tokens)")
        total = sum(n for _, n in shards)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)), "fortran_order": False, "shape": (total,)}
        np.lib.format.write_array_header_1_0(out, header)
        for shard, _ in shards:
            with open(shard, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            shard.unlink()


def _encoded(pool: Any, plan: Plan, vocab: Vocab, tmp: Path) -> Iterator[tuple[int, bool]]:
    """Each chunk's (ids written, whether it held text), in order, its ids written to shard `tmp/<i>.u32`: by
    this process (no pool), by the pool's processes, or here from what a Ray task returns (ray_build.py)."""
    shard = lambda i: tmp / f"{i:06d}.u32"  # noqa: E731
    if pool is None:
        return (write_shard(vocab, c, shard(i)) for i, c in enumerate(chunks(plan)))
    if isinstance(pool, ProcessPoolExecutor):
        jobs = (("\n".join(c), str(shard(i))) for i, c in enumerate(chunks(plan)))
        return _bounded(pool, jobs, _encode_text, _limit(pool, plan))
    results = _bounded(pool, ((pool.vocab, "\n".join(c)) for c in chunks(plan)), encode_text, pool.limit)
    return (_to_shard(ids, text, shard(i)) for i, (ids, text) in enumerate(results))


def encode_text(vocab: Vocab, text: str) -> tuple[np.ndarray, bool]:
    """A Ray task's job: a chunk (its lines joined by newlines) as (uint32 ids, whether any line held text)."""
    lines = text.split("\n")
    return vocab.encode_lines(lines, DTYPE), any(line.strip() for line in lines)


def _to_shard(ids: np.ndarray, text: bool, shard: Path) -> tuple[int, bool]:
    ids.tofile(shard)
    return int(ids.shape[0]), text


def _limit(pool: Any, plan: Plan) -> int:
    """Chunks in flight: two per process (a Ray pool says its own)."""
    return getattr(pool, "limit", 2 * plan.workers)


class _NoPool:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _maybe_pool(plan: Plan, vocab_path: Path | None, vocab: Vocab | None = None):
    if not plan.parallel():
        return _NoPool()
    if plan.ray:
        from allatt_dist.data.ray_build import RayTasks

        return RayTasks(vocab)
    return _pool(plan.workers, vocab_path)


def lines(plan: Plan) -> Iterator[str]:
    """The split's lines one by one (BPE is trained from this stream)."""
    for chunk in chunks(plan):
        yield from chunk


def require_text(plan: Plan, split: str) -> None:
    """One line when the split holds no text (read up to its first non-blank line)."""
    if not any(line.strip() for chunk in chunks(plan) for line in chunk):
        raise DataError(f"{plan.name()}: split {split!r} is empty (no tokens)")
