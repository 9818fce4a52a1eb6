"""A small, deterministic artificial translation task for demos and CPU tests.

The source language has ``num_words`` two-syllable words; the target language has a different
word for each (a fixed random dictionary). A target sentence is the word-by-word translation of
its source sentence in reverse order, so a model must learn both the dictionary and the
reordering (a tiny Transformer does within a few hundred steps).

With the default 24 words per language, ``train_tokenizer(..., **SYNTHETIC_TOKENIZER)`` gives
exactly one token per word (a unigram model cannot reach more than ~78 pieces on this corpus).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from lsjax.data.text import PathLike

SYNTHETIC_SPLITS = ("train", "val", "test")
SYNTHETIC_TOKENIZER = {"vocab_size": 200, "model_type": "bpe"}
_SRC_SYLLABLES = [c + v for c, v in itertools.product("bdgklmnprst", "aeiou")]
_TGT_SYLLABLES = [c + v for c, v in itertools.product("fhjvwzcx", "aeiouy")]


def _lexicon(rng: np.random.Generator, syllables: list[str], num_words: int) -> list[str]:
    words = ["".join(p) for p in itertools.product(syllables, repeat=2)]
    return [words[i] for i in rng.choice(len(words), num_words, replace=False)]


def synthetic_translation(
    num_pairs: int,
    seed: int = 0,
    *,
    num_words: int = 24,
    min_len: int = 3,
    max_len: int = 10,
    lexicon_seed: int = 0,
) -> list[tuple[str, str]]:
    """``num_pairs`` deterministic ``(source, target)`` sentence pairs.

    Args:
      seed: draws the sentences; use different seeds for train/val/test.
      num_words: words per language.
      min_len, max_len: sentence length range in words (inclusive).
      lexicon_seed: draws the two vocabularies and the dictionary; keep it fixed across splits.
    """
    lex_rng = np.random.default_rng(lexicon_seed)
    src_words = _lexicon(lex_rng, _SRC_SYLLABLES, num_words)
    tgt_words = _lexicon(lex_rng, _TGT_SYLLABLES, num_words)
    rng = np.random.default_rng((lexicon_seed, seed))
    pairs = []
    for length in rng.integers(min_len, max_len + 1, size=num_pairs):
        ids = rng.integers(0, num_words, size=length)
        pairs.append((" ".join(src_words[i] for i in ids), " ".join(tgt_words[i] for i in ids[::-1])))
    return pairs


def write_synthetic_translation(
    data_dir: PathLike, sizes: dict[str, int] | None = None, seed: int = 0, **task_kwargs
) -> dict[str, tuple[Path, Path]]:
    """Writes the synthetic task as ``<data_dir>/<split>.src`` and ``<split>.tgt`` text files.

    Args:
      sizes: pairs per split; default ``{"train": 4000, "val": 200, "test": 200}``.
      seed: base seed; split ``k`` of :data:`SYNTHETIC_SPLITS` uses ``seed + k``.
      task_kwargs: passed to :func:`synthetic_translation` (``num_words``, ``min_len``, ...).

    Returns:
      ``{split: (source_file, target_file)}``.
    """
    sizes = sizes or {"train": 4000, "val": 200, "test": 200}
    unknown = set(sizes) - set(SYNTHETIC_SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SYNTHETIC_SPLITS}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, num_pairs in sizes.items():
        pairs = synthetic_translation(num_pairs, seed + SYNTHETIC_SPLITS.index(split), **task_kwargs)
        files[split] = synthetic_files(data_dir, split)
        for path, side in zip(files[split], zip(*pairs)):
            path.write_text("".join(line + "\n" for line in side), encoding="utf-8")
    return files


def synthetic_files(data_dir: PathLike, split: str) -> tuple[Path, Path]:
    """``(source_file, target_file)`` of a split written by :func:`write_synthetic_translation`."""
    return Path(data_dir) / f"{split}.src", Path(data_dir) / f"{split}.tgt"
