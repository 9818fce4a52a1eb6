"""A joint source/target SentencePiece tokenizer with the project's fixed special ids."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from lsjax.data.text import PathLike, iter_lines

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SPECIAL_IDS = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}


class Tokenizer:
    """Wraps a ``sentencepiece.SentencePieceProcessor`` whose special ids are pad=0, unk=1, bos=2, eos=3.

    ``encode`` returns the plain pieces (no bos/eos); the batching code adds them.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: PathLike | None = None):
        found = {
            "pad_id": processor.pad_id(),
            "unk_id": processor.unk_id(),
            "bos_id": processor.bos_id(),
            "eos_id": processor.eos_id(),
        }
        if found != _SPECIAL_IDS:
            raise ValueError(
                f"SentencePiece model {path or ''} has special ids {found}; lsjax needs {_SPECIAL_IDS}. "
                "Train it with lsjax.data.train_tokenizer."
            )
        self.processor = processor
        self.path = None if path is None else Path(path)

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Loads a ``.model`` file written by :func:`train_tokenizer`."""
        return cls(spm.SentencePieceProcessor(model_file=os.fspath(path)), path)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of one sentence, without bos/eos."""
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many sentences (encoded by SentencePiece's C++ thread pool)."""
        return self.processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first eos; pad and bos ids are dropped."""
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self.processor.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])


def _sentences(inputs: Iterable[PathLike | Iterable[str]]) -> Iterator[str]:
    for item in inputs:
        yield from iter_lines(item) if isinstance(item, (str, os.PathLike)) else item


def train_tokenizer(
    inputs: Iterable[PathLike | Iterable[str]],
    model_prefix: PathLike,
    vocab_size: int,
    model_type: str = "unigram",
    *,
    character_coverage: float = 1.0,
    input_sentence_size: int = 0,
    num_threads: int = 2,
    minloglevel: int = 1,
    **trainer_kwargs,
) -> Tokenizer:
    """Trains one joint SentencePiece model on all ``inputs`` and returns it loaded.

    Args:
      inputs: text files (plain or ``.gz``; one sentence per line) and/or iterables of sentences,
        e.g. ``[train.en.gz, train.de.gz]`` for a joint source+target vocabulary.
      model_prefix: writes ``<model_prefix>.model`` and ``<model_prefix>.vocab``.
      vocab_size: number of pieces including the 4 special ids. With the default
        ``hard_vocab_limit=True`` it must be reachable on the corpus; pass ``hard_vocab_limit=False``
        to accept fewer pieces (read the result's ``vocab_size`` then).
      model_type: ``"unigram"``, ``"bpe"``, ``"word"`` or ``"char"``.
      character_coverage, input_sentence_size, num_threads, minloglevel, trainer_kwargs: passed to
        ``sentencepiece.SentencePieceTrainer.train`` (``input_sentence_size=0`` uses every sentence).
    """
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # Peek so that an empty corpus gets a clear error rather than SentencePiece's.
    sentences = _sentences(inputs)
    first = next(sentences, None)
    if first is None:
        raise ValueError("train_tokenizer got no sentences: the inputs are empty")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], sentences),
            model_prefix=os.fspath(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            num_threads=num_threads,
            minloglevel=minloglevel,
            **_SPECIAL_IDS,
            **trainer_kwargs,
        )
    except RuntimeError as e:
        if "Vocabulary size too high" in str(e):
            raise ValueError(
                f"vocab_size={vocab_size} is too large for this corpus ({e}). Use a smaller "
                "vocab_size, or pass hard_vocab_limit=False to accept fewer pieces."
            ) from e
        if "smaller than required_chars" in str(e):
            raise ValueError(
                f"vocab_size={vocab_size} cannot hold the corpus's characters and the 4 special ids "
                f"({e}). Use a larger vocab_size or a lower character_coverage."
            ) from e
        raise
    return Tokenizer.load(f"{model_prefix}.model")


def load_or_train_tokenizer(
    inputs: Iterable[PathLike | Iterable[str]], model_prefix: PathLike, vocab_size: int, **train_kwargs
) -> Tokenizer:
    """Loads ``<model_prefix>.model`` if it exists with ``vocab_size`` pieces, else trains it.

    With ``hard_vocab_limit=False`` any existing model is reused. Arguments as :func:`train_tokenizer`.
    """
    path = Path(f"{model_prefix}.model")
    if path.exists():
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size == vocab_size or not train_kwargs.get("hard_vocab_limit", True):
            return tokenizer
    return train_tokenizer(inputs, model_prefix, vocab_size, **train_kwargs)
