"""Word-level vocabulary for WikiText-style corpora.

Every line of a split yields its space-separated tokens followed by `<eos>`. The vocabulary is
built from the train split: tokens ordered by frequency (descending), ties broken by first
appearance, so the same corpus always gives the same ids.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from allatt_dist.atomic import writing
from allatt_dist.errors import DataError


class Vocab:
    EOS = "<eos>"
    UNK = "<unk>"

    def __init__(self, itos: list[str]) -> None:
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("vocabulary has duplicate tokens")
        for special in (self.EOS, self.UNK):
            if special not in self.stoi:
                raise DataError(f"vocabulary lacks the special token {special}")

    @classmethod
    def build(cls, lines: Iterable[str]) -> Vocab:
        """Count the tokens of `lines` (plus one `<eos>` per line) and order them by frequency."""
        counts: Counter[str] = Counter()  # insertion order = first appearance
        for line in lines:
            counts.update(line.split())
            counts[cls.EOS] += 1
        # sorted() is stable, so equal counts keep their first-appearance order.
        itos = sorted(counts, key=lambda tok: -counts[tok])
        for special in (cls.EOS, cls.UNK):
            if special not in counts:
                itos.append(special)
        return cls(itos)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def eos_id(self) -> int:
        return self.stoi[self.EOS]

    @property
    def unk_id(self) -> int:
        return self.stoi[self.UNK]

    def _ids(self, lines: Iterable[str]) -> Iterator[int]:
        stoi, unk, eos = self.stoi, self.unk_id, self.eos_id
        for line in lines:
            for tok in line.split():
                yield stoi.get(tok, unk)
            yield eos

    def encode_lines(self, lines: Iterable[str], dtype: type = np.int64) -> np.ndarray:
        """Token ids of `lines`: each line's tokens then `<eos>`; unknown words map to `<unk>`."""
        return np.fromiter(self._ids(lines), dtype=dtype)  # (n,)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def fingerprint(self) -> str:
        """Short sha256 of the token list: equal fingerprints mean identical ids."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write one token per line (UTF-8), atomically: a temp file in the same folder, then rename."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with writing(target, encoding="utf-8", newline="\n", perms=0o600) as f:  # 0600: as mkstemp made it
            f.write("".join(tok + "\n" for tok in self.itos))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a file written by `save`; a missing, empty or malformed file raises DataError."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: vocabulary file not found")
        text = p.read_text(encoding="utf-8")
        itos = text.split("\n")
        if itos and itos[-1] == "":
            itos.pop()
        if not itos:
            raise DataError(f"{p}: vocabulary file is empty")
        _check_tokens(p, itos)
        return cls(itos)


def _check_tokens(path: Path, itos: list[str]) -> None:
    seen: dict[str, int] = {}
    for lineno, tok in enumerate(itos, start=1):
        if tok.split() != [tok]:
            raise DataError(f"{path}: line {lineno}: empty token or token with whitespace")
        if tok in seen:
            raise DataError(f"{path}: line {lineno}: duplicate token {tok!r} (first on line {seen[tok]})")
        seen[tok] = lineno
    for special in (Vocab.EOS, Vocab.UNK):
        if special not in seen:
            raise DataError(f"{path}: vocabulary lacks the special token {special}")
