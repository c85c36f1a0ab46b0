"""Subword tokenizers (`data.tokenizer`), through the Hugging Face `tokenizers` library (the `data` extra).

* `word` (or unset): the word-level vocabulary of vocab.py, the paper's; nothing here is used.
* `bpe`: byte-level BPE trained on the train split at `data.vocab_size` (256 byte symbols + `<eos>` and
  `<unk>` at least, so no text is unknown). Training is deterministic: the same train text and size
  give the same tokenizer, and it is cached with the token ids.
* a path to a `tokenizer.json` (`Tokenizer.save`): that tokenizer; `<eos>` and `<unk>` are added as
  special tokens when it lacks them.
* `hf:ORG/NAME` (or `hf:ORG/NAME@REVISION`): the `tokenizer.json` of that model repository on the Hugging Face
  hub, through `huggingface_hub.hf_hub_download`, so its cache (HF_HOME, HF_HUB_CACHE) and offline mode
  (HF_HUB_OFFLINE=1: only a file already cached) are honoured; then as a file. Its cache key is the file's
  content, so the same tokenizer by name or by file shares the token cache.

The tokenizer becomes part of the vocabulary (`Vocab.tokenizer`), so it is saved with every model
directory (tokenizer.json) and read back by evaluate, rank, generate and serve.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from allatt_dist.data.vocab import Vocab, load_tokenizer_file
from allatt_dist.errors import DataError

SPECIALS = [Vocab.EOS, Vocab.UNK]
load_file = load_tokenizer_file
vocab_of = Vocab.from_tokenizer
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + len(SPECIALS)
DEFAULT_VOCAB = 8000


HUB_PREFIX = "hf:"


def kind(tokenizer: str | None) -> str:
    """word | bpe | hub | file."""
    if tokenizer in (None, "word"):
        return "word"
    if tokenizer.startswith(HUB_PREFIX):
        return "hub"
    return "bpe" if tokenizer == "bpe" else "file"


def cache_salt(tokenizer: str | None, vocab_size: int | None) -> str:
    """What names a tokenizer in the token cache's key ("" for words: the entries as before)."""
    k = kind(tokenizer)
    if k == "word":
        return ""
    if k == "bpe":
        return f"tok=bpe-bytelevel-{vocab_size or DEFAULT_VOCAB}"
    from allatt_dist.data.cache import file_digest

    return f"tok=file-{file_digest(_file(tokenizer))}"


def check(tokenizer: str | None, vocab_size: int | None) -> None:
    """The tokenizer settings, before any run starts: a size the byte alphabet fits, a file that loads."""
    k = kind(tokenizer)
    if k == "bpe" and vocab_size is not None and vocab_size < MIN_VOCAB:
        raise DataError(
            f"data.vocab_size {vocab_size}: too small for byte-level BPE (the {BYTE_ALPHABET} byte symbols and "
            f"{', '.join(SPECIALS)}: at least {MIN_VOCAB})"
        )
    if k in ("file", "hub"):
        load_file(_file(tokenizer))
    elif vocab_size is not None and k == "word":
        raise DataError("data.vocab_size: only for data.tokenizer bpe (the word vocabulary is every train word)")


def build(tokenizer: str | None, vocab_size: int | None, train_lines: Callable[[], Iterable[str]]) -> Vocab:
    """The vocabulary of a corpus: words, BPE trained on `train_lines()`, or a tokenizer file's."""
    k = kind(tokenizer)
    if k == "word":
        return Vocab.build(train_lines())
    if k in ("file", "hub"):
        return vocab_of(load_file(_file(tokenizer)))
    return vocab_of(train_bpe(train_lines(), vocab_size or DEFAULT_VOCAB))


def train_bpe(lines: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    length = len(lines) if isinstance(lines, list) else None
    tok.train_from_iterator((line for line in lines if line), trainer=trainer, length=length)
    return tok


def _file(tokenizer: str) -> Path:
    if kind(tokenizer) == "hub":
        return _hub_file(tokenizer)
    p = Path(tokenizer).expanduser()
    if not p.is_file():
        raise DataError(
            f"data.tokenizer {tokenizer}: no such file; give word, bpe, hf:ORG/NAME or a tokenizers JSON file"
        )
    return p


def _hub_file(tokenizer: str) -> Path:
    """The cached (else downloaded) tokenizer.json of `hf:ORG/NAME[@REVISION]`; one line when there is none."""
    repo, _, revision = tokenizer[len(HUB_PREFIX) :].partition("@")
    if not repo.strip("/"):
        raise DataError(f"data.tokenizer {tokenizer}: give hf:ORG/NAME (a model repository on the hub)")
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise DataError(f"data.tokenizer {tokenizer}: needs huggingface_hub: pip install 'allatt-dist[data]'") from None
    try:
        return Path(hf_hub_download(repo, "tokenizer.json", revision=revision or None))
    except Exception as e:  # noqa: BLE001 - offline, missing, unreachable: all mean no tokenizer file
        why = " ".join(str(e).split())[:200] or type(e).__name__
        where = f"offline: only one already in {constants.HF_HUB_CACHE}; " if constants.HF_HUB_OFFLINE else ""
        raise DataError(f"data.tokenizer {tokenizer}: no tokenizer.json ({where}{why})") from None


@contextmanager
def for_model(cfg, vocab: Vocab) -> Iterator:
    """The DataConfig that tokenises a corpus as a model's `vocab` does: with its tokenizer (a temporary
    file) when it has one and `data.tokenizer` is unset; `cfg` itself otherwise."""
    if vocab.tokenizer is None or cfg.tokenizer is not None:
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix="allatt-tok-") as d:
        path = Path(d) / "tokenizer.json"
        path.write_text(vocab.tokenizer.to_str(), encoding="utf-8")
        yield cfg.model_copy(update={"tokenizer": str(path)})
