"""The vocabulary: word level for WikiText-style corpora, or a subword tokenizer's (tokenizer.py).

Every line of a split yields its tokens followed by `<eos>`. Word level: the space-separated words;
the vocabulary is built from the train split, tokens ordered by frequency (descending), ties broken by
first appearance, so the same corpus always gives the same ids. With a `tokenizers.Tokenizer`: the ids
it gives the line, and its vocabulary (`<eos>` and `<unk>` among its tokens); saved as `tokenizer.json`
beside `vocab.txt`, which `load` then reads instead.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from allatt_dist.atomic import writing
from allatt_dist.errors import DataError

TOKENIZER_FILE = "tokenizer.json"


class Vocab:
    EOS = "<eos>"
    UNK = "<unk>"

    def __init__(self, itos: list[str], tokenizer=None) -> None:
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer, or None: words
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

    @property
    def kind(self) -> str:
        """How text becomes ids: "words", or "tokenizer <its fingerprint>"."""
        return "words" if self.tokenizer is None else f"tokenizer {self.fingerprint()}"

    @classmethod
    def from_tokenizer(cls, tok) -> Vocab:
        """A `tokenizers.Tokenizer`'s tokens in id order; `<eos>`/`<unk>` added as special tokens if missing."""
        missing = [t for t in (cls.EOS, cls.UNK) if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise DataError("the tokenizer's ids are not 0..N-1 without gaps; they cannot index an embedding")
        return cls([by_id[i] for i in range(len(by_id))], tokenizer=tok)

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

    def line_ids(self, line: str) -> list[int]:
        """One line's token ids, without the `<eos>` after it."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(line, add_special_tokens=False).ids if line else []
        return [self.stoi.get(tok, self.unk_id) for tok in line.split()]

    def encode_lines(self, lines: Iterable[str], dtype: type = np.int64) -> np.ndarray:
        """Token ids of `lines`: each line's tokens then `<eos>`; unknown words map to `<unk>`."""
        if self.tokenizer is None:
            return np.fromiter(self._ids(lines), dtype=dtype)  # (n,)
        lines = list(lines)
        out: list[int] = []
        for start in range(0, len(lines), 4096):  # batches: the library encodes them on all cores
            for enc in self.tokenizer.encode_batch(lines[start : start + 4096], add_special_tokens=False):
                out += enc.ids
                out.append(self.eos_id)
        return np.asarray(out, dtype=dtype)

    def text(self, ids: Iterable[int]) -> str:
        """Token ids as text: a line break for `<eos>`; words joined by spaces, subwords decoded."""
        lines, cur = [], []
        for i in ids:
            if int(i) == self.eos_id:
                lines.append(cur)
                cur = []
            else:
                cur.append(int(i))
        if self.tokenizer is not None:
            return "\n".join(self.tokenizer.decode(line, skip_special_tokens=False) for line in [*lines, cur])
        return "\n".join(" ".join(self.itos[i] for i in line) for line in [*lines, cur])

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def fingerprint(self) -> str:
        """Short sha256 of the token list (and of the tokenizer's rules): equal fingerprints mean identical ids."""
        if self.tokenizer is None:
            return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()[:16]
        rules = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True)
        return "tok-" + hashlib.sha256(rules.encode("utf-8")).hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        """Write one token per line (UTF-8), atomically: a temp file in the same folder, then rename; a
        tokenizer first, as tokenizer.json beside it (so a vocab.txt there means both are whole)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is not None:
            with writing(target.parent / TOKENIZER_FILE, encoding="utf-8", perms=0o600) as f:
                f.write(self.tokenizer.to_str())
        with writing(target, encoding="utf-8", newline="\n", perms=0o600) as f:  # 0600: as mkstemp made it
            if self.tokenizer is None:
                f.write("".join(tok + "\n" for tok in self.itos))
            else:  # for people: the tokens (escaped), read back from tokenizer.json
                f.write("".join(json.dumps(tok)[1:-1] + "\n" for tok in self.itos))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a file written by `save`; a missing, empty or malformed file raises DataError."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: vocabulary file not found")
        if (p.parent / TOKENIZER_FILE).is_file():
            return cls.from_tokenizer(load_tokenizer_file(p.parent / TOKENIZER_FILE))
        text = p.read_text(encoding="utf-8")
        itos = text.split("\n")
        if itos and itos[-1] == "":
            itos.pop()
        if not itos:
            raise DataError(f"{p}: vocabulary file is empty")
        _check_tokens(p, itos)
        return cls(itos)


def load_tokenizer_file(path: Path):
    """A `tokenizers` JSON file; one line when it does not load."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("data.tokenizer needs the `tokenizers` library: pip install 'allatt-dist[data]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception for any unreadable file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path}: not a tokenizers JSON file ({first})") from None


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
