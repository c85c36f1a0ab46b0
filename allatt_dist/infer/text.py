"""Text in and out through a model's own vocabulary (words, or its subword tokenizer).

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
        ids += vocab.line_ids(line)
    return ids


def text_ids(vocab: Vocab, text: str) -> list[int]:
    """What `score` reads: `<eos>`, then each line's words followed by `<eos>` (targets: all but the first)."""
    return [vocab.eos_id, *vocab.encode_lines(text.splitlines()).tolist()]


def words(vocab: Vocab, ids: list[int]) -> str:
    """Tokens as text: `<eos>` as a line break; words joined by spaces (subwords decoded by their tokenizer)."""
    return vocab.text(ids)


def has_words(text: str) -> bool:
    return bool(text.split())
