"""Data pipeline: SentencePiece tokenizer, parallel text, length buckets and resumable batches.

Batches are dicts of int32 ``[B, L]`` arrays ``src``, ``tgt_in`` (``[bos] + target``) and
``tgt_out`` (``target + [eos]``), padded with 0; ``L`` comes from a bucket ladder and
``B = max_batch_tokens // L``.
"""

from lsjax.data.batching import (
    BATCH_KEYS,
    Batch,
    BatchIterator,
    TranslationDataset,
    bucket_index,
)
from lsjax.data.synthetic import (
    SYNTHETIC_TOKENIZER,
    synthetic_files,
    synthetic_translation,
    write_synthetic_translation,
)
from lsjax.data.text import iter_lines, multi30k_files, read_parallel
from lsjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    load_or_train_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "SYNTHETIC_TOKENIZER",
    "Batch",
    "BatchIterator",
    "Tokenizer",
    "TranslationDataset",
    "bucket_index",
    "iter_lines",
    "load_or_train_tokenizer",
    "multi30k_files",
    "read_parallel",
    "synthetic_files",
    "synthetic_translation",
    "train_tokenizer",
    "write_synthetic_translation",
]
