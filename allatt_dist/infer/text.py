"""Text in and out through a model's own word-level vocabulary.

A text is read as the corpus is: each line's space-separated words, `<eos>` after each line, words the
vocabulary lacks as `<unk>`. A prompt starts after an `<eos>` (a line start, as every corpus line does)
and has no `<eos>` after its last line, so generation continues that line. Output shows `<eos>` as a
line break and every other token as the model has it (`<unk>` included).
"""

from __future__ import annotations

from allatt_dist.data.vocab import Vocab


def prompt_ids(vocab: Vocab, text: str) -> list[int]:
    """`<eos>`, then the prompt's words line by line (an `<eos>` between lines)."""
    ids = [vocab.eos_id]
    for i, line in enumerate(text.splitlines()):
        if i:
            ids.append(vocab.eos_id)
        ids += [vocab.stoi.get(w, vocab.unk_id) for w in line.split()]
    return ids


def text_ids(vocab: Vocab, text: str) -> list[int]:
    """What `score` reads: `<eos>`, then each line's words followed by `<eos>` (targets: all but the first)."""
    return [vocab.eos_id, *vocab.encode_lines(text.splitlines()).tolist()]


def words(vocab: Vocab, ids: list[int]) -> str:
    """Tokens as text: words joined by spaces, `<eos>` as a line break."""
    lines, cur = [], []
    for tok in vocab.decode(ids):
        if tok == Vocab.EOS:
            lines.append(" ".join(cur))
            cur = []
        else:
            cur.append(tok)
    return "\n".join([*lines, " ".join(cur)])


def has_words(text: str) -> bool:
    return bool(text.split())
