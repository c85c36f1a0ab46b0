"""Where a local corpus's splits are and how their text is read: plain text, JSONL, Parquet, gzip.

`data.path` is a folder or a glob:

* a folder holds one file per split, the first of `wiki.{split}.tokens`, `{split}.txt`, `{split}.txt.gz`,
  `{split}.jsonl`, `{split}.jsonl.gz`, `{split}.parquet` found (`wiki.{split}.raw` first when data.raw);
* a Hugging Face `datasets` folder (`DatasetDict.save_to_disk`, with its dataset_dict.json): the Arrow
  files of its `train`, `validation` (or `valid`) and `test` splits, read offline with pyarrow;
* a glob (`corpus/*.jsonl.gz`, `shards/**/*.parquet`) gives files whose names start with `train`,
  `valid` (or `validation`) or `test`; a split may have several files, read in name order.

Text files are read line by line; a JSONL record or a Parquet row gives the string in `data.text_field`
(default `text`), whose lines are read as a text file's. Every line becomes its tokens plus `<eos>`.
A `.gz` file is read through Python's gzip, a `.zst` one through pyarrow's zstd codec; a corrupt or
truncated one is one line naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from allatt_dist.errors import DataError

SPLITS = ("train", "valid", "test")
DEFAULT_FIELD = "text"
_KINDS = {".txt": "text", ".tokens": "text", ".raw": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_KINDS[".arrow"] = "arrow"  # a `datasets` save_to_disk shard (an Arrow IPC stream)
_ALLOWED = ".txt, .tokens, .jsonl, .parquet, .arrow (.txt and .jsonl also compressed: .gz, .zst)"
CODECS = {".gz": "gzip", ".zst": "zstd"}  # compressed text: the suffix after the kind's


def codec_of(path: Path) -> str | None:
    """gzip | zstd | None, from the file name's last suffix."""
    return CODECS.get(os.path.splitext(path.name)[1])


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def kind_of(path: Path) -> str:
    """text | jsonl | parquet | arrow, from the file name (a `.gz`/`.zst` suffix is the compression, not the kind)."""
    codec = codec_of(path)
    name = os.path.splitext(path.name)[0] if codec else path.name
    ext = os.path.splitext(name)[1]
    if ext not in _KINDS or (codec and _KINDS[ext] in ("parquet", "arrow")):
        raise DataError(f"{path}: not a corpus file; allowed: {_ALLOWED}")
    return _KINDS[ext]


def folder_candidates(split: str, raw: bool) -> list[str]:
    names = [f"wiki.{split}.tokens"]
    names += [f"{split}.{kind}{z}" for kind in ("txt", "jsonl") for z in ("", ".gz", ".zst")]
    names.append(f"{split}.parquet")
    return ([f"wiki.{split}.raw"] if raw else []) + names


def split_files(path: str | Path, splits: tuple[str, ...], raw: bool) -> dict[str, tuple[Path, ...]]:
    """The files of each of `splits` under `path` (a folder or a glob); one line when one is missing."""
    text = str(path)
    if is_glob(text):
        return _glob_files(text, splits)
    folder = Path(text)
    if (folder / "dataset_dict.json").is_file():
        return {split: _hf_split_files(folder, split) for split in splits}
    out = {}
    for split in splits:
        names = folder_candidates(split, raw)
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is None:
            raise DataError(f"{folder / names[0]}: split file not found (also tried {', '.join(names[1:])})")
        out[split] = (hit,)
    return out


