"""A Hugging Face dataset by name: `data.path: hf://NAME` or `hf://NAME:CONFIG` (e.g.
`hf://Salesforce/wikitext:wikitext-103-raw-v1`, or `hf:///data/my-dataset-repo` for a dataset repository folder).

The dataset is loaded with `datasets.load_dataset(NAME, CONFIG)`, which honours its own cache and offline mode
(`HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1`: only what is cached, nothing fetched; `HF_HOME`,
`HF_DATASETS_CACHE` say where). `datasets` keeps every split as Arrow stream files in that cache; they are
linked, named by split (`train-00000.arrow`, `valid-00000.arrow`, `test-00000.arrow`), into a folder of the
token cache (`<cache>/hf/<sha256 of the URI>/`), which is then read as a glob of local files (sources.py): the
column `data.text_field`, streamed, tokenised once and cached by the files' content like any corpus. With
`data.split_fractions` only the train split is linked and carved. Workers get the URI and load the dataset
from their node's own `datasets` cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from allatt_dist.data.cache import cache_root
from allatt_dist.data.remote_source import _locked
from allatt_dist.errors import DataError

PREFIX = "hf://"
_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def is_hf(path: str | None) -> bool:
    return bool(path) and str(path).startswith(PREFIX)


def parse(uri: str) -> tuple[str, str | None]:
    """(name, config) of `hf://NAME[:CONFIG]`; one line when there is no name."""
    rest = uri[len(PREFIX) :]
    name, _, config = rest.partition(":") if not rest.startswith("/") else _local_parts(rest)
    if not name.strip("/"):
        raise DataError(f"data.path {uri}: give hf://NAME or hf://NAME:CONFIG (a dataset on the hub or a folder)")
    return name, config or None


def _local_parts(rest: str) -> tuple[str, str, str]:
    """hf:///abs/folder[:CONFIG]: a folder's path may hold no colon but the config's."""
    name, sep, config = rest.rpartition(":")
    return (name, sep, config) if sep else (rest, "", "")


def local_view(uri: str, cache_dir: str | None, carved: bool) -> Path:
    """A glob of the dataset's Arrow files linked by split name (the module's docstring)."""
    name, config = parse(uri)
    files = _split_arrow_files(uri, name, config, ("train",) if carved else tuple(_SPLITS))
    root, _ = cache_root(cache_dir)
    dest = root / "hf" / hashlib.sha256(f"{uri};carved={carved}".encode()).hexdigest()[:24]
    with _locked(dest):
        wanted = {f"{split}-{i:05d}.arrow": src for split, srcs in files.items() for i, src in enumerate(srcs)}
        for old in dest.iterdir():
            if old.name not in wanted:
                old.unlink()
        for link, src in wanted.items():
            if not (dest / link).is_symlink() or os.readlink(dest / link) != str(src):
                tmp = dest / f".{link}.new"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(src)
                os.replace(tmp, dest / link)
    return dest / "*.arrow"


def _split_arrow_files(uri: str, name: str, config: str | None, splits: tuple[str, ...]) -> dict[str, list[Path]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.path {uri}: needs the `datasets` library: pip install datasets") from None
    datasets.disable_progress_bars()
    try:
        dsd = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - the library raises many kinds: any means no usable dataset
        why = " ".join(str(e).split())[:300] or type(e).__name__
        offline = " (offline: only a dataset already in the datasets cache loads)" if _offline() else ""
        raise DataError(f"data.path {uri}: datasets.load_dataset failed{offline}: {why}") from None
    out: dict[str, list[Path]] = {}
    for split in splits:
        hit = next((s for s in _SPLITS[split] if s in dsd), None)
        if hit is None:
            have = ", ".join(dsd) or "none"
            fix = "; or carve them from train with data.split_fractions" if split != "train" else ""
            raise DataError(
                f"data.path {uri}: the dataset has no {' or '.join(_SPLITS[split])} split; it has: {have}{fix}"
            )
        paths = [Path(f["filename"]) for f in dsd[hit].cache_files]
        if not paths:
            raise DataError(
                f"data.path {uri}: split {hit} is held in memory, not in Arrow files; save it to disk first"
            )
        out[split] = paths
    return out


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