def _hf_split_files(folder: Path, split: str) -> tuple[Path, ...]:
    """The Arrow files of one split of a `save_to_disk` folder, in the order its state.json lists them."""
    names = [split, "validation"] if split == "valid" else [split]
    hit = next((folder / n for n in names if (folder / n / "state.json").is_file()), None)
    if hit is None:
        try:
            have = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            have = []
        raise DataError(f"{folder}: the datasets folder has no split {' or '.join(names)}; it has: {', '.join(have)}")
    try:
        files = [hit / f["filename"] for f in json.loads((hit / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{hit / 'state.json'}: not a datasets state file ({e})") from None
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{hit}: Arrow files missing (state.json lists {', '.join(f.name for f in files)})")
    return tuple(files)


def glob_all(pattern: str) -> tuple[Path, ...]:
    """Every file a glob matches, in name order, whatever its name (one source carved into splits)."""
    matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not matched:
        raise DataError(f"data.path {pattern}: no file matches")
    for p in matched:
        kind_of(p)
    return tuple(matched)


def _glob_files(pattern: str, splits: tuple[str, ...]) -> dict[str, tuple[Path, ...]]:
    matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not matched:
        raise DataError(f"data.path {pattern}: no file matches")
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for p in matched:
        split = next((s for s in SPLITS if p.name.lower().startswith(s)), None)
        if split is None:
            raise DataError(f"{p}: matches data.path {pattern} but its name starts with none of {', '.join(SPLITS)}")
        kind_of(p)
        found[split].append(p)
    for split in splits:
        if not found[split]:
            raise DataError(f"data.path {pattern}: no {split} file (names must start with {split})")
    return {s: tuple(found[s]) for s in splits}


def read_lines(path: Path, text_field: str | None = None) -> list[str]:
    """The text lines of one corpus file (see the module's docstring)."""
    kind = kind_of(path)
    field = text_field or DEFAULT_FIELD
    if kind in ("parquet", "arrow"):
        return _table_lines(path, field, kind)
    with open_bytes(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if kind == "text":
        return _text_lines(text)
    return _jsonl_lines(path, text, field)


@contextlib.contextmanager
def open_bytes(path: Path) -> Iterator[IO[bytes]]:
    """A corpus text file's bytes, decompressed (.gz: Python's gzip; .zst: pyarrow's zstd codec). A read error
    in the block is one line naming the file: a compressed file that does not decode is corrupt or truncated."""
    codec = codec_of(path)
    try:
        if codec == "zstd":
            import pyarrow as pa

            if not pa.Codec.is_available("zstd"):
                raise DataError(f"{path}: this pyarrow has no zstd codec; decompress the file or use .gz")
            fh: IO[bytes] = io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
        else:
            fh = gzip.open(path, "rb") if codec == "gzip" else open(path, "rb")  # noqa: SIM115
        with fh:
            yield fh
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except (EOFError, zlib.error, OSError) as e:
        if codec is None:
            raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        why = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise DataError(f"{path}: corrupt or truncated {codec} file ({why})") from None


def _text_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _jsonl_lines(path: Path, text: str, field: str) -> list[str]:
    out: list[str] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {n}: expected a JSON object with a {field!r} field")
        if field not in record:
            have = ", ".join(sorted(record)) or "none"
            raise DataError(f"{path}: line {n}: no field {field!r} (data.text_field); its fields: {have}")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}: line {n}: field {field!r} is {type(value).__name__}, not text")
        out += _text_lines(value) if value else []
    return out


def _table_lines(path: Path, field: str, kind: str) -> list[str]:
    """A Parquet file's or a `datasets` Arrow file's (an Arrow IPC stream) text column, line by line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _table_schema(path, field, kind)
    try:
        if kind == "parquet":
            column = pq.read_table(path, columns=[field]).column(field)
        else:
            with pa.memory_map(str(path)) as src:
                column = pa.ipc.open_stream(src).read_all().column(field)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {kind.title()} file ({str(e).splitlines()[0][:200]})") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column {field!r} is {column.type}, not text")
    out: list[str] = []
    for value in column.to_pylist():
        out += _text_lines(value) if value else []
    return out


def probe(path: Path, text_field: str | None) -> None:
    """A cheap check before a run starts: the file is not empty, and a JSONL's first record or a Parquet's
    schema has the text field (the whole file is read, and checked, when it is tokenised)."""
    kind = kind_of(path)
    field = text_field or DEFAULT_FIELD
    if kind in ("parquet", "arrow"):
        _table_schema(path, field, kind)
        return
    with open_bytes(path) as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        raise DataError(f"{path}: empty (no text)")
    complete = head.rsplit(b"\n", 1)[0] if b"\n" in head else b""  # whole lines only
    first = next((line for line in complete.split(b"\n") if line.strip()), b"")
    if kind == "jsonl" and first:
        _jsonl_lines(path, first.decode("utf-8", errors="replace"), field)


def _table_schema(path: Path, field: str, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            names = pq.read_schema(path).names
        else:
            with pa.memory_map(str(path)) as src:
                names = pa.ipc.open_stream(src).schema.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {kind.title()} file ({str(e).splitlines()[0][:200]})") from None
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (data.text_field); its columns: {', '.join(names)}")
